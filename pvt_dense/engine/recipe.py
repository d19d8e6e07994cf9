"""What every dense-prediction recipe (detection, segmentation) shares: the backbone keys of its config, the run
keys, the optimizer and the lr schedules.

A config selects its backbone with one word (`backbone: pvt_large`) and sets the backbone's options beside it; the
neck and heads read channels and strides from the backbone that word builds.
"""
import random

import numpy as np

from ..checkpoint.dense import load_dense_checkpoint, print_report, read_dense_checkpoint_meta
from ..config import Field
from ..errors import ConfigError
from ..models import create_backbone, list_models

BACKBONE_FIELDS = {
    "backbone": Field("pvt_tiny", str, "the PVT size; the neck and head read its channels and strides",
                      choices=tuple(list_models())),
    "pretrained": Field("", str, "backbone weights: any supported checkpoint (ImageNet classifier, official .pth, "
                        "HuggingFace, MindCV, pvt_dense .ckpt); '' starts from random weights"),
    "drop_path_rate": Field(0.1, float, "stochastic depth of the last block", low=0.0, high=0.99),
    "frozen_stages": Field(-1, int, "freeze the first k stages (-1: none)", low=-1, high=4),
    "out_indices": Field([0, 1, 2, 3], list, "backbone stages passed to the neck", item=int),
    "recompute_stages": Field([], list, "stages recomputed in the backward pass (less memory, more time)",
                              item=int),
    "backbone_norm_eps": Field("auto", str, "LayerNorm eps convention of the weights: 'official' (PVT code: 1e-5 "
                               "in patch-embedding and spatial-reduction norms), 'mmdet' (mmdetection's "
                               "PyramidVisionTransformer: 1e-6 everywhere), 'auto': from the whole-model "
                               "checkpoint loaded (ckpt_path/load_from), else official",
                               choices=("auto", "official", "mmdet")),
}

# Detection and segmentation only: a whole-model checkpoint to fine-tune from.
LOAD_FROM_FIELD = Field("", str, "start from this whole-model checkpoint's weights (ours, an official PVT release, "
                        "mmdetection 3.x / mmsegmentation 1.x); iteration and optimizer start fresh, unlike resume")

RUN_FIELDS = {
    # system
    "mode": Field(0, int, "0: GRAPH_MODE (default), 1: PYNATIVE_MODE", choices=(0, 1)),
    "distribute": Field(True, bool, "data parallel over the processes started by msrun/mpirun"),
    "device_target": Field("CPU", str, choices=("CPU", "GPU", "Ascend")),
    "seed": Field(42, int, low=0, high=2 ** 32 - 1),
    # data loading
    "batch_size": Field(2, int, "images per process", low=1, high=65536),
    "num_workers": Field(4, int, "threads preparing batches ahead of the training step", low=1),
    # optimizer (AdamW)
    "lr": Field(1e-4, float, low=0.0),
    "weight_decay": Field(1e-4, float, low=0.0),
    "eps": Field(1e-8, float, "AdamW eps (PyTorch's default)", low=0.0),
    "warmup_iters": Field(0, int, "linear warmup length in iterations", low=0),
    "warmup_ratio": Field(0.001, float, "the warmup starts at warmup_ratio * lr", low=0.0, high=1.0),
    "clip_grad_norm": Field(0.0, float, "clip the global gradient norm (0: off)", low=0.0),
    "loss_scale": Field(1.0, float, low=1.0),
    "dynamic_loss_scale": Field(False, bool),
    # run bookkeeping
    "ckpt_save_dir": Field("./runs/", str, "checkpoints, metrics.jsonl/.csv, curves.png and the resolved config"),
    "keep_checkpoint_max": Field(5, int, low=1),
    "save_interval": Field(0, int, "also checkpoint every N iterations (0: only at evaluations and the end)",
                           low=0),
    "resume": Field("auto", str, "'auto': continue from the newest checkpoint in ckpt_save_dir if any; '': start "
                    "fresh; or a checkpoint path"),
    "progress_bar": Field(True, bool),
    "log_interval": Field(50, int, "iterations between records of the training loss", low=1),
}


def check_backbone_options(cfg):
    """Errors for backbone options that the schema's per-key checks cannot see (they depend on each other)."""
    indices = list(cfg.out_indices)
    if not indices or indices != sorted(set(indices)) or not all(0 <= i <= 3 for i in indices):
        raise ConfigError(f"out_indices must be increasing stage indices in 0..3, got {indices}")
    bad = [i for i in cfg.recompute_stages if not 0 <= i <= indices[-1]]
    if bad:
        raise ConfigError(f"recompute_stages {bad} are not stages of this backbone (0..{indices[-1]})")


