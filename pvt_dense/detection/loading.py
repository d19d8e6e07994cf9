"""A RetinaNet with the weights of a whole-detector checkpoint, for evaluation, inference and export: a training
checkpoint of ours, an official PVT RetinaNet release or an mmdetection 3.x file."""
import os

from ..checkpoint.dense import load_dense_checkpoint, print_report
from ..errors import PVTDenseError
from .recipe import build_retinanet
from .train import evaluate_on, open_dataset


def load_detector(cfg, ckpt_path, num_classes=None):
    """A RetinaNet built from the config with the weights of a whole-detector checkpoint: a training checkpoint
    of ours, an official PVT RetinaNet release or an mmdetection 3.x file (strict: every detector weight must be
    in the file with its shape). See `load_detector_with_report`."""
    return load_detector_with_report(cfg, ckpt_path, num_classes)[0]


def load_detector_with_report(cfg, ckpt_path, num_classes=None):
    """(detector, `DenseLoadReport`); the backbone's LayerNorm eps follows the checkpoint (config 'auto')."""
    from ..engine.recipe import config_for_checkpoint, set_device_and_mode
    set_device_and_mode(cfg)
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise PVTDenseError(f"checkpoint not found: {ckpt_path!r}")
    cfg, _ = config_for_checkpoint(cfg, ckpt_path)
    detector, _ = build_retinanet(cfg, num_classes, load_pretrained=False)
    report = load_dense_checkpoint(detector, ckpt_path)
    print_report(report)
    detector.set_train(False)
    return detector, report


def evaluate_checkpoint(cfg, ckpt_path, results_json=None):
    """The 12 COCO metrics of a checkpoint on the config's val set (printed by pycocotools' summary)."""
    val_set = open_dataset(cfg, "val")
    detector = load_detector(cfg, ckpt_path, val_set.num_classes)
    return evaluate_on(detector, val_set, cfg, results_json=results_json)


def load_detector_with_names(cfg, ckpt_path):
    """(detector, class names, COCO category ids). A training checkpoint of ours records its names (and is built
    with that many classes); an OpenMMLab file gives its meta's names, or COCO's for 80 classes, and must have
    the config's num_classes. Falls back to "0".."K-1"."""
    from ..checkpoint.dense import NATIVE, read_dense_checkpoint_meta
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise PVTDenseError(f"checkpoint not found: {ckpt_path!r}")
    info = read_dense_checkpoint_meta(ckpt_path)
    if info.source_format == NATIVE:
        from ..engine.checkpoints import read_checkpoint_meta
        try:
            meta = read_checkpoint_meta(ckpt_path)
        except PVTDenseError:
            meta = {}
        names = meta.get("class_names") or [str(i) for i in range(cfg.num_classes)]
        detector = load_detector(cfg, ckpt_path, len(names))
        return detector, list(names), meta.get("category_ids")
    detector, report = load_detector_with_report(cfg, ckpt_path)
    names = report.class_names or [str(i) for i in range(detector.num_classes)]
    return detector, list(names), None
