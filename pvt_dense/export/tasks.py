"""What can be exported: `EXPORT_TASKS`, from task names to a config loader, a builder and a description of the
graph's outputs. A task's builder receives the loaded (checked) config and the checkpoint path and returns the Cell
to export in eval mode; a new task is one table line."""
from dataclasses import dataclass
from typing import Callable

from ..config import Field, load_config
from ..errors import ConfigError, PVTDenseError


class ExportError(PVTDenseError):
    """An export request is invalid (shape, task, format, output path) or the exported graph is wrong."""


@dataclass(frozen=True)
class ExportTask:
    """How to export one kind of model: `load_config(config_file_or_None, overrides, model_name_or_None)` returns a
    checked Config; `build(config, ckpt_path)` returns the Cell in eval mode; `outputs` describes what it returns."""

    load_config: Callable
    build: Callable
    outputs: str


# --- backbone -----------------------------------------------------------------------------------------------------

def _backbone_schema():
    from ..models import list_models
    return {
        "model": Field("pvt_tiny", str, choices=tuple(list_models())),
        "out_indices": Field([0, 1, 2, 3], list, "stages whose maps are outputs", item=int),
        "ckpt_path": Field("", str, "weights (any supported checkpoint format)"),
    }


def load_backbone_config(path, overrides, model_name):
    """A model name, or any YAML whose `model` (or `backbone`) names a PVT size; only those keys are read."""
    defaults = {"model": model_name} if model_name else {}
    if path:
        from ..config import read_yaml
        raw = read_yaml(path)
        name = raw.get("backbone") if isinstance(raw.get("backbone"), str) else raw.get("model")
        if name is None:
            raise ConfigError(f"{path}: no 'model' or 'backbone' key naming the PVT size to export")
        defaults = {"model": name, **({"ckpt_path": raw["ckpt_path"]} if raw.get("ckpt_path") else {})}
    return load_config(_backbone_schema(), None, overrides, defaults=defaults)


def build_backbone(config, ckpt_path):
    from ..models import create_backbone
    indices = tuple(config.out_indices)
    return create_backbone(config.model, out_indices=indices, pretrained=ckpt_path or None)


# --- classifier ---------------------------------------------------------------------------------------------------

def load_classifier_config(path, overrides, model_name):
    from ..classification.config import load_classification_config
    return load_classification_config(path, overrides, defaults={"model": model_name} if model_name else None)


def build_classifier(config, ckpt_path):
    from ..classification.build import load_classifier
    return load_classifier(config, ckpt_path)


# --- detector and segmentor ---------------------------------------------------------------------------------------

def _config_file_needed(task, path, folder):
    if not path:
        raise ExportError(f"the {task} task needs its config file: --config configs/{folder}/....yaml")


def load_detector_config(path, overrides, model_name):
    _config_file_needed("detector", path, "detection")
    from ..detection.config import load_detection_config
    return load_detection_config(path, overrides)


def build_detector(config, ckpt_path):
    """RetinaNet with the weights of a training checkpoint (or the config's backbone weights and a fresh head)."""
    if ckpt_path:
        from ..detection.build import load_detector
        return load_detector(config, ckpt_path)
    from ..detection.build import build_retinanet
    detector = build_retinanet(config)
    detector.set_train(False)
    return detector


def load_segmentor_config(path, overrides, model_name):
    _config_file_needed("segmentor", path, "segmentation")
    from ..segmentation.config import load_segmentation_config
    return load_segmentation_config(path, overrides)


def build_segmentor(config, ckpt_path):
    """Semantic FPN (BatchNorm statistics included) returning logits upsampled to the input size."""
    from ..segmentation.build import build_segmentor as build_network, load_trained_segmentor
    from ..segmentation.segmentor import SegmentorInference
    network = load_trained_segmentor(config, ckpt_path) if ckpt_path else build_network(config)
    network.set_train(False)
    return SegmentorInference(network)


EXPORT_TASKS = {
    "backbone": ExportTask(load_backbone_config, build_backbone,
                           "stage maps (N, C_i, H / s_i, W / s_i), rounded down (PVT v1) or up (v2)"),
    "classifier": ExportTask(load_classifier_config, build_classifier, "logits (N, num_classes)"),
    "detector": ExportTask(load_detector_config, build_detector,
                           "per-level class logits (N, A*K, H_l, W_l) then box deltas (N, A*4, H_l, W_l), P3..P7; "
                           "decode and NMS with pvt_dense.detection.postprocess"),
    "segmentor": ExportTask(load_segmentor_config, build_segmentor, "logits (N, num_classes, H, W)"),
}
