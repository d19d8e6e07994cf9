"""Per-iteration learning-rate schedules (mmcv's linear warmup, step and poly decay) and their length bound."""
from ..errors import ConfigError


def _warmup_factor(iteration, warmup_iters, warmup_ratio):
    """mmcv's linear warmup: the factor rises from warmup_ratio at iteration 0 towards 1 at warmup_iters."""
    if iteration >= warmup_iters:
        return 1.0
    return 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)


# Optimizers take the schedule as one lr per iteration. 10 million iterations is 25 times a 300-epoch ImageNet run at
# batch 1024 and ~110 times a COCO 1x schedule; more is a typo, which would otherwise build a list until MemoryError.
MAX_SCHEDULE_ITERS = 10_000_000


def check_schedule_length(total_iters, what):
    """ConfigError naming `what` (the keys that set the length) if a schedule would be unreasonably long."""
    if int(total_iters) > MAX_SCHEDULE_ITERS:
        raise ConfigError(f"{what} gives {int(total_iters)} training iterations, more than the {MAX_SCHEDULE_ITERS} "
                          "a schedule is built for")


def warmup_step_schedule(base_lr, total_iters, milestones, gamma=0.1, warmup_iters=0, warmup_ratio=0.001):
    """Per-iteration lr: `base_lr` times `gamma` after each milestone iteration, with a linear warmup."""
    check_schedule_length(total_iters, "epochs x iterations per epoch (or max_iters)")
    milestones = sorted(int(m) for m in milestones)
    return [base_lr * gamma ** sum(i >= m for m in milestones) * _warmup_factor(i, warmup_iters, warmup_ratio)
            for i in range(int(total_iters))]


def warmup_poly_schedule(base_lr, total_iters, power=0.9, min_lr=0.0, warmup_iters=0, warmup_ratio=1e-6):
    """Per-iteration lr: polynomial decay from `base_lr` to `min_lr` over `total_iters`, with a linear warmup."""
    total_iters = int(total_iters)
    check_schedule_length(total_iters, "total_iters")
    return [((base_lr - min_lr) * (1.0 - i / total_iters) ** power + min_lr)
            * _warmup_factor(i, warmup_iters, warmup_ratio) for i in range(total_iters)]
