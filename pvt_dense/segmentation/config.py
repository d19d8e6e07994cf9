"""The segmentation config: the shared run and backbone keys plus the Semantic FPN recipe's own, its checks and the
values derived from it. See configs/segmentation/ for the four ADE20K recipes."""
from ..config import Field, load_config
from ..engine.config_fields import BACKBONE_FIELDS, LOAD_FROM_FIELD, RUN_FIELDS
from ..errors import ConfigError
from ..models.fpn import NECKS
from .ade20k import ADE20K_CLASSES
from .build import HEAD_BUILDERS


SEGMENTATION_FIELDS = {
    # data
    "dataset": Field("ade20k", str, "data_dir layout: images/<split>/*.jpg + annotations/<split>/*.png",
                     choices=("ade20k",)),
    "data_dir": Field("./data/ADEChallengeData2016", str),
    "train_split": Field("training", str),
    "val_split": Field("validation", str),
    "num_classes": Field(150, int, low=1, high=255),
    "reduce_zero_label": Field(True, bool, "label 0 is 'other' and ignored; k becomes class k-1 (ADE20K)"),
    "class_names": Field([], list, "one name per class for tables ([]: ADE20K's names for 150 classes, else "
                         "numbers)", item=str),
    # model
    "neck": Field("fpn", str, choices=tuple(NECKS)),
    "neck_channels": Field(256, int, low=1),
    "head": Field("semantic_fpn", str, choices=tuple(HEAD_BUILDERS)),
    "head_channels": Field(128, int, low=1),
    "dropout_ratio": Field(0.1, float, low=0.0, high=0.99),
    "sync_bn": Field(True, bool, "synchronise the head's BatchNorm statistics across ranks when distributed"),
    "loss_avg_non_ignore": Field(False, bool, "divide the loss by labelled pixels only (mmseg default: all)"),
    # schedule
    "total_iters": Field(40000, int, low=1, high=10_000_000),
    "power": Field(0.9, float, "poly lr decay power", low=0.0),
    "min_lr": Field(0.0, float, low=0.0),
    "eval_interval": Field(4000, int, "iterations between evaluations on val_split (0: only at the end)", low=0),
    "max_eval_images": Field(0, int, "evaluate during training on the first N validation images (0: all)", low=0),
    "load_from": LOAD_FROM_FIELD,
    # training pipeline
    "train_scale": Field([2048, 512], list, "(long, short) bounds of the keep-ratio rescale", item=int, length=2,
                         low=1),
    "ratio_range": Field([0.5, 2.0], list, "random factor applied to train_scale", item=float, length=2,
                         low=0.01),
    "crop_size": Field([512, 512], list, "(height, width)", item=int, length=2, low=32),
    "cat_max_ratio": Field(0.75, float, "most a single class may cover of a crop (1: no limit)", low=0.0, high=1.0),
    "flip_prob": Field(0.5, float, low=0.0, high=1.0),
    "photometric": Field(True, bool, "brightness/contrast/saturation/hue distortion"),
    # test pipeline
    "test_scale": Field([2048, 512], list, "(long, short) bounds of the test rescale", item=int, length=2, low=1),
    "size_divisor": Field(32, int, "test sizes are resized to multiples of this", low=1),
    "test_mode": Field("whole", str, "'whole' image or 'slide' windows", choices=("whole", "slide")),
    "slide_crop": Field([512, 512], list, item=int, length=2, low=32),
    "slide_stride": Field([341, 341], list, item=int, length=2, low=1),
}

SEGMENTATION_SCHEMA = {**RUN_FIELDS, **BACKBONE_FIELDS, **SEGMENTATION_FIELDS}
SEGMENTATION_DEFAULTS = {"lr": 2e-4, "weight_decay": 1e-4, "batch_size": 4, "ckpt_save_dir": "./runs/segmentation"}


# Keys only the evaluation and inference tools read (a training config is checked without them).
EVAL_FIELDS = {
    "ckpt_path": Field("", str, "the segmentor checkpoint (train_seg.py's, an official PVT Semantic FPN .pth or an "
                       "mmsegmentation 1.x one)"),
}
INFER_FIELDS = {
    "ckpt_path": EVAL_FIELDS["ckpt_path"],
    "input": Field("", str, "an image, a directory of images or a .txt list of paths"),
    "output": Field("", str, "folder for masks/, color/ and overlay/"),
    "opacity": Field(0.5, float, "the overlay's blend of the colour mask", low=0.0, high=1.0),
    "overwrite": Field(False, bool, "redo images whose outputs exist"),
}


# Old key -> the key the three tasks now share for the concept; the old name still loads, with a one-line note.
RENAMED_KEYS = {"eval_max_images": "max_eval_images"}


def load_segmentation_config(path=None, overrides=(), defaults=None, extra_fields=None):
    """A checked segmentation config; `extra_fields` adds a tool's own keys (EVAL_FIELDS, INFER_FIELDS)."""
    cfg = load_config({**SEGMENTATION_SCHEMA, **(extra_fields or {})}, path, overrides,
                      defaults={**SEGMENTATION_DEFAULTS, **(defaults or {})}, renamed=RENAMED_KEYS)
    if cfg.class_names and len(cfg.class_names) != cfg.num_classes:
        raise ConfigError(f"class_names has {len(cfg.class_names)} names but num_classes is {cfg.num_classes}")
    if cfg.ratio_range[0] > cfg.ratio_range[1]:
        raise ConfigError(f"ratio_range must be [low, high] with low <= high, got {cfg.ratio_range}")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr ({cfg.min_lr}) must not exceed lr ({cfg.lr})")
    return cfg


def class_names_of(cfg):
    if cfg.class_names:
        return list(cfg.class_names)
    if cfg.num_classes == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    return [str(i) for i in range(cfg.num_classes)]


def predictor_options(cfg):
    return {"scale": tuple(cfg.test_scale), "size_divisor": cfg.size_divisor, "mode": cfg.test_mode,
            "crop_size": tuple(cfg.slide_crop), "stride": tuple(cfg.slide_stride)}


def checkpoint_class_names(cfg, report):
    """The config's class_names if it sets them, else the checkpoint's, else ADE20K's / numbers."""
    if not cfg.class_names and report.class_names and len(report.class_names) == cfg.num_classes:
        return list(report.class_names)
    return class_names_of(cfg)
