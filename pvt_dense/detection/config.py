"""The detection config (RetinaNet + FPN on PVT): its schema, checks and the values derived from it.

`DETECTION_SCHEMA` = the shared run keys + the backbone keys + the keys below. Defaults are the official RetinaNet
1x recipe (configs/detection/retinanet_pvt_*_fpn_1x_coco.yaml spell it out). `neck:` and `head:` name components
of `models.fpn.NECKS` / `build.HEAD_BUILDERS`; an unknown name is a ConfigError listing the valid ones.
"""
import dataclasses
import os

from ..config import Field, load_config
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..engine.config_fields import BACKBONE_FIELDS, LOAD_FROM_FIELD, RUN_FIELDS, check_backbone_options
from ..errors import ConfigError
from ..models.fpn import NECKS
from .build import HEAD_BUILDERS
from .postprocess import InferenceSettings


def _run_field(key, default):
    return dataclasses.replace(RUN_FIELDS[key], default=default)


DETECTION_SCHEMA = {
    **RUN_FIELDS,
    **BACKBONE_FIELDS,
    # the recipe's optimizer and schedule: AdamW 1e-4, wd 1e-4, 12 epochs, x0.1 at epochs 8 and 11, warmup 500
    "warmup_iters": _run_field("warmup_iters", 500),
    "epochs": Field(12, int, low=1, high=100_000),
    "lr_steps": Field([8, 11], list, "epochs after which the lr is multiplied by lr_gamma", item=int, low=0),
    "lr_gamma": Field(0.1, float, low=0.0, high=1.0),
    "max_iters": Field(0, int, "stop after this many iterations (0: epochs x iterations per epoch)", low=0,
                       high=10_000_000),
    # Dense-task intervals count iterations (eval_interval, save_interval) unless the name says epochs.
    "eval_interval_epochs": Field(1, int, "epochs between evaluations on the val set (0: only at the end)", low=0),
    "max_eval_images": Field(0, int, "evaluate on the first N val images only (0: all)", low=0),
    "load_from": LOAD_FROM_FIELD,
    # data (COCO layout, paths relative to data_dir unless absolute)
    "data_dir": Field("./coco", str, "COCO root"),
    "train_ann": Field("annotations/instances_train2017.json", str),
    "train_images": Field("train2017", str),
    "val_ann": Field("annotations/instances_val2017.json", str, "'' to train without evaluation"),
    "val_images": Field("val2017", str),
    "num_classes": Field(80, int, "must match the categories of the annotation file", low=1),
    "img_scale": Field([1333, 800], list, "(long, short) bound of the keep-ratio resize", item=int, length=2,
                       low=32),
    "size_divisor": Field(32, int, "each image is padded to a multiple of this (mmdetection's test protocol)",
                         low=1),
    "pad_grid": Field(128, int, "training batches pad to their largest image, sides rounded up to a multiple of "
                      "this (a multiple of size_divisor; bounds the compiled batch shapes)", low=1),
    "flip_prob": Field(0.5, float, low=0.0, high=1.0),
    "mean": Field(list(IMAGENET_MEAN), list, item=float, length=3),
    "std": Field(list(IMAGENET_STD), list, item=float, length=3, low=1e-6),
    "max_gt": Field(100, int, "ground truth boxes per image (padded for graph mode; more are capped)", low=1),
    # model
    "neck": Field("fpn", str, choices=tuple(NECKS)),
    "neck_first_stage": Field(1, int, "first backbone stage (0-based) the FPN uses; 1 = stride 8 (P3)", low=0,
                              high=3),
    "neck_channels": Field(256, int, low=1),
    "neck_num_outs": Field(5, int, low=1),
    "neck_extra_convs": Field("on_input", str, choices=("on_input", "on_lateral", "on_output")),
    "head": Field("retinanet", str, choices=tuple(HEAD_BUILDERS)),
    "head_channels": Field(256, int, low=1),
    "head_stacked_convs": Field(4, int, low=0),
    "head_prior_prob": Field(0.01, float, low=1e-6, high=0.5),
    "anchor_octave_base_scale": Field(4.0, float, low=1e-3),
    "anchor_scales_per_octave": Field(3, int, low=1),
    "anchor_ratios": Field([0.5, 1.0, 2.0], list, item=float, low=1e-3),
    "pos_iou_thr": Field(0.5, float, low=0.0, high=1.0),
    "neg_iou_thr": Field(0.4, float, low=0.0, high=1.0),
    "min_pos_iou": Field(0.0, float, low=0.0, high=1.0),
    "focal_alpha": Field(0.25, float, low=0.0, high=1.0),
    "focal_gamma": Field(2.0, float, low=0.0),
    "box_loss_weight": Field(1.0, float, low=0.0),
    # test
    "score_thr": Field(0.05, float, low=0.0, high=1.0),
    "nms_pre": Field(1000, int, "candidates per level before NMS", low=1),
    "nms_iou": Field(0.5, float, low=0.0, high=1.0),
    "max_per_img": Field(100, int, low=1),
}


# Keys only the evaluation and inference tools read (a training config is checked without them).
EVAL_FIELDS = {
    "ckpt_path": Field("", str, "the detector checkpoint (written by train_det.py)"),
    "results_json": Field("", str, "also write the detections as a COCO results JSON here"),
}
INFER_FIELDS = {
    "ckpt_path": EVAL_FIELDS["ckpt_path"],
    "input": Field("", str, "an image, a directory of images or a .txt list of paths"),
    "output": Field("", str, "folder for the drawn images and detections.json"),
    "draw_thr": Field(0.3, float, "draw detections with at least this score (the JSON keeps all above score_thr)",
                      low=0.0, high=1.0),
}


# Old key -> the key the three tasks now share for the concept (mmdetection 3.x / mmsegmentation 1.x names); the old
# names still load, with a one-line note.
RENAMED_KEYS = {"flip_ratio": "flip_prob", "pad_divisor": "size_divisor", "head_feat_channels": "head_channels",
                # detection's eval_interval counted epochs, segmentation's (and the loop's) iterations
                "eval_interval": "eval_interval_epochs"}


def load_detection_config(path=None, overrides=(), defaults=None, extra_fields=None):
    """A checked detection config; `extra_fields` adds a tool's own keys (EVAL_FIELDS, INFER_FIELDS)."""
    cfg = load_config({**DETECTION_SCHEMA, **(extra_fields or {})}, path, overrides, defaults=defaults,
                      renamed=RENAMED_KEYS)
    check_backbone_options(cfg)
    if cfg.neg_iou_thr > cfg.pos_iou_thr:
        raise ConfigError(f"neg_iou_thr ({cfg.neg_iou_thr}) must not exceed pos_iou_thr ({cfg.pos_iou_thr})")
    if list(cfg.lr_steps) != sorted(cfg.lr_steps):
        raise ConfigError(f"lr_steps must be increasing epochs, got {cfg.lr_steps}")
    if cfg.pad_grid % cfg.size_divisor:
        raise ConfigError(f"pad_grid ({cfg.pad_grid}) must be a multiple of size_divisor ({cfg.size_divisor})")
    if not cfg.anchor_ratios:
        raise ConfigError("anchor_ratios needs at least one ratio")
    return cfg


def resolve(cfg, key):
    """A data path of the config: absolute as written, else under data_dir."""
    value = cfg[key]
    return value if not value or os.path.isabs(value) else os.path.join(cfg.data_dir, value)


def inference_settings(cfg):
    return InferenceSettings(cfg.score_thr, cfg.nms_pre, cfg.nms_iou, cfg.max_per_img)


