"""The ImageNet classification config: MindCV's key names (so the YAML files and command lines of MindCV's PVT page
work as they are), plus the few keys pvt_dense adds for long runs. See configs/classification/ for the four recipes."""
from ..config import Field, load_config
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError
from ..models import list_models

# The global batch the recipes' learning rates were tuned for (128 per device x 8 devices).
REFERENCE_GLOBAL_BATCH = 1024
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area", "lanczos")

CLASSIFICATION_SCHEMA = {
    # system
    "mode": Field(0, int, "0: GRAPH_MODE (default), 1: PYNATIVE_MODE", choices=(0, 1)),
    "distribute": Field(True, bool, "data parallel over the processes started by msrun/mpirun"),
    "device_target": Field("CPU", str, "CPU, GPU or Ascend", choices=("CPU", "GPU", "Ascend")),
    "seed": Field(42, int, low=0, high=2 ** 32 - 1),
    "val_while_train": Field(True, bool, "validate after every val_interval epochs"),
    "val_interval": Field(1, int, low=1),
    "log_interval": Field(100, int, "steps between log lines inside an epoch", low=1),
    # data
    "dataset": Field("imagenet", str, "ImageNet folder layout: data_dir/{train,val}/<class>/<image>",
                     choices=("imagenet",)),
    "data_dir": Field("./imagenet/", str),
    "train_split": Field("train", str),
    "val_split": Field("val", str),
    "dataset_download": Field(False, bool, "kept for MindCV configs; ImageNet cannot be downloaded",
                              choices=(False,)),
    "num_parallel_workers": Field(8, int, low=1),
    "shuffle": Field(True, bool),
    "batch_size": Field(128, int, "per process", low=1, high=65536),
    "drop_remainder": Field(True, bool),
    # augmentation (MindCV names and meanings)
    "image_resize": Field(224, int, low=32),
    "scale": Field([0.08, 1.0], list, item=float, length=2, low=0.0, high=1.0),
    "ratio": Field([0.75, 1.333], list, item=float, length=2, low=0.0),
    "hflip": Field(0.5, float, low=0.0, high=1.0),
    "vflip": Field(0.0, float, low=0.0, high=1.0),
    "interpolation": Field("bicubic", str, choices=INTERPOLATIONS),
    "auto_augment": Field(None, str, "e.g. randaug-m9-mstd0.5-inc1", optional=True),
    "re_prob": Field(0.0, float, "random erasing probability", low=0.0, high=1.0),
    "re_scale": Field([0.02, 0.33], list, item=float, length=2, low=0.0, high=1.0),
    "re_ratio": Field([0.3, 3.3], list, item=float, length=2, low=0.0),
    "re_value": Field(0, int),
    "re_max_attempts": Field(10, int, low=1),
    "mean": Field(list(IMAGENET_MEAN), list, item=float, length=3),
    "std": Field(list(IMAGENET_STD), list, item=float, length=3, low=1e-6),
    "mixup": Field(0.0, float, "mixup alpha", low=0.0),
    "cutmix": Field(0.0, float, "cutmix alpha", low=0.0),
    "cutmix_prob": Field(1.0, float, low=0.0, high=1.0),
    "crop_pct": Field(0.875, float, low=0.1, high=1.0),
    "color_jitter": Field(0.0, float, low=0.0),
    # model
    "model": Field("pvt_tiny", str, choices=tuple(list_models())),
    "num_classes": Field(1000, int, low=1),
    "pretrained": Field(False, bool, "MindCV's flag; weights cannot be downloaded here: use ckpt_path"),
    "ckpt_path": Field("", str, "initial weights (any supported checkpoint format)"),
    "drop_rate": Field(0.0, float, low=0.0, high=0.99),
    "drop_path_rate": Field(0.1, float, low=0.0, high=0.99),
    "amp_level": Field("O0", str, "O2/O3 run float16 (slower than float32 on CPU)", choices=("O0", "O1", "O2", "O3")),
    "keep_checkpoint_max": Field(10, int, low=1),
    "ckpt_save_dir": Field("./ckpt/", str),
    "ckpt_save_interval": Field(1, int, "epochs between checkpoints", low=1),
    "epoch_size": Field(300, int, low=1, high=100_000),
    "dataset_sink_mode": Field(True, bool, "kept for MindCV configs; pvt_dense feeds batches from the host"),
    # loss
    "loss": Field("CE", str, choices=("CE", "BCE")),
    "label_smoothing": Field(0.0, float, low=0.0, high=1.0),
    # lr schedule
    "scheduler": Field("warmup_cosine_decay", str,
                       choices=("warmup_cosine_decay", "cosine_decay", "constant", "step_decay", "multi_step_decay")),
    "lr": Field(5e-4, float, low=0.0),
    "min_lr": Field(1e-6, float, low=0.0),
    "warmup_epochs": Field(10, int, low=0),
    "warmup_factor": Field(0.0, float, low=0.0, high=1.0),
    "decay_epochs": Field(290, int, low=1),
    "decay_rate": Field(0.1, float, low=0.0),
    "multi_step_decay_milestones": Field([30, 60, 90], list, item=int),
    "lr_epoch_stair": Field(False, bool),
    "scale_lr_with_batch": Field(False, bool, "lr *= global batch / 1024 (MindCV's PVT page's note on batch size)"),
    # optimizer
    "opt": Field("adamw", str, choices=("adamw", "adam", "sgd", "momentum")),
    "weight_decay": Field(0.05, float, low=0.0),
    "momentum": Field(0.9, float, low=0.0, high=1.0),
    "eps": Field(1e-8, float, "AdamW eps (PyTorch's default; mindcv's default is 1e-10)", low=0.0),
    "loss_scale": Field(1.0, float, low=1.0),
    "dynamic_loss_scale": Field(False, bool),
    "filter_bias_and_bn": Field(True, bool, "no weight decay on biases and norm parameters"),
    "use_nesterov": Field(False, bool),
    "clip_grad": Field(False, bool),
    "clip_value": Field(15.0, float, "global gradient norm bound when clip_grad", low=0.0),
    "ema": Field(False, bool, "not supported by pvt_dense's loop", choices=(False,)),
    "official_recipe": Field(False, bool, "apply the official PyTorch recipe's differences: clip_grad 1.0 for "
                             "medium/large and no weight decay on biases, norms, pos embeds and the cls token"),
    # pvt_dense: long runs
    "resume": Field("auto", str, "'auto': continue from the newest checkpoint in ckpt_save_dir if any; "
                    "'': start fresh; or a checkpoint path"),
    "save_every_steps": Field(0, int, "also checkpoint every N steps, counted from the start of the run (0: only "
                              "at epoch ends)", low=0),
    "max_steps_per_epoch": Field(0, int, "cap steps per epoch (0: the whole epoch); for smoke runs", low=0),
    "progress_bar": Field(True, bool),
}


def load_classification_config(path=None, overrides=(), defaults=None):
    cfg = load_config(CLASSIFICATION_SCHEMA, path, overrides, defaults=defaults)
    if cfg.pretrained and not cfg.ckpt_path:
        raise ConfigError("pretrained: True needs weights, which cannot be downloaded here: set ckpt_path to a "
                          "checkpoint file (official .pth, HuggingFace, MindCV or pvt_dense .ckpt)")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr ({cfg.min_lr}) must not exceed lr ({cfg.lr})")
    return cfg


def effective_lr(cfg, world_size):
    """The base lr, scaled linearly with the global batch when `scale_lr_with_batch` is set."""
    if not cfg.scale_lr_with_batch:
        return cfg.lr
    return cfg.lr * cfg.batch_size * world_size / REFERENCE_GLOBAL_BATCH


def official_recipe_overrides(cfg):
    """(clip_grad, clip_value, no-decay name patterns) that the official PyTorch recipe uses for this model."""
    # classification/configs/pvt/*.py and configs/pvt_v2/*.py of whai362/PVT: clip_grad 1.0 for these sizes only.
    clip = cfg.model in ("pvt_medium", "pvt_large", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5")
    return clip, 1.0, ("pos_embed", "cls_token")
