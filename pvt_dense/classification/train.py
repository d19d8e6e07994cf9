"""ImageNet pretraining of the PVT classifier with the reference recipe, on one process or many (msrun/mpirun).

What is particular to classification lives here: the model, loss, optimizer and lr schedule (mindcv's), the data
(`TrainingBatches`) and top-1/top-5 evaluation. The training itself runs on the loop the three tasks share
(`pvt_dense.engine.loop.IterationLoop`): atomic checkpoints with the optimizer, loss-scale and data position for an
exact `resume: auto`, the stop on a non-finite loss that keeps the last good checkpoint, overflow counting,
progress, metrics.jsonl/.csv and curves.
"""
import os

from ..engine.loop import NonFiniteLossError  # noqa: F401  (the loop raises it; importable from here)
from ..errors import PVTDenseError
from .build import build_classifier, gradient_clip, training_network
from .config import effective_lr, official_recipe_overrides
from .evaluation import evaluate


def no_decay_names(net, filter_bias_and_norm, extra_patterns=()):
    """Names of parameters trained without weight decay: 1-D ones (biases, norm scales and shifts) when asked, and
    any whose name contains one of `extra_patterns` (the official recipe adds pos embeds and the cls token)."""
    names = set()
    for param in net.trainable_params():
        if filter_bias_and_norm and len(param.shape) <= 1:
            names.add(param.name)
        if any(pattern in param.name for pattern in extra_patterns):
            names.add(param.name)
    return names


def build_optimizer(net, cfg, lr_schedule):
    """AdamW (mindcv's, a real AdamW: bias-corrected moments, decoupled decay; fused in place by
    `pvt_dense.engine.optim`) or MindSpore's SGD/Adam, with parameter groups for weight decay. mindcv's
    `create_optimizer` is not used: it drops its `eps` argument for AdamW and cannot take extra no-decay names from
    a parameter list."""
    from mindspore import nn

    from ..engine.optim import AdamW
    extra = official_recipe_overrides(cfg)[2] if cfg.official_recipe else ()
    skip = no_decay_names(net, cfg.filter_bias_and_bn or cfg.official_recipe, extra)
    params = net.trainable_params()
    groups = [{"params": [p for p in params if p.name not in skip], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.name in skip], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]] + [{"order_params": params}]
    if cfg.opt == "adamw":
        return AdamW(groups, learning_rate=lr_schedule, eps=cfg.eps)
    if cfg.opt == "adam":
        return nn.Adam(groups, learning_rate=lr_schedule, eps=cfg.eps, use_nesterov=cfg.use_nesterov)
    return nn.Momentum(groups, learning_rate=lr_schedule, momentum=cfg.momentum if cfg.opt == "momentum" else 0.0,
                       use_nesterov=cfg.use_nesterov)


def build_lr_schedule(cfg, steps_per_epoch, world_size):
    from mindcv.scheduler import create_scheduler

    from ..engine.schedules import check_schedule_length
    check_schedule_length(steps_per_epoch * cfg.epoch_size, "epoch_size x steps per epoch")
    name = "cosine_decay" if cfg.scheduler == "warmup_cosine_decay" else cfg.scheduler
    return create_scheduler(steps_per_epoch, scheduler=name, lr=effective_lr(cfg, world_size), min_lr=cfg.min_lr,
                            warmup_epochs=cfg.warmup_epochs, warmup_factor=cfg.warmup_factor,
                            decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
                            milestones=list(cfg.multi_step_decay_milestones), num_epochs=cfg.epoch_size,
                            lr_epoch_stair=cfg.lr_epoch_stair)


