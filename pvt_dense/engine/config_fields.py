"""The config keys every dense-prediction task (detection, segmentation) shares: the backbone's, the run's and
`load_from`, with the checks that span several keys and the backbone LayerNorm eps a checkpoint asks for.

A config selects its backbone with one word (`backbone: pvt_large`) and sets the backbone's options beside it; the
neck and heads read channels and strides from the backbone that word builds.
"""
from ..checkpoint.whole_model import read_whole_model_info
from ..config import Field
from ..errors import ConfigError
from ..models import list_models


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
    """(cfg with `backbone_norm_eps` resolved for the checkpoint at `path`, its `WholeModelInfo`).

    'auto' takes the checkpoint's style; a config that names the other style is a ConfigError.
    """
    info = read_whole_model_info(path)
    style = resolve_backbone_norm_eps(cfg, info.norm_eps_style, path)
    return type(cfg)(cfg, backbone_norm_eps=style), info
