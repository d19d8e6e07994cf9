"""Whole RetinaNet and Semantic FPN checkpoints (backbone + FPN + head) from pvt_dense and from OpenMMLab.

Sources
-------
``native``             a pvt_dense .ckpt written by train_det.py / train_seg.py / convert_weights.py.
``mmlab_official_pvt`` the official PVT releases (whai362/PVT, trained with mmdetection 2.x / mmsegmentation
                       0.x): ``{"meta": {"CLASSES": ...}, "state_dict": ...}`` with the backbone under ``backbone.``
                       in the official PVT names (v1: ``patch_embed1``, ``pos_embed1``, ``block1.0...``; v2 from
                       the v2 branch: ``patch_embed1``, ``block1.0.mlp.dwconv.dwconv``, ``norm1``).
``mmlab_mmdet_pvt``    the same models with mmdetection's own ``PyramidVisionTransformer`` backbone
                       (``backbone.layers.{s}.0`` patch embedding, ``backbone.layers.{s}.1.0.pos_embed``, encoder
                       layers ``backbone.layers.{s}.1.{k}`` with ``nn.MultiheadAttention``), as mmdetection 3.x /
                       mmsegmentation 1.x save them (class names under ``meta.dataset_meta.classes``).
``mmlab_mmdet_pvt_v2`` mmdetection's ``PyramidVisionTransformerV2`` backbone (``backbone.layers.{s}.0`` patch
                       embedding, blocks ``backbone.layers.{s}.1.{j}`` with a MixFFN ``ffn.layers.{0,1,4}``, the
                       stage norm ``backbone.layers.{s}.2``): mmdetection's published RetinaNet-PVTv2 files.

The neck and heads are named as mmdetection/mmsegmentation name them in every OpenMMLab file: ``neck.lateral_convs.
{i}.conv``, ``neck.fpn_convs.{i}.conv`` (the extra P6/P7 convs appended there), ``bbox_head.{cls,reg}_convs.{i}.conv``,
``bbox_head.retina_{cls,reg}``, ``decode_head.scale_heads.{i}.{j}.{conv,bn}`` and ``decode_head.conv_seg``.

mmdetection's PyramidVisionTransformer and PyramidVisionTransformerV2 compute their patch-embedding and
spatial-reduction LayerNorms with eps 1e-6 (mmdet 3.3 `norm_cfg=dict(type='LN', eps=1e-6)`, every norm), the
official code with 1e-5 (`pvt_dense.models.pvt.NORM_EPS_STYLES`). Every checkpoint says which it needs
(`WholeModelInfo.norm_eps_style`), and loading one into a backbone built with the other is an error.

Files are read with the restricted unpickler of `torch_reader`: nothing in them is executed.
"""
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..atomic import publish, temp_path_for
from ..class_names import checked_class_names, printable
from ..errors import CheckpointError
from ..messages import examples
from .keymaps import to_native
from .keymaps_mmdet import mmdet_pvt_to_official, neck_name
from .keymaps_v2 import MMDETECTION
from .load import check_raw_state, check_weight_dtypes, fit_to_model, sniff_format
from .mindspore_ckpt import load_mindspore_checkpoint
from .native_file import META_KEY, load_checkpoint_into, save_entries
from .sizes import infer_model_name
from .torch_reader import read_torch_checkpoint

NATIVE = "native"
MMLAB_OFFICIAL_PVT = "mmlab_official_pvt"
MMLAB_MMDET_PVT = "mmlab_mmdet_pvt"
MMLAB_MMDET_PVT_V2 = "mmlab_mmdet_pvt_v2"
SOURCE_FORMATS = (NATIVE, MMLAB_OFFICIAL_PVT, MMLAB_MMDET_PVT, MMLAB_MMDET_PVT_V2)
MMDET_LAYOUTS = (MMLAB_MMDET_PVT, MMLAB_MMDET_PVT_V2)  # backbones built with mmdet's LayerNorm eps (1e-6)

DETECTOR = "detector"
SEGMENTOR = "segmentor"
PARTS = ("backbone", "neck", "head")

