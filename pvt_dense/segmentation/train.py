"""Semantic FPN training (iteration-based, poly lr, AdamW) on one process or many (msrun/mpirun), through the shared
`IterationLoop`: progress bar, metrics.jsonl/.csv and curves, atomic checkpoints, exact resume."""
import os

from ..config import dump_config
from ..engine.loop import IterationLoop
from ..engine.optim import build_adamw
from ..engine.run_setup import init_run
from ..engine.schedules import warmup_poly_schedule
from ..engine.weights import load_starting_weights, starting_weights
from ..engine.train_step import TrainStep, training_state_parameters
from ..errors import PVTDenseError
from .ade20k import list_samples
from .data import SegmentationBatchSource
from .evaluation import evaluate_segmentor
from .build import build_segmentor, training_network
from .config import class_names_of, predictor_options
from .segmentor import SegmentorInference
from .transforms import TrainTransform


class SegmentationRun:
    """Everything one run needs, built from a checked config (`load_segmentation_config`)."""

    def __init__(self, cfg):
        self.cfg = cfg = starting_weights(cfg)[0]
        self.rank, self.world_size = init_run(cfg)
        self.class_names = class_names_of(cfg)
        train_samples = list_samples(cfg.data_dir, cfg.train_split)
        self.val_samples = list_samples(cfg.data_dir, cfg.val_split) if self.rank == 0 else []
        if cfg.max_eval_images:
            self.val_samples = self.val_samples[:cfg.max_eval_images]
        transform = TrainTransform(cfg.train_scale, cfg.ratio_range, cfg.crop_size, cfg.cat_max_ratio,
                                   cfg.flip_prob, cfg.photometric)
        self.source = SegmentationBatchSource(train_samples, transform, cfg.num_classes, cfg.reduce_zero_label,
                                              cfg.batch_size, cfg.seed, self.rank, self.world_size)
        if self.source.steps_per_epoch < 1:
            raise PVTDenseError(f"{len(train_samples)} training images are less than one global batch of "
                                f"{cfg.batch_size} x {self.world_size}")
        # Fine-tuning from a whole model: its weights replace the pretrained backbone's, so that is not read.
        self.net = build_segmentor(cfg, synchronized_bn=cfg.sync_bn and self.world_size > 1,
                                   load_pretrained=not cfg.load_from)
        load_starting_weights(self.net, cfg.load_from)
        self.inference = SegmentorInference(self.net, upsample=False)
        self.last_evaluation = {}
        self.lr_schedule = warmup_poly_schedule(cfg.lr, cfg.total_iters, cfg.power, cfg.min_lr, cfg.warmup_iters,
                                                cfg.warmup_ratio)
        self.optimizer = build_adamw(self.net, cfg, self.lr_schedule)
        self.train_step = TrainStep(training_network(self.net, cfg),
                                    self.optimizer, loss_scale=cfg.loss_scale,
                                    dynamic_loss_scale=cfg.dynamic_loss_scale, clip_grad_norm=cfg.clip_grad_norm)
        self.train_step.set_train(True)

    def evaluate(self, iteration=None):
        result = evaluate_segmentor(self.inference, self.val_samples, self.cfg.num_classes,
                                    self.cfg.reduce_zero_label, predictor_options(self.cfg),
                                    progress=self.cfg.progress_bar, desc=f"eval @{iteration}")
        self.net.set_train(True)
        self.last_evaluation = result
        return {"mIoU": result["mIoU"], "mAcc": result["mAcc"], "aAcc": result["aAcc"]}

    def fit(self):
        cfg = self.cfg
        if self.rank == 0:
            os.makedirs(cfg.ckpt_save_dir, exist_ok=True)
            dump_config(cfg, os.path.join(cfg.ckpt_save_dir, "config.yaml"))
        loop = IterationLoop(
            self.train_step, self.source, self.lr_schedule, cfg.total_iters, cfg.ckpt_save_dir,
            training_state_parameters(self.net, self.optimizer, self.train_step),
            meta={"config": dict(cfg), "class_names": self.class_names}, evaluate=self.evaluate,
            eval_interval=cfg.eval_interval, save_interval=cfg.save_interval, metric_name="mIoU", metric_mode="max",
            keep_last=cfg.keep_checkpoint_max, resume=cfg.resume, rank=self.rank, world_size=self.world_size,
            progress_bar=cfg.progress_bar, log_interval=cfg.log_interval, prefix=f"semfpn_{cfg.backbone}",
            num_workers=cfg.num_workers)
        state = loop.run()
        state["out_of_range_label_pixels"] = self.source.out_of_range_pixels
        return dict(state, metrics=dict(self.last_evaluation), segmentor=self.net, inference=self.inference,
                    run_dir=cfg.ckpt_save_dir)


def train_segmentor(cfg):
    """Run (or resume) the training `cfg` describes; returns the loop's final state plus the last evaluation of
    this process (`metrics`: `evaluate_segmentor`'s result, per-class IoU included; empty when none ran)."""
    return SegmentationRun(cfg).fit()
