"""Conversion, an application of the layers below: a checkpoint of any supported format into a native pvt_dense
(MindSpore) checkpoint (`convert_checkpoint`), into another library's layout (`write_checkpoint_as`), and a whole
detector/segmentor checkpoint into a native one (`convert_whole_model`). Each builds the model the weights
must fit, which is why it sits above the models and the tasks rather than in `pvt_dense.checkpoint`."""
import os

import numpy as np

from .atomic import write_atomic
from .checkpoint.whole_model import DETECTOR, load_whole_model, read_whole_model_info, save_whole_model
from .checkpoint.keymaps import MINDCV, from_native, native_to_mindcv
from .checkpoint.load import LoadReport, fit_to_model, infer_model_name, native_checkpoint, save_native
from .checkpoint.safetensors_writer import safetensors_bytes
from .detection.build import build_retinanet
from .detection.config import load_detection_config
from .engine.config_fields import config_for_checkpoint
from .errors import CheckpointError
from .models import create_backbone, create_model
from .segmentation.build import build_segmentor
from .segmentation.config import load_segmentation_config


def expected_native_shapes(model_name, classifier, num_classes):
    """Parameter shapes of a freshly built model, without keeping the model around."""
    net = create_model(model_name, num_classes=num_classes) if classifier else create_backbone(model_name)
    return {p.name: tuple(p.shape) for p in net.get_parameters()}


def checked_native_state(src, model_name=None, strict=True):
    """(native float32 state of `src` checked against its architecture, `LoadReport`, model name, is classifier):
    what `convert_checkpoint` writes."""
    state, source_format, notes = native_checkpoint(src)
    inferred = infer_model_name(state)
    model_name = model_name or inferred
    if model_name is None:
        raise CheckpointError(f"cannot tell which PVT size {src} is: its block counts and widths match none of "
                              "pvt_tiny/small/medium/large, pvt_v2_b0..b5, pvt_v2_b2_li; pass the model name "
                              "explicitly")
    if inferred is not None and inferred != model_name:
        notes.append(f"the block counts say {inferred}, converting as {model_name} as asked")
    classifier = "cls_token" in state or "head.weight" in state
    num_classes = int(state["head.weight"].shape[0]) if "head.weight" in state and state["head.weight"].ndim else 0
    expected = expected_native_shapes(model_name, classifier, num_classes)
    state, fit_notes = fit_to_model(state, expected, has_cls_token=classifier)
    report = LoadReport(source_format=source_format, notes=notes + fit_notes)
    report.missing = [k for k in expected if k not in state]
    report.unexpected = [k for k in state if k not in expected]
    report.mismatched = [f"{k} {tuple(v.shape)} vs {model_name} {expected[k]}" for k, v in state.items()
                         if k in expected and tuple(v.shape) != expected[k]]
    report.non_finite = [k for k, v in state.items() if not np.isfinite(v).all()]
    if strict and not report.clean:
        raise CheckpointError(f"{src} does not fit {model_name}:\n  " + "\n  ".join(report.lines()[1:]))
    kept = {k: v.astype(np.float32) for k, v in state.items() if k in expected and tuple(v.shape) == expected[k]}
    report.loaded = len(kept)
    return kept, report, model_name, classifier


def convert_checkpoint(src, dst, model_name=None, strict=True):
    """Read `src` (official .pth, HuggingFace .bin/.safetensors, MindCV or native .ckpt), check it against the
    architecture it claims to be, and write it to `dst` in native names. Returns the `LoadReport`.

    The size is inferred from the block counts unless `model_name` is given; a classifier checkpoint stays a
    classifier (cls token, final norm and head kept).
    """
    kept, report, model_name, classifier = checked_native_state(src, model_name, strict)
    save_native(kept, dst)
    report.notes.insert(0, f"{model_name} {'classifier' if classifier else 'backbone'} -> {dst}")
    return report


WRITTEN_FILE_TYPES = (".safetensors", ".pth", ".ckpt")


def write_checkpoint_as(src, dst, fmt, model_name=None, strict=True):
    """Read `src` like `convert_checkpoint` and write it to `dst` in another library's names (`fmt`, see
    `keymaps.writable_formats`): `.safetensors` (plain tensors, no torch needed: timm, HF and
    `safetensors.torch.load_file` read it), `.pth` (a torch state dict; needs torch) or `.ckpt` (MindSpore, for
    MindCV). mmdetection's `PyramidVisionTransformerV2` is a backbone, so a classifier's head is left out with a
    note. Returns the `LoadReport`."""
    extension = os.path.splitext(os.fspath(dst))[1].lower()
    if extension not in WRITTEN_FILE_TYPES:
        raise CheckpointError(f"cannot write {dst}: the file must end in {', '.join(WRITTEN_FILE_TYPES)}")
    kept, report, model_name, classifier = checked_native_state(src, model_name, strict)
    if fmt == "mmdetection" and any(k.startswith("head.") for k in kept):
        kept = {k: v for k, v in kept.items() if not k.startswith("head.")}
        report.notes.append("mmdetection's PyramidVisionTransformerV2 is a backbone: the classifier head is not "
                            "written")
    is_v1 = any(k.endswith("pos_embed") for k in kept)
    written = native_to_mindcv(kept) if fmt == MINDCV and is_v1 else from_native(kept, fmt)
    if extension == ".safetensors":
        write_atomic(dst, safetensors_bytes(written))
    elif extension == ".pth":
        try:
            import torch
        except ImportError:
            raise CheckpointError("writing a .pth needs torch; write a .safetensors instead") from None
        def writer(handle):
            torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in written.items()}, handle)
        write_atomic(dst, writer=writer)
    else:
        save_native(written, dst)
    report.notes.insert(0, f"{model_name} {'classifier' if classifier else 'backbone'} -> {dst} in {fmt} names")
    return report


def convert_whole_model(src, dst, config=None, overrides=()):
    """Convert a whole detector/segmentor checkpoint into a native .ckpt; returns the `WholeModelLoadReport`.

    The model is built from `config` (a detection or segmentation YAML) or, without one, from the recipe's
    defaults with the checkpoint's PVT size, class count and LayerNorm eps style; every weight must fit it. The
    native file records the task, class names and the config, so the tools rebuild the same model from it.
    """
    info = read_whole_model_info(src)
    if info.task is None:
        raise CheckpointError(f"{src} is not a whole detector or segmentor checkpoint")
    inferred = [("backbone", info.model_name)] if info.model_name and config is None else []
    if info.num_classes and config is None:
        inferred.append(("num_classes", info.num_classes))
    if info.task == DETECTOR:
        cfg = load_detection_config(config, inferred + list(overrides))
    else:
        cfg = load_segmentation_config(config, inferred + list(overrides))
    cfg, _ = config_for_checkpoint(type(cfg)(cfg, pretrained=""), src)
    model = build_retinanet(cfg, load_pretrained=False) if info.task == DETECTOR else build_segmentor(cfg)
    report = load_whole_model(model, src)
    meta = {"task": info.task, "class_names": report.class_names, "config": dict(cfg), "converted_from":
            os.path.basename(os.fspath(src)), "source_format": info.source_format}
    save_whole_model(model, dst, meta)
    report.notes.append(f"wrote {dst} ({info.task}, {cfg.backbone}, {model.num_classes} classes)")
    return report