_SOURCE_DESCRIPTIONS = {
    NATIVE: "pvt_dense checkpoint",
    MMLAB_OFFICIAL_PVT: "OpenMMLab checkpoint with the official PVT backbone names",
    MMLAB_MMDET_PVT: "OpenMMLab checkpoint with mmdetection's PyramidVisionTransformer backbone",
    MMLAB_MMDET_PVT_V2: "OpenMMLab checkpoint with mmdetection's PyramidVisionTransformerV2 backbone",
}


@dataclass
class WholeModelInfo:
    """What a whole-model checkpoint is, read before a model is built for it."""

    path: str
    source_format: str
    task: Optional[str]  # DETECTOR, SEGMENTOR, or None for a native file without metadata
    class_names: Optional[List[str]]  # None when the file does not record them
    norm_eps_style: str  # "official" or "mmdet": the LayerNorm eps the backbone must be built with
    model_name: Optional[str] = None  # pvt_tiny/small/medium/large from the block counts (OpenMMLab files)
    num_classes: Optional[int] = None  # from the classifier's shape (OpenMMLab files)
    framework: str = ""  # e.g. "mmdet 2.x", "mmseg 1.x", from the meta


@dataclass
class WholeModelLoadReport:
    """What a whole-model checkpoint did to a model: mapped tensors per part, notes, class names."""

    source_format: str
    path: str = ""
    class_names: Optional[List[str]] = None
    mapped: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    notes: List[str] = field(default_factory=list)
    norm_eps_style: str = "official"
    warnings: List[str] = field(default_factory=list)  # what was not loaded on purpose (`load_whole_model`)

    @property
    def loaded(self):
        return sum(self.mapped.values())

    def lines(self):
        counts = ", ".join(f"{part} {self.mapped.get(part, 0)}" for part in PARTS)
        out = [f"loaded {self.loaded} tensors from {self.path or 'the checkpoint'} "
               f"({_SOURCE_DESCRIPTIONS.get(self.source_format, self.source_format)}): {counts}",
               f"backbone LayerNorm eps: {self.norm_eps_style}"]
        if self.class_names is not None:
            # Names come from the file: escaped and cut, so that none can forge or flood a line of the report.
            shown = ", ".join(printable(name, 40) for name in self.class_names[:5]) + (
                ", ..." if len(self.class_names) > 5 else "")
            out.append(f"{len(self.class_names)} classes: {shown}")
        out += [f"note: {note}" for note in self.notes]
        return out

    def __str__(self):
        return "\n".join(self.lines())


# ------------------------------------------------------------------------------------------------------- reading


