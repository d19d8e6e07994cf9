"""Builders of the detection task: a RetinaNet from a checked config (`build_retinanet`), its loss-wrapped training
network (`training_network`, the same pair of names in every task's build.py), and a RetinaNet with
the weights of a whole-detector checkpoint (a training checkpoint of ours, an official PVT RetinaNet release or an
mmdetection 3.x file) for evaluation, inference and export."""
import os

from ..checkpoint.whole_model import (NATIVE, load_whole_model, native_classifier_outputs, print_report,
                                     read_whole_model_info)
from ..class_names import checked_category_ids, checked_class_names
from ..engine.checkpoints import read_checkpoint_meta
from ..engine.config_fields import config_for_checkpoint
from ..engine.run_setup import set_device_and_mode
from ..engine.weights import build_backbone
from ..errors import CheckpointError, ConfigError, PVTDenseError
from ..models.fpn import build_neck
from .anchors import AnchorGenerator
from .assigner import MaxIoUAssigner
from .checkpoint import DETECTION_LAYOUT
from .detector import RetinaNet, RetinaNetWithLoss
from .retinanet_head import RetinaNetHead


def build_detection_neck(backbone, cfg):
    """mmdetection's RetinaNet FPN: backbone stages from `neck_first_stage` on, `neck_num_outs` levels, the
    extra levels by stride-2 convs on the last backbone map ("on_input")."""
    stages = list(cfg.out_indices)
    if cfg.neck_first_stage not in stages:
        raise ConfigError(f"neck_first_stage {cfg.neck_first_stage} is not among the backbone's out_indices "
                          f"{stages}")
    return build_neck(backbone, cfg.neck, out_channels=cfg.neck_channels,
                      start_level=stages.index(cfg.neck_first_stage), num_outs=cfg.neck_num_outs,
                      add_extra_convs=cfg.neck_extra_convs)


def build_retinanet_head(neck, cfg, num_classes):
    if len(set(neck.out_channels)) != 1:
        raise ConfigError(f"the RetinaNet head is shared across levels and needs equal channels, the neck gives "
                          f"{neck.out_channels}")
    return RetinaNetHead(neck.out_channels[0], num_classes, num_anchors=len(cfg.anchor_ratios) *
                         cfg.anchor_scales_per_octave, feat_channels=cfg.head_channels,
                         stacked_convs=cfg.head_stacked_convs, prior_prob=cfg.head_prior_prob)


HEAD_BUILDERS = {"retinanet": build_retinanet_head}

# The attribute under which RetinaNetWithLoss holds its detector, hence the prefix of every detector weight.
TRAINING_PREFIX = "detector."


def build_retinanet(cfg, num_classes=None, load_pretrained=True):
    """The detector from a checked config. `load_pretrained=False` skips the backbone's ImageNet weights
    (evaluation loads a whole detector checkpoint instead). Its parameters carry the names its training network
    gives them and checkpoints use ('detector.backbone...'), whether or not it is ever wrapped in one."""
    if not load_pretrained and cfg.pretrained:
        cfg = type(cfg)(cfg, pretrained="")
    backbone = build_backbone(cfg)
    neck = build_detection_neck(backbone, cfg)
    head = HEAD_BUILDERS[cfg.head](neck, cfg, num_classes or cfg.num_classes)
    anchors = AnchorGenerator(neck.strides, cfg.anchor_octave_base_scale, cfg.anchor_scales_per_octave,
                              tuple(cfg.anchor_ratios))
    detector = RetinaNet(backbone, neck, head, anchors)
    # RetinaNetWithLoss prefixes its detector's names (MindSpore's auto_prefix); naming them so here already lets
    # a detector built for evaluation read training checkpoints, and wrapping it later changes nothing.
    detector.update_parameters_name(TRAINING_PREFIX)
    return detector


def training_network(detector, cfg):
    """The detector with its anchor assigner and losses: what the train step differentiates."""
    assigner = MaxIoUAssigner(cfg.pos_iou_thr, cfg.neg_iou_thr, cfg.min_pos_iou)
    return RetinaNetWithLoss(detector, assigner, cfg.focal_alpha, cfg.focal_gamma, cfg.box_loss_weight)


def load_detector(cfg, ckpt_path, num_classes=None):
    """A RetinaNet built from the config with the weights of a whole-detector checkpoint: a training checkpoint
    of ours, an official PVT RetinaNet release or an mmdetection 3.x file (strict: every detector weight must be
    in the file with its shape). See `load_detector_with_report`."""
    return load_detector_with_report(cfg, ckpt_path, num_classes)[0]


def load_detector_with_report(cfg, ckpt_path, num_classes=None):
    """(detector, `WholeModelLoadReport`); the backbone's LayerNorm eps follows the checkpoint (config 'auto')."""
    set_device_and_mode(cfg)
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise PVTDenseError(f"checkpoint not found: {ckpt_path!r}")
    cfg, _ = config_for_checkpoint(cfg, ckpt_path)
    detector = build_retinanet(cfg, num_classes, load_pretrained=False)
    report = load_whole_model(detector, ckpt_path)
    print_report(report)
    detector.set_train(False)
    return detector, report


def load_detector_with_names(cfg, ckpt_path):
    """(detector, class names, COCO category ids). A training checkpoint of ours records its names (and is built
    with that many classes); an OpenMMLab file gives its meta's names, or COCO's for 80 classes, and must have
    the config's num_classes. Falls back to "0".."K-1".

    A native file's names and ids are checked (`pvt_dense.class_names`) and their count against the classifier's
    shape in the file before a model is built: a file naming 100 000 classes for a 3-class head is refused
    without building a 100 000-class head first."""
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise PVTDenseError(f"checkpoint not found: {ckpt_path!r}")
    info = read_whole_model_info(ckpt_path)
    if info.source_format == NATIVE:
        try:
            meta = read_checkpoint_meta(ckpt_path)
        except PVTDenseError:
            meta = {}
        names = checked_class_names(meta.get("class_names"), ckpt_path)
        count = len(names) if names else cfg.num_classes
        category_ids = checked_category_ids(meta.get("category_ids"), count, ckpt_path)
        anchors = len(cfg.anchor_ratios) * cfg.anchor_scales_per_octave
        classifier = native_classifier_outputs(ckpt_path, DETECTION_LAYOUT)
        if classifier is not None and classifier[1] != anchors * count:
            name, outputs = classifier
            held = f"{outputs // anchors} classes" if outputs % anchors == 0 else "no whole number of classes"
            raise CheckpointError(f"{ckpt_path}: its metadata names {count} classes but its classifier {name} has "
                                  f"{outputs} outputs per location ({held} at {anchors} anchors)")
        detector = load_detector(cfg, ckpt_path, count)
        return detector, names or [str(i) for i in range(count)], category_ids
    detector, report = load_detector_with_report(cfg, ckpt_path)
    names = report.class_names or [str(i) for i in range(detector.num_classes)]
    return detector, list(names), None
