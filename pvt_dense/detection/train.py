"""Train RetinaNet on a COCO-layout dataset with the shared iteration loop (loading a checkpoint to evaluate or
infer: `build.py`).

Epochs become iterations once the training set is read: `epochs * steps_per_epoch` iterations, lr steps at
`lr_steps` epochs, evaluation every `eval_interval_epochs` epochs. One process or data parallel under msrun/mpirun
(`init_run` joins the process group; TrainStep averages the gradients), with atomic checkpoints and exact resume.
"""
import os

from ..config import dump_config
from ..engine.loop import IterationLoop
from ..engine.optim import build_adamw
from ..engine.run_setup import init_run
from ..engine.schedules import warmup_step_schedule
from ..engine.train_step import TrainStep, training_state_parameters
from ..engine.weights import load_starting_weights, starting_weights
from .build import build_retinanet, training_network
from .data import DetectionBatchSource, open_dataset
from .evaluation import evaluate_on


class DetectionRun:
    """Everything one run needs, built from a checked config (`load_detection_config`); the same shape as
    `ClassificationRun` and `SegmentationRun`: build in `__init__`, `evaluate(iteration)`, `fit()`."""

    def __init__(self, cfg):
        self.rank, self.world_size = init_run(cfg)
        self.train_set = open_dataset(cfg, "train")
        self.val_set = open_dataset(cfg, "val") if cfg.val_ann and self.rank == 0 else None
        self.source = DetectionBatchSource(self.train_set, cfg.batch_size, cfg.max_gt, tuple(cfg.img_scale),
                                           cfg.size_divisor, cfg.flip_prob, tuple(cfg.mean), tuple(cfg.std), cfg.seed,
                                           self.rank, self.world_size, pad_grid=cfg.pad_grid)
        steps = self.source.steps_per_epoch
        self.total_iters = cfg.max_iters or cfg.epochs * steps
        self.lr_schedule = warmup_step_schedule(cfg.lr, self.total_iters, [epoch * steps for epoch in cfg.lr_steps],
                                                cfg.lr_gamma, cfg.warmup_iters, cfg.warmup_ratio)
        self.cfg = cfg = starting_weights(cfg)[0]
        self.net = build_retinanet(cfg, self.train_set.num_classes, load_pretrained=not cfg.load_from)
        load_starting_weights(self.net, cfg.load_from)
        self.train_net = training_network(self.net, cfg)
        self.optimizer = build_adamw(self.train_net, cfg, self.lr_schedule)
        self.train_step = TrainStep(self.train_net, self.optimizer, loss_scale=cfg.loss_scale,
                                    dynamic_loss_scale=cfg.dynamic_loss_scale, clip_grad_norm=cfg.clip_grad_norm)
        self.train_step.set_train(True)
        self.last_evaluation = {}

    def evaluate(self, iteration=None):
        metrics = evaluate_on(self.net, self.val_set, self.cfg)
        self.net.set_train(True)
        self.last_evaluation = dict(metrics)
        return {key: float(value) for key, value in metrics.items()}

    def fit(self):
        cfg, steps, train_set = self.cfg, self.source.steps_per_epoch, self.train_set
        if self.rank == 0:
            os.makedirs(cfg.ckpt_save_dir, exist_ok=True)
            dump_config(cfg, os.path.join(cfg.ckpt_save_dir, "config.yaml"))
            print(f"RetinaNet on {cfg.backbone}: {len(train_set)} training images ({train_set.num_classes} classes), "
                  f"{steps} iterations per epoch x {self.world_size} process(es), {self.total_iters} iterations")
        loop = IterationLoop(self.train_step, self.source, self.lr_schedule, self.total_iters, cfg.ckpt_save_dir,
                             training_state_parameters(self.train_net, self.optimizer, self.train_step),
                             meta={"config": dict(cfg), "class_names": train_set.class_names,
                                   "category_ids": train_set.category_ids},
                             evaluate=self.evaluate if self.val_set is not None else None,
                             eval_interval=cfg.eval_interval_epochs * steps, save_interval=cfg.save_interval,
                             metric_name="AP", keep_last=cfg.keep_checkpoint_max, resume=cfg.resume, rank=self.rank,
                             world_size=self.world_size, progress_bar=cfg.progress_bar,
                             log_interval=cfg.log_interval, prefix=f"retinanet_{cfg.backbone}",
                             num_workers=cfg.num_workers)
        state = loop.run()
        if self.rank == 0:
            print(f"training batches came in {len(self.source.shapes)} distinct shapes (one graph compilation each): "
                  f"{sorted(self.source.shapes)}")
        return dict(state, metrics=dict(self.last_evaluation), detector=self.net, run_dir=cfg.ckpt_save_dir)


def train_detector(cfg):
    """Train as the config says; returns the loop's final state plus the last evaluation (`metrics`)."""
    return DetectionRun(cfg).fit()