def _plain_names(value, label, key):
    """A list of strings as class names, checked against `checked_class_names`' bounds (CheckpointError naming
    `label` and `key`); None for anything else (OpenMMLab metas hold all kinds of things under other tools' keys)."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and value:
        return checked_class_names(value, label, key)
    return None


def _mmlab_class_names(meta, label=""):
    """Class names from a 2.x meta (`CLASSES`) or a 3.x one (`dataset_meta.classes`)."""
    if not isinstance(meta, dict):
        return None
    names = _plain_names(meta.get("CLASSES"), label, "CLASSES")
    dataset_meta = meta.get("dataset_meta")
    if names is None and isinstance(dataset_meta, dict):
        names = _plain_names(dataset_meta.get("classes"), label, "dataset_meta.classes")
    return names


def _mmlab_framework(meta, task):
    if not isinstance(meta, dict):
        return ""
    for key in ("mmdet_version", "mmseg_version"):
        if isinstance(meta.get(key), str):
            return f"{key.split('_')[0]} {printable(meta[key], 40)}"
    if isinstance(meta.get("dataset_meta"), dict) or isinstance(meta.get("mmengine_version"), str):
        return "mmdet 3.x" if task == DETECTOR else "mmseg 1.x"
    return ""


def _read_mmlab(path):
    """(state dict, meta) of an OpenMMLab torch.save file: {"meta": ..., "state_dict": ...} or a bare state dict."""
    top = read_torch_checkpoint(path)
    if not isinstance(top, dict):
        raise CheckpointError(f"{path} holds {type(top).__name__}, not a checkpoint dict")
    state = top.get("state_dict", top)
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
        raise CheckpointError(f"{path} has no 'state_dict' of name -> tensor; its top-level keys are "
                              f"{examples(sorted(map(str, top)), 6)}")
    # The checks every backbone file gets (names, numeric data, floating-point weights; BatchNorm
    # num_batches_tracked counters are integers).
    check_raw_state(state, path)
    check_weight_dtypes(state, path)
    if any(k.startswith("module.") for k in state):
        stripped = {}
        for key, value in state.items():
            short = key[len("module."):] if key.startswith("module.") else key
            if short in stripped:
                # Two copies of one weight: neither may silently win.
                raise CheckpointError(f"{path} has two tensors named {short!r} once the DataParallel 'module.' "
                                      "prefix is dropped")
            stripped[short] = value
        state = stripped
    return state, top.get("meta") if isinstance(top.get("meta"), dict) else {}


def _mmlab_task(state, path):
    if any(k.startswith("bbox_head.") for k in state):
        return DETECTOR
    if any(k.startswith("decode_head.") for k in state):
        return SEGMENTOR
    raise CheckpointError(f"{path} is neither a detector (no 'bbox_head.' keys) nor a segmentor (no "
                          f"'decode_head.' keys); its keys begin {examples(list(state)[:6], 6)}")


_MMDET_V2_DWCONV = re.compile(r"^layers\.\d+\.1\.\d+\.ffn\.layers\.1\.weight$")


def _backbone_layout(backbone_keys):
    """mmdetection's names (``layers.``) are v2 when an encoder layer has MixFFN's depth-wise conv; official names
    (v1 or v2) are told apart later, by `to_native`'s format detection."""
    if not any(k.startswith("layers.") for k in backbone_keys):
        return MMLAB_OFFICIAL_PVT
    return MMLAB_MMDET_PVT_V2 if any(_MMDET_V2_DWCONV.match(k) for k in backbone_keys) else MMLAB_MMDET_PVT


def _read_native_meta(path):

    try:
        stored = load_mindspore_checkpoint(path, choice_func=lambda name: name == META_KEY)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError with C++ traces
        text = str(err).strip()
        if "empty after filter" in text:
            return {}  # a plain mindspore.save_checkpoint file: weights only, no pvt_dense metadata
        raise CheckpointError(f"cannot read checkpoint {path}: {text.splitlines()[0] if text else err!r}") from None
    try:
        meta = json.loads(stored[META_KEY]) if isinstance(stored.get(META_KEY), str) else {}
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {err}") from None
    return meta if isinstance(meta, dict) else {}


def native_norm_eps_style(meta, label="the checkpoint"):
    """The eps style a native checkpoint's backbone was trained with (files from before the option: official)."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    style = config.get("backbone_norm_eps") or meta.get("backbone_norm_eps") or "official"
    if style not in ("auto", "official", "mmdet"):
        raise CheckpointError(f"{label}: its metadata's backbone_norm_eps is {printable(repr(style), 40)}, not "
                              "'official' or 'mmdet'")
    return "official" if style == "auto" else style


def read_whole_model_info(path):
    """A `WholeModelInfo` for a whole-model checkpoint: its source, task, class names and backbone eps style,
    read without building a model (tools use it to build the right one)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if sniff_format(path) != "torch":
        meta = _read_native_meta(path)
        task = meta.get("task") if meta.get("task") in (DETECTOR, SEGMENTOR) else None
        return WholeModelInfo(path, NATIVE, task, checked_class_names(meta.get("class_names"), path),
                              native_norm_eps_style(meta, path), framework="pvt_dense")
    state, meta = _read_mmlab(path)
    return _mmlab_info(path, state, meta)