class ClassificationRun:
    """Everything one classification run needs, built from a checked config (`load_classification_config`); `fit`
    runs it on the shared `IterationLoop`, an epoch being `steps_per_epoch` iterations."""

    def __init__(self, cfg):
        from ..engine.run_setup import init_run
        from ..engine.train_step import TrainStep
        from .data import ImageFolderSource, build_eval_loader, build_training_batches, scan_image_folder

        self.cfg = cfg
        self.rank, self.world_size = init_run(cfg)
        paths, labels, classes = scan_image_folder(cfg.data_dir, cfg.train_split)
        val_split = scan_image_folder(cfg.data_dir, cfg.val_split) if cfg.val_while_train else None
        if len(classes) != cfg.num_classes:
            raise PVTDenseError(f"num_classes is {cfg.num_classes} but {os.path.join(cfg.data_dir, cfg.train_split)}"
                                f" has {len(classes)} class folders; set num_classes: {len(classes)}")
        self.class_names = classes
        self.train_source = ImageFolderSource(paths, labels, seed=cfg.seed, shuffle=cfg.shuffle, rank=self.rank,
                                              world_size=self.world_size, batch_size=cfg.batch_size)
        self.batches = build_training_batches(self.train_source, cfg, cfg.num_classes)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.val_loader = None
        if val_split is not None and self.rank == 0:
            self.val_loader = build_eval_loader(ImageFolderSource(*val_split[:2], shuffle=False,
                                                                  batch_size=cfg.batch_size), cfg, cfg.num_classes)

        self.net = build_classifier(cfg)
        self.lr_schedule = build_lr_schedule(cfg, self.steps_per_epoch, self.world_size)
        self.optimizer = build_optimizer(self.net, cfg, self.lr_schedule)
        self.train_step = TrainStep(training_network(self.net, cfg), self.optimizer, loss_scale=cfg.loss_scale,
                                    dynamic_loss_scale=cfg.dynamic_loss_scale, clip_grad_norm=gradient_clip(cfg))
        self.state = None

    def state_parameters(self):
        """What a checkpoint holds: model weights, optimizer state (moments, lr step), loss-scale state."""
        from ..engine.train_step import training_state_parameters
        return training_state_parameters(self.net, self.optimizer, self.train_step)

    def evaluate(self, iteration=None):
        result = evaluate(self.net, self.val_loader)
        self.net.set_train(True)
        return {key: result[key] for key in ("top1", "top5", "loss")}

    def fit(self):
        """Train (or resume) to `epoch_size` epochs: evaluation every `val_interval` epochs, checkpoints every
        `ckpt_save_interval` epochs (and `save_every_steps` iterations), one metrics record and line per epoch."""
        from ..engine.loop import IterationLoop
        from .data import set_seeds_between_augmentations, worker_count
        cfg, epoch = self.cfg, self.steps_per_epoch
        self.net.set_train(True)
        loop = IterationLoop(
            self.train_step, self.batches, self.lr_schedule, cfg.epoch_size * epoch, cfg.ckpt_save_dir,
            self.state_parameters(), meta={"config": dict(cfg), "class_names": self.class_names},
            evaluate=self.evaluate if cfg.val_while_train else None, eval_interval=cfg.val_interval * epoch,
            save_interval=(cfg.ckpt_save_interval * epoch, cfg.save_every_steps), metric_name="top1",
            keep_last=cfg.keep_checkpoint_max, resume=cfg.resume, rank=self.rank, world_size=self.world_size,
            progress_bar=cfg.progress_bar, log_interval=epoch, index_key="epoch", line_interval=epoch,
            format_line=lambda record: format_epoch_line(record, cfg.epoch_size), prefix=cfg.model,
            on_epoch_start=lambda number: set_seeds_between_augmentations(cfg.seed * 1000 + number),
            num_workers=worker_count(cfg.num_parallel_workers))
        self.state = loop.run()
        return self.state


def format_epoch_line(record, total_epochs):
    parts = [f"epoch {record['epoch']}/{total_epochs}", f"train loss {record['train_loss']:.4f}"]
    if "val_top1" in record:
        parts += [f"val top-1 {record['val_top1']:.2f}", f"top-5 {record['val_top5']:.2f}",
                  f"val loss {record['val_loss']:.4f}"]
    parts += [f"lr {record['lr']:.3e}", f"{record['seconds']:.1f} s"]
    if record.get("overflow_steps"):
        parts.append(f"{record['overflow_steps']} overflow steps skipped")
    if record.get("skipped_samples"):
        parts.append(f"{record['skipped_samples']} unreadable images skipped")
    return " | ".join(parts)


def train_classifier(cfg):
    """Run (or resume) the training described by `cfg`; returns the final state dict."""
    return ClassificationRun(cfg).fit()
