"""Builders of the segmentation task: a Semantic FPN `EncoderDecoder` from a checked config (`build_segmentor`),
its loss-wrapped training network (`training_network`, the same pair of names in every task's build.py), and one
with every
weight of a whole-model checkpoint (a training checkpoint of ours, an official PVT Semantic FPN release or an
mmsegmentation 1.x file) for evaluation, inference and export."""
from ..checkpoint.whole_model import load_whole_model, print_report
from ..engine.config_fields import config_for_checkpoint
from ..engine.run_setup import set_device_and_mode
from ..engine.weights import build_backbone
from ..errors import ConfigError
from ..models.fpn import NECKS, build_neck
from .segmentor import EncoderDecoder, SegmentorWithLoss
from .semfpn_head import SemanticFPNHead


def _semantic_fpn(neck, cfg, synchronized_bn):
    return SemanticFPNHead(neck.out_channels, neck.strides, cfg.num_classes, channels=cfg.head_channels,
                           dropout_ratio=cfg.dropout_ratio, synchronized_bn=synchronized_bn)


HEAD_BUILDERS = {"semantic_fpn": _semantic_fpn}


def build_segmentor(cfg, synchronized_bn=False, backbone=None, load_pretrained=True):
    """Backbone (with its pretrained weights unless `load_pretrained=False`) + neck + head as an `EncoderDecoder`,
    from the config's names."""
    if not load_pretrained and cfg.pretrained:
        cfg = type(cfg)(cfg, pretrained="")
    for kind, name, table in (("neck", cfg.neck, NECKS), ("head", cfg.head, HEAD_BUILDERS)):
        if name not in table:
            raise ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(table))}")
    backbone = build_backbone(cfg) if backbone is None else backbone
    # Semantic FPN uses every backbone map and adds no extra level.
    neck = build_neck(backbone, cfg.neck, out_channels=cfg.neck_channels, num_outs=len(backbone.out_channels))
    head = HEAD_BUILDERS[cfg.head](neck, cfg, synchronized_bn)
    return EncoderDecoder(backbone, neck, head)


def training_network(segmentor, cfg):
    """The segmentor with its cross-entropy loss: what the train step differentiates (it keeps the segmentor's
    parameter names)."""
    return SegmentorWithLoss(segmentor, avg_non_ignore=cfg.loss_avg_non_ignore)


def load_trained_segmentor(cfg, ckpt_path):
    """The segmentor of `cfg` with every weight (BatchNorm statistics included) from a whole-model checkpoint: a
    training checkpoint of ours, an official PVT Semantic FPN release or an mmsegmentation 1.x file. The config's
    `pretrained` backbone file is not needed, and the backbone's LayerNorm eps follows the checkpoint ('auto')."""
    return load_trained_segmentor_with_report(cfg, ckpt_path)[0]


def load_trained_segmentor_with_report(cfg, ckpt_path):
    """(segmentor, `WholeModelLoadReport`); `report.class_names` are the checkpoint's (None if it has none)."""
    set_device_and_mode(cfg)
    cfg, _ = config_for_checkpoint(cfg, ckpt_path)
    net = build_segmentor(cfg, load_pretrained=False)
    report = load_whole_model(net, ckpt_path)
    print_report(report)
    net.set_train(False)
    return net, report