def _mmlab_info(path, state, meta):
    task = _mmlab_task(state, path)
    backbone_keys = [k[len("backbone."):] for k in state if k.startswith("backbone.")]
    if not backbone_keys:
        raise CheckpointError(f"{path} has no 'backbone.' keys")
    layout = _backbone_layout(backbone_keys)
    native_backbone, _ = _backbone_to_native({k: state["backbone." + k] for k in backbone_keys}, layout, path)
    classifier = state.get("bbox_head.retina_cls.weight" if task == DETECTOR else "decode_head.conv_seg.weight")
    num_classes = None
    if classifier is not None:
        outputs = int(classifier.shape[0])
        anchors = _retina_anchors(state) if task == DETECTOR else 1
        num_classes = outputs // anchors if anchors and outputs % anchors == 0 else None
    return WholeModelInfo(path, layout, task, _mmlab_class_names(meta, path),
                               "mmdet" if layout in MMDET_LAYOUTS else "official",
                               model_name=infer_model_name(native_backbone), num_classes=num_classes,
                               framework=_mmlab_framework(meta, task))


def _retina_anchors(state):
    reg = state.get("bbox_head.retina_reg.weight")
    return int(reg.shape[0]) // 4 if reg is not None else None


def _backbone_to_native(backbone_state, layout, label):
    """(native backbone state, notes). mmdet's v1 names go through `mmdet_pvt_to_official`; official v1/v2 names
    and mmdet's v2 names are `to_native` formats (`keymaps_v2`'s ``mmdetection`` table for the latter), and the
    format it finds must be the one the layout promised."""
    if layout == MMLAB_MMDET_PVT:
        backbone_state = mmdet_pvt_to_official(backbone_state, label)
    try:
        native, notes = to_native(backbone_state)
    except CheckpointError as err:
        raise CheckpointError(f"{label}: its backbone keys are not PVT weights: {err}") from None
    found = notes[0][len("format: "):] if notes and notes[0].startswith("format: ") else ""
    if (layout == MMLAB_MMDET_PVT_V2) != (MMDETECTION in found):
        raise CheckpointError(f"{label}: its backbone keys read as {found or 'an unknown format'}, not as "
                              f"{_SOURCE_DESCRIPTIONS[layout]}")
    return native, notes


# --------------------------------------------------------------------------------------------------- the loader


@dataclass(frozen=True)
class HeadLayout:
    """What a task hands this generic whole-model loader: its head's key map, classifier parameters and default
    class names (`pvt_dense.detection.checkpoint`, `pvt_dense.segmentation.checkpoint`). A model class carries its
    task's layout as `checkpoint_layout`."""

    task: str  # DETECTOR or SEGMENTOR
    # An OpenMMLab head key ('bbox_head.' / 'decode_head.') -> our head's name; '' drops it knowingly; None: no place.
    head_name: Callable[[str], Optional[str]]
    # The tensors whose shape follows the class count: what fine-tuning on another dataset re-initialises.
    classifier_params: Tuple[str, ...]
    default_class_names: Tuple[str, ...]  # used for a file without names whose class count is theirs
    default_names_label: str  # e.g. "COCO", for the note saying so


def head_layout(model):
    """The `HeadLayout` of our RetinaNet / EncoderDecoder (anything with a backbone, neck, head and a layout)."""
    layout = getattr(model, "checkpoint_layout", None)
    if not isinstance(layout, HeadLayout):
        raise CheckpointError(f"load_whole_model needs a RetinaNet or an EncoderDecoder, got "
                              f"{type(model).__name__}")
    return layout


def _model_params(model):
    """Structural name (e.g. 'head.retina_cls.weight') -> Parameter, whatever prefix the Parameters' own names
    carry (a detector built inside its training network names them 'detector.head...')."""
    return {name: param for name, param in model.parameters_and_names()}


def _model_norm_eps_style(model):
    spec = getattr(model.backbone, "spec", None)
    return getattr(spec, "norm_eps_style", "official")


def _part(name):
    return name.split(".", 1)[0]


def _classifier_check(task, model, state, info):
    """A clear message for the commonest misfit: the config's class count is not the checkpoint's."""
    if info.num_classes is not None and info.num_classes != model.num_classes:
        key = "bbox_head.retina_cls.weight" if task == DETECTOR else "decode_head.conv_seg.weight"
        raise CheckpointError(f"{info.path} predicts {info.num_classes} classes ({key} has shape "
                              f"{tuple(state[key].shape)}) but the model has {model.num_classes}; set num_classes: "
                              f"{info.num_classes}")
    if info.class_names is not None and len(info.class_names) != model.num_classes:
        raise CheckpointError(f"{info.path} names {len(info.class_names)} classes in its meta but the model has "
                              f"{model.num_classes}; set num_classes: {len(info.class_names)}")