def build_backbone(cfg):
    """The PVT backbone a config names, with its pretrained weights loaded (strictly; classifier checkpoints drop
    their cls token, final norm and head with a note)."""
    check_backbone_options(cfg)
    return create_backbone(cfg.backbone, out_indices=tuple(cfg.out_indices), pretrained=cfg.pretrained or None,
                           drop_path_rate=cfg.drop_path_rate, frozen_stages=cfg.frozen_stages,
                           recompute_stages=tuple(cfg.recompute_stages),
                           norm_eps_style=resolve_backbone_norm_eps(cfg))


def resolve_backbone_norm_eps(cfg, checkpoint_style=None, checkpoint=""):
    """The LayerNorm eps style to build with: the config's, or with 'auto' the checkpoint's (official without one).

    A config that names one style while the checkpoint was trained with the other is an error, not a silent
    choice: the two differ by ~1e-4 in the outputs, too little to notice and enough to cost accuracy.
    """
    configured = cfg.get("backbone_norm_eps", "auto")
    if checkpoint_style is None:
        return "official" if configured == "auto" else configured
    if configured not in ("auto", checkpoint_style):
        raise ConfigError(f"backbone_norm_eps is {configured!r} but {checkpoint or 'the checkpoint'} was trained "
                          f"with the {checkpoint_style!r} LayerNorm eps; set backbone_norm_eps: {checkpoint_style} "
                          "(or auto)")
    return checkpoint_style


def config_for_checkpoint(cfg, path):
    """(cfg with `backbone_norm_eps` resolved for the checkpoint at `path`, its `DenseCheckpointInfo`).

    'auto' takes the checkpoint's style; a config that names the other style is a ConfigError.
    """
    info = read_dense_checkpoint_meta(path)
    style = resolve_backbone_norm_eps(cfg, info.norm_eps_style, path)
    return type(cfg)(cfg, backbone_norm_eps=style), info


def build_adamw(net, cfg, lr_schedule):
    """AdamW (mindcv's: bias-corrected, decoupled decay; matches torch.optim.AdamW; as one fused in-place kernel per
    parameter, see `pvt_dense.engine.optim`) over the trainable parameters, with the config's weight decay and eps,
    stepping through `lr_schedule` (one lr per iteration)."""
    from .optim import AdamW
    params = net.trainable_params()
    if not params:
        raise ConfigError("the network has no trainable parameters (is every stage frozen?)")
    return AdamW(params, learning_rate=list(lr_schedule), weight_decay=cfg.weight_decay, eps=cfg.eps)


def _warmup_factor(iteration, warmup_iters, warmup_ratio):
    """mmcv's linear warmup: the factor rises from warmup_ratio at iteration 0 towards 1 at warmup_iters."""
    if iteration >= warmup_iters:
        return 1.0
    return 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)


# Optimizers take the schedule as one lr per iteration. 10 million iterations is 25 times a 300-epoch ImageNet run at
# batch 1024 and ~110 times a COCO 1x schedule; more is a typo, which would otherwise build a list until MemoryError.
MAX_SCHEDULE_ITERS = 10_000_000
SEED_MAX = 2 ** 32 - 1  # numpy and MindSpore seeds


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


def set_seeds(seed):
    """Seed every generator a run draws from: Python's, numpy's, MindSpore's and its dataset pipeline's."""
    import mindspore as ms
    import mindspore.dataset as ds
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    ms.set_seed(seed)
    ds.config.set_seed(seed % (2 ** 32))


def set_device_and_mode(cfg):
    """The config's device (`device_target`) and execution mode (`mode` 0: GRAPH_MODE, 1: PYNATIVE_MODE), for
    training, evaluation and inference alike."""
    import mindspore as ms
    ms.set_device(cfg.device_target)
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == 0 else ms.PYNATIVE_MODE)


def init_run(cfg):
    """Device, execution mode, process group (msrun/mpirun data parallel when launched so) and seeds, for all three
    tasks; returns (rank, world_size)."""
    from .distributed import init_distributed
    set_device_and_mode(cfg)
    rank, world_size = init_distributed(cfg.distribute)
    set_seeds(cfg.seed)
    return rank, world_size


def starting_weights(cfg):
    """(cfg with its backbone eps style resolved, the `load_from` checkpoint or ''): fine-tuning starts from a
    whole-model checkpoint's weights only; a resumable run in ckpt_save_dir still takes precedence (`resume`)."""
    if cfg.load_from:
        return config_for_checkpoint(cfg, cfg.load_from)[0], cfg.load_from
    return type(cfg)(cfg, backbone_norm_eps=resolve_backbone_norm_eps(cfg)), ""


def load_starting_weights(model, checkpoint):
    """Fine-tuning: a whole-model checkpoint's weights into `model` (nothing when `checkpoint` is ''), the
    classification head skipped, with a warning, where the class count differs (mmdetection's `load_from`)."""
    if checkpoint:
        print_report(load_dense_checkpoint(model, checkpoint, skip_mismatched_classifier=True))
