"""Convert a checkpoint of any supported format into a native pvt_dense (MindSpore) checkpoint."""
import numpy as np

from ..errors import CheckpointError
from .load import LoadReport, fit_to_model, infer_model_name, native_checkpoint, save_native


def expected_native_shapes(model_name, classifier, num_classes):
    """Parameter shapes of a freshly built model, without keeping the model around."""
    from ..models import create_backbone, create_model
    net = create_model(model_name, num_classes=num_classes) if classifier else create_backbone(model_name)
    return {p.name: tuple(p.shape) for p in net.get_parameters()}


def convert_checkpoint(src, dst, model_name=None, strict=True):
    """Read `src` (official .pth, HuggingFace .bin/.safetensors, MindCV or native .ckpt), check it against the
    architecture it claims to be, and write it to `dst` in native names. Returns the `LoadReport`.

    The size is inferred from the block counts unless `model_name` is given; a classifier checkpoint stays a
    classifier (cls token, final norm and head kept).
    """
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
    save_native(kept, dst)
    report.loaded = len(kept)
    report.notes.insert(0, f"{model_name} {'classifier' if classifier else 'backbone'} -> {dst}")
    return report
