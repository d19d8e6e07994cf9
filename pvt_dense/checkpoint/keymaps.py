"""Rename PVT v1 state dicts between checkpoint conventions and pvt_dense's native names.

Pure functions over ``dict[str, numpy.ndarray]``: no torch, no MindSpore. PVT v2's formats (official, timm,
HuggingFace, mmdetection, MindCV) are tables of the same kind in keymaps_v2.py, both built by keymap_rules.py;
``detect_format`` and ``to_native`` consider both families and pick the format that explains the most keys.

Formats
-------
``native``       pvt_dense: ``stages.{s}.patch_embed.proj.weight``, ``stages.{s}.blocks.{j}.attn.kv.weight``, ...
                 LayerNorm parameters are ``gamma``/``beta``.
``official``     whai362/PVT (PyTorch): ``patch_embed{i}.*``, ``pos_embed{i}``, ``block{i}.{j}.*`` with i = s + 1,
                 LayerNorm ``weight``/``bias``. mmdetection checkpoints (``backbone.`` prefix) are accepted too.
``huggingface``  transformers ``PvtForImageClassification`` (``pvt.encoder.*``, ``classifier.*``) or bare
                 ``PvtModel`` (``encoder.*``). Keys and values are two Linear layers there; natively they are one
                 ``kv`` layer whose rows ``[0:C]`` are keys and ``[C:2C]`` values (the official layout).
``mindcv``       MindCV 0.3.0 ``mindcv.models.pvt``: ``patch_embed{i}.*``, ``pos_embed{i}`` (float16),
                 ``Blocks.{s}.{j}.*``, LayerNorm ``gamma``/``beta``.

Each format is one table below, from a native *module* name to that format's module name. Parameter leaves follow
from the module's kind: LayerNorms are ``gamma``/``beta`` natively and ``weight``/``bias`` in the PyTorch formats,
Dense/Conv2d are ``weight``/``bias`` everywhere, and bare parameters (``pos_embed``, ``cls_token``) have no leaf.
Placeholders: ``{s}`` stage 0..3, ``{i}`` = s + 1, ``{j}`` block within its stage, ``{last}`` the last stage.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import numpy as np

from pvt_dense.errors import CheckpointError
from pvt_dense.messages import examples

from .keymap_rules import AFFINE, HUGGINGFACE, MINDCV, NATIVE, NORM, OFFICIAL, PARAM, Format, indices, rules
from .keymaps_v2 import V2_FORMATS

FORMATS = (NATIVE, OFFICIAL, HUGGINGFACE, MINDCV)


_BLOCK = "stages.{s}.blocks.{j}."
_BLOCK_MODULES = {
    "norm1": NORM,
    "attn.q": AFFINE,
    "attn.kv": AFFINE,
    "attn.proj": AFFINE,
    "attn.sr": AFFINE,  # only where sr_ratio > 1
    "attn.norm": NORM,  # only where sr_ratio > 1
    "norm2": NORM,
    "mlp.fc1": AFFINE,
    "mlp.fc2": AFFINE,
}
NATIVE_MODULES: dict[str, str] = {
    "stages.{s}.patch_embed.proj": AFFINE,
    "stages.{s}.patch_embed.norm": NORM,
    "stages.{s}.pos_embed": PARAM,
    **{_BLOCK + name: kind for name, kind in _BLOCK_MODULES.items()},
    "cls_token": PARAM,  # classifier only
    "norm": NORM,  # classifier only: final LayerNorm
    "head": AFFINE,  # classifier only
}

# native module -> module in each format. A tuple means the native tensor is those tensors stacked along axis 0.
_OFFICIAL_MODULES = {
    "stages.{s}.patch_embed.proj": "patch_embed{i}.proj",
    "stages.{s}.patch_embed.norm": "patch_embed{i}.norm",
    "stages.{s}.pos_embed": "pos_embed{i}",
    **{_BLOCK + name: "block{i}.{j}." + name for name in _BLOCK_MODULES},
    "cls_token": "cls_token",
    "norm": "norm",
    "head": "head",
}
_MINDCV_MODULES = {
    **_OFFICIAL_MODULES,
    **{_BLOCK + name: "Blocks.{s}.{j}." + name for name in _BLOCK_MODULES},
}
_HF_BLOCK = "pvt.encoder.block.{s}.{j}."
_HF_EMBED = "pvt.encoder.patch_embeddings.{s}."
_HF_MODULES = {
    "stages.{s}.patch_embed.proj": _HF_EMBED + "projection",
    "stages.{s}.patch_embed.norm": _HF_EMBED + "layer_norm",
    "stages.{s}.pos_embed": _HF_EMBED + "position_embeddings",
    _BLOCK + "norm1": _HF_BLOCK + "layer_norm_1",
    _BLOCK + "attn.q": _HF_BLOCK + "attention.self.query",
    _BLOCK + "attn.kv": (_HF_BLOCK + "attention.self.key", _HF_BLOCK + "attention.self.value"),
    _BLOCK + "attn.proj": _HF_BLOCK + "attention.output.dense",
    _BLOCK + "attn.sr": _HF_BLOCK + "attention.self.sequence_reduction",
    _BLOCK + "attn.norm": _HF_BLOCK + "attention.self.layer_norm",
    _BLOCK + "norm2": _HF_BLOCK + "layer_norm_2",
    _BLOCK + "mlp.fc1": _HF_BLOCK + "mlp.dense1",
    _BLOCK + "mlp.fc2": _HF_BLOCK + "mlp.dense2",
    "cls_token": "pvt.encoder.patch_embeddings.{last}.cls_token",
    "norm": "pvt.encoder.layer_norm",
    "head": "classifier",
}

# Prefixes that wrap a whole model inside a bigger one (mmdetection, DataParallel). Keys outside them are ignored.
_WRAPPERS = ("backbone.", "module.", "module.backbone.", "model.", "model.backbone.")

# Training state that MindSpore/MindCV .ckpt files carry next to the weights; never a model parameter.
_TRAINING_STATE = re.compile(
    r"^(moments|accum|adam_m|adam_v|ema|mean|variance|global_step_increase_sense)\."
    r"|^(global_step|learning_rate|beta1_power|beta2_power|scale_sense|current_iterator_step"
    r"|last_overflow_iterator_step|epoch_num|step_num|loss_scale|loss_scale_clean_steps|pvt_dense_meta_json)$"
)

_STAGE_KEY = re.compile(r"^stages\.(\d+)\.")


def _hf_normalize(key: str) -> str:
    # A bare PvtModel has no 'pvt.' prefix; PvtForImageClassification has it on everything but 'classifier'.
    return "pvt." + key if key.startswith("encoder.") else key


_FORMATS: dict[str, Format] = {
    NATIVE: Format(NATIVE, rules({m: m for m in NATIVE_MODULES}, ("gamma", "beta"), NATIVE_MODULES)),
    OFFICIAL: Format(OFFICIAL, rules(_OFFICIAL_MODULES, ("weight", "bias"), NATIVE_MODULES)),
    HUGGINGFACE: Format(HUGGINGFACE, rules(_HF_MODULES, ("weight", "bias"), NATIVE_MODULES), _hf_normalize),
    MINDCV: Format(MINDCV, rules(_MINDCV_MODULES, ("gamma", "beta"), NATIVE_MODULES)),
}


# ----------------------------------------------------------------------------------------------------------- helpers


def _score(fmt: Format, keys: Iterable[str]) -> int:
    return sum(fmt.parse(k) is not None for k in keys)


def _all_formats() -> list[Format]:
    return list(_FORMATS.values()) + list(V2_FORMATS.values())


def _locate(state: Mapping[str, object]) -> tuple[Format, str]:
    """(format, wrapper prefix) that explains the most keys of ``state``."""
    if not state:
        raise CheckpointError("the checkpoint holds no tensors")
    nested = [k for k, v in state.items() if isinstance(v, Mapping)]
    if nested:
        raise CheckpointError(
            f"the checkpoint is a wrapper, not a state dict: {examples(nested, quote=True)} hold dicts; "
            "unwrap the one with the weights (often 'model' or 'state_dict') first"
        )
    keys = list(state)
    candidates = []  # (score, prefix, format)
    for prefix in ("",) + _WRAPPERS:
        inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not inside:
            continue
        for fmt in _all_formats():
            score = _score(fmt, fmt.prepare(inside))
            if score:
                candidates.append((score, prefix, fmt))
    if not candidates:
        raise CheckpointError(f"not a PVT v1 or v2 checkpoint in any known format; its keys begin {examples(keys, quote=True)}")
    best = max(c[0] for c in candidates)
    top = [c for c in candidates if c[0] == best]
    if len(top) > 1:
        which = ", ".join(f"{f.label} (prefix {p!r})" if p else f.label for _, p, f in top)
        raise CheckpointError(
            f"cannot tell the checkpoint's format: its keys fit {which} equally well; keys begin {examples(keys, quote=True)}"
        )
    _, prefix, fmt = top[0]
    return fmt, prefix


def detect_format(state: Mapping[str, object]) -> str:
    """One of ``FORMATS`` (v1) or ``keymaps_v2.V2_FORMAT_NAMES`` for a flat state dict; wrapper prefixes such as
    ``backbone.`` are looked through. ``detect_family`` says whether it is PVT v1 or v2.

    Raises CheckpointError when no format fits, or when two fit equally well.
    """
    return _locate(state)[0].name


def detect_family(state: Mapping[str, object]) -> str:
    """'v1' or 'v2': which PVT a flat state dict in any known format belongs to."""
    return _locate(state)[0].family


def _as_float32(state: dict[str, object], notes: list[str]) -> dict[str, np.ndarray]:
    """Every floating array as float32; a note per source dtype that needed a cast."""
    out, cast = {}, {}
    for key, value in state.items():
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
            cast.setdefault(str(array.dtype), []).append(key)
            array = array.astype(np.float32)
        out[key] = array
    for dtype, keys in cast.items():
        if all(k.endswith("pos_embed") for k in keys):
            notes.append(f"cast {len(keys)} {dtype} pos embeds to float32")
        else:
            notes.append(f"cast {len(keys)} {dtype} tensors to float32: {examples(keys, quote=True)}")
    return out


def _stack_parts(native: str, parts: dict[int, tuple[str, np.ndarray]], count: int) -> np.ndarray:
    if len(parts) != count:
        have = ", ".join(repr(parts[p][0]) for p in sorted(parts))
        raise CheckpointError(f"{native!r} needs {count} source tensors (keys then values) but only {have} exist")
    arrays = [np.asarray(parts[p][1]) for p in range(count)]
    if len({a.shape for a in arrays}) != 1:
        shapes = ", ".join(f"{parts[p][0]!r} {arrays[p].shape}" for p in range(count))
        raise CheckpointError(f"cannot stack into {native!r}: shapes differ ({shapes})")
    return np.concatenate(arrays, axis=0)


def _refuse_copies_under_other_wrappers(state, prefix, outside):
    """CheckpointError when a key outside the chosen wrapper `prefix` names, under another wrapper (or none), a weight
    that is also inside it (`backbone.x` and `model.backbone.x`): two copies of one weight, neither of which may
    silently win."""
    for key in outside:
        for other in ("",) + _WRAPPERS:
            if other != prefix and key.startswith(other):
                inner = key[len(other):]
                if prefix + inner in state:
                    raise CheckpointError(f"keys {key!r} and {prefix + inner!r} are two copies of {inner!r} once "
                                          "their wrapper prefixes are stripped")


def _last_stage(native_keys: Iterable[str]) -> int:
    stages = [int(m.group(1)) for m in map(_STAGE_KEY.match, native_keys) if m]
    return max(stages, default=3)


# ------------------------------------------------------------------------------------------------------ public API


def to_native(state: Mapping[str, object], *, strict: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """Convert a state dict in any known format to native names, all floating arrays float32.

    Returns the converted dict and human-readable notes about what was done. An unprefixed native dict comes back
    with its keys untouched (extra keys, e.g. a dense head, are kept). For the other formats, keys outside a
    wrapper prefix (an mmdetection neck or head) and training state (optimizer moments, step counters) are dropped
    with a note; any other key that fits no rule raises CheckpointError, or is dropped with a note if not ``strict``.
    """
    fmt, prefix = _locate(state)
    name = fmt.name
    notes = [f"format: {fmt.label}"]
    if name == NATIVE and not prefix:
        training = [k for k in state if _TRAINING_STATE.search(k)]
        if training:
            notes.append(f"ignored {len(training)} training-state entries: {examples(training, quote=True)}")
        weights = {k: v for k, v in state.items() if k not in set(training)}
        return _as_float32(weights, notes), notes

    if prefix:
        outside = [k for k in state if not k.startswith(prefix)]
        _refuse_copies_under_other_wrappers(state, prefix, outside)
        dropped = f"; ignored {len(outside)} keys outside it: {examples(outside, quote=True)}" if outside else ""
        notes.append(f"stripped prefix {prefix!r}{dropped}")
    inside = fmt.prepare({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    parts: dict[str, dict[int, tuple[str, np.ndarray]]] = {}
    counts: dict[str, int] = {}
    training, unknown = [], []
    for inner, value in inside.items():
        key = prefix + inner
        hit = fmt.parse(inner)
        if hit is None:
            (training if _TRAINING_STATE.search(inner) else unknown).append(key)
            continue
        native, part, count = hit
        slot = parts.setdefault(native, {})
        if part in slot:
            raise CheckpointError(f"keys {slot[part][0]!r} and {key!r} both map to {native!r}")
        slot[part] = (key, value)
        counts[native] = count

    if training:
        notes.append(f"ignored {len(training)} training-state entries: {examples(training, quote=True)}")
    if unknown:
        if strict:
            raise CheckpointError(
                f"{len(unknown)} keys of this {fmt.label} checkpoint are not PVT {fmt.family} parameters: "
                f"{examples(unknown, quote=True)}"
            )
        notes.append(f"ignored {len(unknown)} unrecognised keys: {examples(unknown, quote=True)}")

    out = {}
    for native, slot in parts.items():
        out[native] = _stack_parts(native, slot, counts[native]) if counts[native] > 1 else slot[0][1]

    if name not in (NATIVE, MINDCV):
        norms = sum(k.endswith(".gamma") for k in out)
        notes.append(f"renamed LayerNorm weight/bias to gamma/beta in {norms} norms")
    if name == HUGGINGFACE:
        merged = sum(k.endswith("attn.kv.weight") for k in out)
        notes.append(f"merged HF key/value into kv (keys first) for {merged} blocks")
        if "head.weight" in out:
            notes.append("renamed HF 'classifier' to 'head'")
    return _as_float32(out, notes), notes


def _native_family(state: Mapping[str, object]) -> str:
    """'v1' or 'v2' for a native state dict: the family whose native names explain more keys (v1 on a tie)."""
    keys = list(state)
    return "v2" if _score(V2_FORMATS[NATIVE], keys) > _score(_FORMATS[NATIVE], keys) else "v1"


def writable_formats(family: str) -> tuple[str, ...]:
    """The formats ``from_native`` writes for PVT ``family`` ('v1' or 'v2')."""
    return tuple(name for name in (_FORMATS if family == "v1" else V2_FORMATS) if name != NATIVE)


def from_native(state: Mapping[str, object], fmt: str, *, strict: bool = True) -> dict[str, np.ndarray]:
    """Rename a native state dict into ``fmt``; dtypes are kept. PVT v1 writes ``official``, ``huggingface``,
    ``mindcv``; PVT v2 (told apart by its native names) also ``timm`` and ``mmdetection`` (a bare
    ``PyramidVisionTransformerV2``, no ``backbone.`` prefix).

    The inverse of ``to_native`` for that format: ``kv`` is split back into HF key and value, and for mmdetection
    q and kv are fused back into ``in_proj`` and the MLP's Linear weights become 1x1 convs. Keys that are not
    native PVT parameters raise CheckpointError, or are dropped if not ``strict``.
    """
    family = _native_family(state)
    formats = _FORMATS if family == "v1" else V2_FORMATS
    if fmt not in formats or fmt == NATIVE:
        raise CheckpointError(f"cannot write format {fmt!r} for a PVT {family} state dict; choose one of "
                              f"{', '.join(writable_formats(family))}")
    target = formats[fmt]
    targets = {rule.native: rule.sources for rule in target.rules}
    last = _last_stage(state)
    out: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in state.items():
        rule = next((r for r in formats[NATIVE].rules if r.native_re.fullmatch(key)), None)
        if rule is None or rule.native not in targets:
            unknown.append(key)
            continue
        index = indices(rule.native_re.fullmatch(key).groupdict())
        index.update(i=index.get("s", 0) + 1, last=last)
        names = [target.denormalize(t.format(**index)) for t in targets[rule.native]]
        array = np.asarray(value)
        if len(names) > 1 and array.shape[0] % len(names):
            raise CheckpointError(f"{key!r} has {array.shape[0]} rows; cannot split it into {len(names)} equal parts")
        for name, piece in zip(names, np.split(array, len(names), axis=0) if len(names) > 1 else [array]):
            out[name] = np.ascontiguousarray(piece)
    if unknown and strict:
        raise CheckpointError(f"{len(unknown)} keys are not native PVT {family} parameters that the {fmt} format "
                              f"has: {examples(unknown, quote=True)}")
    return dict(target.unprepare(out))


def native_to_mindcv(
    state: Mapping[str, object], *, pos_embed_dtype: np.dtype = np.float16, strict: bool = True
) -> dict[str, np.ndarray]:
    """A native state dict in MindCV 0.3.0 PVT names and dtypes.

    MindCV declares ``pos_embed1..4`` as float16 Parameters, so they are cast to ``pos_embed_dtype``; every other
    floating array is float32. For a dict that came from MindCV through ``to_native`` this is exact (float16 ->
    float32 -> float16 loses nothing).
    """
    out = {}
    for key, value in from_native(state, MINDCV, strict=strict).items():
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(pos_embed_dtype if re.fullmatch(r"pos_embed\d+", key) else np.float32, copy=False)
        out[key] = value
    return out