def _default_class_names(layout, num_classes):
    defaults = layout.default_class_names
    return list(defaults) if num_classes == len(defaults) else None


def _classifier_skip_warning(path, task, mismatched, model):
    return (f"{path} classifies into another number of classes than the model ({model.num_classes}): its "
            f"classification head is not loaded and starts from its initialisation (mmdetection's load_from does "
            f"the same): {', '.join(mismatched)}")


def mmlab_to_model_state(model, path, state, info, strict=True, skip_mismatched_classifier=False):
    """(state keyed by the model's structural names, per-part counts, notes) for an OpenMMLab state dict.

    Raises CheckpointError naming every key that is unexpected, missing or of the wrong shape (with `strict`).
    With `skip_mismatched_classifier`, classification-head tensors (the layout's `classifier_params`) of another
    shape are left out with a note starting 'warning:' instead (fine-tuning on another class count).
    """
    layout = head_layout(model)
    task = layout.task
    if info.task != task:
        raise CheckpointError(f"{path} is a {info.task} checkpoint; the model is a {task}")
    params = _model_params(model)
    expected = {name: tuple(p.shape) for name, p in params.items()}
    notes = []
    backbone_raw = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    native_backbone, backbone_notes = _backbone_to_native(backbone_raw, info.source_format, path)
    backbone_expected = {k[len("backbone."):]: v for k, v in expected.items() if k.startswith("backbone.")}
    native_backbone = dict(native_backbone)
    for key, value in list(native_backbone.items()):
        # The official detection/segmentation code keeps the classifier's cls slot in the last position embedding.
        if key.endswith("pos_embed") and key in backbone_expected and value.ndim == 3 and \
                value.shape[1] == backbone_expected[key][1] + 1:
            native_backbone[key] = np.ascontiguousarray(value[:, 1:])
            notes.append(f"dropped the cls slot of backbone.{key} (the official PVT code keeps it)")
    native_backbone, fit_notes = fit_to_model(native_backbone, backbone_expected, has_cls_token=False)
    notes += [n for n in backbone_notes + fit_notes if not n.startswith("format:")]
    if info.source_format == MMLAB_MMDET_PVT:
        notes.append("backbone: mmdetection PyramidVisionTransformer -> PVT (in_proj split into q and kv, 1x1-conv "
                     "FFN weights flattened)")
    elif info.source_format == MMLAB_MMDET_PVT_V2:
        notes.append("backbone: mmdetection PyramidVisionTransformerV2 -> PVT v2 (in_proj split into q and kv, "
                     "MixFFN 1x1 convs flattened)")

    out = {"backbone." + k: v for k, v in native_backbone.items()}
    origin = {"backbone." + k: "backbone (converted)" for k in native_backbone}
    used_levels = getattr(model.neck, "used_levels", 0)
    unexpected, dropped = [], []
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        if key.startswith("neck."):
            name = neck_name(key, used_levels)
        elif key.startswith(("bbox_head.", "decode_head.")):
            name = layout.head_name(key)
        else:
            name = None
        if name == "":
            dropped.append(key)
            continue
        if name is None or name in out:
            unexpected.append(key)
            continue
        out[name] = np.asarray(value)
        origin[name] = key
    if dropped:
        notes.append(f"ignored {len(dropped)} BatchNorm num_batches_tracked counters (MindSpore keeps none; "
                     "momentum is fixed)")
    if skip_mismatched_classifier:
        skipped = [name for name in layout.classifier_params
                   if name in out and name in expected and tuple(np.shape(out[name])) != expected[name]]
        if skipped:
            notes.append("warning: " + _classifier_skip_warning(
                path, task, [f"{name} (file {tuple(np.shape(out[name]))}, model {expected[name]})"
                             for name in skipped], model))
            out = {k: v for k, v in out.items() if k not in skipped}
            expected = {k: v for k, v in expected.items() if k not in skipped}
    missing = [name for name in expected if name not in out]
    unexpected += [f"{origin[name]} (as {name})" for name in out if name not in expected]
    mismatched = [f"{origin[name]} {tuple(np.shape(out[name]))} vs model {name} {expected[name]}"
                  for name in out if name in expected and tuple(np.shape(out[name])) != expected[name]]
    if strict and not skip_mismatched_classifier:
        _classifier_check(task, model, state, info)
    problems = []
    for label, keys in (("missing from the checkpoint", missing), ("not in the model", unexpected),
                        ("of the wrong shape", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label}: {examples(keys, 6)}")
    if problems and strict:
        hint = (f"\n  its backbone weights are {info.model_name}'s: set backbone: {info.model_name}"
                if info.model_name and any(k.startswith("backbone") for k in missing + unexpected + mismatched)
                else "")
        raise CheckpointError(f"{path} does not fit this {task} ({model_task_description(model)}):\n  "
                              + "\n  ".join(problems) + hint)
    notes += problems
    kept = {name: value for name, value in out.items()
            if name in expected and tuple(np.shape(value)) == expected[name]}
    counts = dict.fromkeys(PARTS, 0)
    for name in kept:
        counts[_part(name)] = counts.get(_part(name), 0) + 1
    return kept, counts, notes


def model_task_description(model):
    spec = getattr(model.backbone, "spec", None)
    depths = getattr(spec, "depths", None)
    return f"backbone depths {tuple(depths) if depths else '?'}, {model.num_classes} classes"


def _assign(params, state):
    import mindspore as ms
    for name, value in state.items():
        param = params[name]
        param.set_data(ms.Tensor(np.ascontiguousarray(value, dtype=np.float32), param.dtype))


def load_whole_model(model, path, strict=True, skip_mismatched_classifier=False):
    """Load a whole detector/segmentor checkpoint into our `RetinaNet` or `EncoderDecoder`; returns a
    `WholeModelLoadReport` (class names, source format, tensors mapped per part).

    Native pvt_dense files load as the training tools write them (every parameter must be there); OpenMMLab files
    (official PVT releases, mmdetection 3.x / mmsegmentation 1.x) are mapped key by key. With `strict` (the
    default) any key that is missing, unexpected or of the wrong shape, a class count other than the model's, or a
    backbone built with the other LayerNorm eps convention raises CheckpointError before a weight changes.

    `skip_mismatched_classifier` is fine-tuning from a model trained on another class count (mmdetection's
    `load_from`): everything else loads as above, the classification head's tensors (its `classifier_params`) keep
    their initialisation, and the report's `warnings` name them. The model's `checkpoint_layout` (its task's
    `HeadLayout`) says how its head's keys are named.
    """
    path = os.fspath(path)
    layout = head_layout(model)
    task = layout.task
    info = read_whole_model_info(path)
    built_style = _model_norm_eps_style(model)
    if info.norm_eps_style != built_style:
        raise CheckpointError(f"{path} was trained with the {info.norm_eps_style!r} backbone LayerNorm eps but the "
                              f"model was built with {built_style!r}; set backbone_norm_eps: {info.norm_eps_style} "
                              "(or auto) in the config")
    report = WholeModelLoadReport(source_format=info.source_format, path=path, norm_eps_style=info.norm_eps_style)
    if info.source_format == NATIVE:
        if info.task not in (None, task):
            raise CheckpointError(f"{path} is a {info.task} checkpoint; the model is a {task}")
        skipped = _native_mismatched_classifier(model, path, layout) if skip_mismatched_classifier else {}
        targets = [model] if not skipped else [p for name, p in model.parameters_and_names() if name not in skipped]
        meta = load_checkpoint_into(path, targets)
        for name, _ in model.parameters_and_names():
            if name not in skipped:
                report.mapped[_part(name)] = report.mapped.get(_part(name), 0) + 1
        names = checked_class_names(meta.get("class_names"), path)
        _warn_non_finite(report, path, ((name, param.asnumpy()) for name, param in model.parameters_and_names()
                                        if name not in skipped))
        if skipped:
            report.warnings.append(_classifier_skip_warning(path, task, list(skipped.values()), model))
            names = None  # the file's classes are not the model's
        if names is not None and len(names) != model.num_classes:
            raise CheckpointError(f"{path} names {len(names)} classes but the model has {model.num_classes}")
        report.class_names = names
        return report
    state, _ = _read_mmlab(path)
    kept, counts, notes = mmlab_to_model_state(model, path, state, info, strict=strict,
                                               skip_mismatched_classifier=skip_mismatched_classifier)
    _assign(_model_params(model), kept)
    report.mapped = counts
    report.warnings = [note[len("warning: "):] for note in notes if note.startswith("warning: ")]
    _warn_non_finite(report, path, kept.items())
    report.notes = [note for note in notes if not note.startswith("warning: ")]
    if report.warnings and info.class_names is not None and len(info.class_names) != model.num_classes:
        info.class_names = None  # the file's classes are not the model's
    if info.class_names is not None:
        report.class_names = info.class_names
    else:
        report.class_names = _default_class_names(layout, model.num_classes)
        if report.class_names is not None:
            report.notes.append(f"no class names in the file: using {layout.default_names_label}'s")
    if info.framework:
        report.notes.insert(0, f"saved by {info.framework}")
    return report


def _warn_non_finite(report, path, named_values):
    """A warning in `report` naming the tensors with NaN or inf (the backbone loader's warning, for whole models):
    such weights load, and give no detections or garbage masks without any other sign."""
    bad = [name for name, value in named_values
           if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all()]
    if bad:
        report.warnings.append(f"checkpoint {path} has non-finite values in {len(bad)} tensors: "
                               f"{', '.join(bad[:4])}" + (", ..." if len(bad) > 4 else ""))


def native_classifier_outputs(path, layout):
    """(file's parameter name, output count) of the classification layer (`layout.classifier_params[0]`) of a
    native whole-model checkpoint, read from the file without building a model; None when it holds no such layer
    or cannot be read (the loader then says why)."""
    leaf = layout.classifier_params[0]
    try:
        stored = load_mindspore_checkpoint(path, choice_func=lambda name: name == leaf or name.endswith("." + leaf))
    except Exception:  # noqa: BLE001  (an unreadable file is reported by the loader)
        return None
    for name, value in stored.items():
        if len(value.shape) >= 1:
            return name, int(value.shape[0])
    return None


def _native_mismatched_classifier(model, path, layout):
    """{structural name: description} of the model's classification-head parameters whose shape in the native
    file at `path` differs (read from the file without loading anything)."""
    params = dict(model.parameters_and_names())
    wanted = {params[name].name: name for name in layout.classifier_params if name in params}
    try:
        stored = load_mindspore_checkpoint(path, choice_func=lambda name: name in wanted)
    except Exception:  # noqa: BLE001  (load_checkpoint_into reports an unreadable file properly)
        return {}
    out = {}
    for file_name, value in stored.items():
        name = wanted.get(file_name)
        if name is not None and tuple(value.shape) != tuple(params[name].shape):
            out[name] = f"{name} (file {tuple(value.shape)}, model {tuple(params[name].shape)})"
    return out


def save_whole_model(model, path, meta):
    """Write `model`'s parameters and `meta` as a native checkpoint (atomically, with a CRC) that the training
    tools' loaders and `load_whole_model` read back."""
    import mindspore as ms
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    entries = save_entries([model])
    temp = temp_path_for(path)
    ms.save_checkpoint(entries, temp, append_dict={META_KEY: json.dumps(meta, sort_keys=True)}, crc_check=True)
    publish(temp, path)
    return path


def print_report(report):
    if report.source_format != NATIVE:
        print("[pvt_dense] " + "\n  ".join(report.lines()))
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def is_whole_model_checkpoint(path):
    """True for an OpenMMLab detector/segmentor file or a native file converted from one (its meta names the
    task); False for anything else (a backbone or classifier checkpoint)."""
    try:
        return read_whole_model_info(path).task is not None
    except CheckpointError:
        return False
