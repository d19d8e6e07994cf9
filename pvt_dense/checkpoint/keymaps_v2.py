"""PVT v2's checkpoint conventions, as tables from pvt_dense's native names (read by keymaps.py's machinery).

Formats
-------
``native``       pvt_dense: ``stages.{s}.patch_embed.proj.weight``, ``stages.{s}.blocks.{j}.mlp.dwconv.weight``,
                 ``stages.{s}.norm.gamma`` (the LayerNorm closing each stage), ``head.weight``.
``official``     whai362/PVT branch v2 (classification/ and detection/pvt_v2.py): ``patch_embed{i}.*``,
                 ``block{i}.{j}.*`` with ``mlp.dwconv.dwconv``, ``norm{i}``, ``head``; i = s + 1.
``timm``         timm's ``pvt_v2_*``: ``patch_embed.*`` (stage 0), ``stages.{s}.downsample.*`` (stages 1-3),
                 ``stages.{s}.blocks.{j}.*``, ``stages.{s}.norm``, ``head``; LayerNorm ``weight``/``bias``.
``huggingface``  transformers ``PvtV2ForImageClassification`` (``pvt_v2.encoder.layers.{s}.*``, ``classifier``) or
                 a bare ``PvtV2Model`` / ``PvtV2Backbone`` (``encoder.*``); keys and values are two Linear layers,
                 natively one ``kv`` whose rows ``[0:C]`` are keys and ``[C:2C]`` values (the official layout).
``mmdetection``  mmdet 3.x ``PyramidVisionTransformerV2``: ``layers.{s}.0`` patch embedding, ``layers.{s}.1.{j}``
                 blocks with ``attn.attn`` an ``nn.MultiheadAttention`` (one fused ``in_proj`` = [q; k; v]) and
                 ``ffn.layers.{0,1,4}`` the 1x1 conv, depth-wise conv and 1x1 conv of MixFFN; ``layers.{s}.2``
                 the stage norm. Backbone only. Detector checkpoints carry it under ``backbone.``.
``mindcv``       MindCV 0.3.0 ``mindcv.models.pvtv2``: ``patch_embed_list.{s}.*``, ``block_list.{s}.{j}.*``,
                 ``norm_list.{s}``, ``head``; LayerNorm ``gamma``/``beta``.

The linear-attention size (b2_li) has the same parameter names as the others (its 1x1 ``attn.sr`` and
``attn.norm`` exist in every stage; pooling, GELU and ReLU have no parameters).
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from .keymap_rules import AFFINE, HUGGINGFACE, MINDCV, NATIVE, NORM, OFFICIAL, Format, rules

TIMM = "timm"
MMDETECTION = "mmdetection"
V2_FORMAT_NAMES = (NATIVE, OFFICIAL, TIMM, HUGGINGFACE, MMDETECTION, MINDCV)

_BLOCK = "stages.{s}.blocks.{j}."
_BLOCK_MODULES = {
    "norm1": NORM,
    "attn.q": AFFINE,
    "attn.kv": AFFINE,
    "attn.proj": AFFINE,
    "attn.sr": AFFINE,  # a strided conv where sr_ratio > 1; the 1x1 conv after pooling in linear attention
    "attn.norm": NORM,
    "norm2": NORM,
    "mlp.fc1": AFFINE,
    "mlp.dwconv": AFFINE,
    "mlp.fc2": AFFINE,
}
NATIVE_MODULES_V2: dict[str, str] = {
    "stages.{s}.patch_embed.proj": AFFINE,
    "stages.{s}.patch_embed.norm": NORM,
    **{_BLOCK + name: kind for name, kind in _BLOCK_MODULES.items()},
    "stages.{s}.norm": NORM,
    "head": AFFINE,  # classifier only
}

_OFFICIAL_MODULES = {
    "stages.{s}.patch_embed.proj": "patch_embed{i}.proj",
    "stages.{s}.patch_embed.norm": "patch_embed{i}.norm",
    **{_BLOCK + name: "block{i}.{j}." + name for name in _BLOCK_MODULES},
    _BLOCK + "mlp.dwconv": "block{i}.{j}.mlp.dwconv.dwconv",
    "stages.{s}.norm": "norm{i}",
    "head": "head",
}
_TIMM_MODULES = {
    **{m: m for m in NATIVE_MODULES_V2},
    "stages.{s}.patch_embed.proj": "stages.{s}.downsample.proj",
    "stages.{s}.patch_embed.norm": "stages.{s}.downsample.norm",
}
_MINDCV_MODULES = {
    "stages.{s}.patch_embed.proj": "patch_embed_list.{s}.proj",
    "stages.{s}.patch_embed.norm": "patch_embed_list.{s}.norm",
    **{_BLOCK + name: "block_list.{s}.{j}." + name for name in _BLOCK_MODULES},
    _BLOCK + "mlp.dwconv": "block_list.{s}.{j}.mlp.dwconv.dwconv",
    "stages.{s}.norm": "norm_list.{s}",
    "head": "head",
}
_HF_STAGE = "pvt_v2.encoder.layers.{s}."
_HF_BLOCK = _HF_STAGE + "blocks.{j}."
_HF_MODULES = {
    "stages.{s}.patch_embed.proj": _HF_STAGE + "patch_embedding.proj",
    "stages.{s}.patch_embed.norm": _HF_STAGE + "patch_embedding.layer_norm",
    _BLOCK + "norm1": _HF_BLOCK + "layer_norm_1",
    _BLOCK + "attn.q": _HF_BLOCK + "attention.query",
    _BLOCK + "attn.kv": (_HF_BLOCK + "attention.key", _HF_BLOCK + "attention.value"),
    _BLOCK + "attn.proj": _HF_BLOCK + "attention.proj",
    _BLOCK + "attn.sr": _HF_BLOCK + "attention.spatial_reduction",
    _BLOCK + "attn.norm": _HF_BLOCK + "attention.layer_norm",
    _BLOCK + "norm2": _HF_BLOCK + "layer_norm_2",
    _BLOCK + "mlp.fc1": _HF_BLOCK + "mlp.dense1",
    _BLOCK + "mlp.dwconv": _HF_BLOCK + "mlp.dwconv.dwconv",
    _BLOCK + "mlp.fc2": _HF_BLOCK + "mlp.dense2",
    "stages.{s}.norm": _HF_STAGE + "layer_norm",
    "head": "classifier",
}
_MM_BLOCK = "layers.{s}.1.{j}."
_MMDET_MODULES = {
    "stages.{s}.patch_embed.proj": "layers.{s}.0.projection",
    "stages.{s}.patch_embed.norm": "layers.{s}.0.norm",
    _BLOCK + "norm1": _MM_BLOCK + "norm1",
    # Names made by _mmdet_prepare from the fused in_proj (see below).
    _BLOCK + "attn.q": _MM_BLOCK + "attn.attn.in_proj_q",
    _BLOCK + "attn.kv": _MM_BLOCK + "attn.attn.in_proj_kv",
    _BLOCK + "attn.proj": _MM_BLOCK + "attn.attn.out_proj",
    _BLOCK + "attn.sr": _MM_BLOCK + "attn.sr",
    _BLOCK + "attn.norm": _MM_BLOCK + "attn.norm",
    _BLOCK + "norm2": _MM_BLOCK + "norm2",
    _BLOCK + "mlp.fc1": _MM_BLOCK + "ffn.layers.0",
    _BLOCK + "mlp.dwconv": _MM_BLOCK + "ffn.layers.1",
    _BLOCK + "mlp.fc2": _MM_BLOCK + "ffn.layers.4",
    "stages.{s}.norm": "layers.{s}.2",
}

_MM_IN_PROJ = re.compile(r"^(?P<block>layers\.\d+\.1\.\d+\.attn\.attn)\.in_proj_(?P<leaf>weight|bias)$")
_MM_POINTWISE = re.compile(r"^layers\.\d+\.1\.\d+\.ffn\.layers\.[04]\.weight$")


def _mmdet_prepare(state: Mapping[str, object]) -> dict[str, object]:
    """mmdet's fused [q; k; v] projection split into q and kv (keys then values, the native kv layout), and its
    1x1-conv MLP weights (out, in, 1, 1) as Linear weights (out, in). Other keys pass through unchanged."""
    out = {}
    for key, value in state.items():
        fused = _MM_IN_PROJ.match(key)
        if fused:
            array = np.asarray(value)
            if array.shape[0] % 3:
                out[key] = value  # left unmatched, so it is reported as not a PVT v2 parameter
                continue
            dim = array.shape[0] // 3
            out[f"{fused['block']}.in_proj_q.{fused['leaf']}"] = array[:dim]
            out[f"{fused['block']}.in_proj_kv.{fused['leaf']}"] = array[dim:]
        elif _MM_POINTWISE.match(key) and np.ndim(value) == 4 and np.shape(value)[2:] == (1, 1):
            out[key] = np.asarray(value)[:, :, 0, 0]
        else:
            out[key] = value
    return out


_MM_SPLIT = re.compile(r"^(?P<block>layers\.\d+\.1\.\d+\.attn\.attn)\.in_proj_q\.(?P<leaf>weight|bias)$")


def _mmdet_unprepare(state: Mapping[str, object]) -> dict[str, object]:
    """The inverse of `_mmdet_prepare`: q and kv fused into mmdet's [q; k; v] ``in_proj``, the MLP's Linear
    weights as 1x1 convs."""
    out = {}
    for key, value in state.items():
        split = _MM_SPLIT.match(key)
        if split:
            kv = state[f"{split['block']}.in_proj_kv.{split['leaf']}"]
            out[f"{split['block']}.in_proj_{split['leaf']}"] = np.concatenate([np.asarray(value), np.asarray(kv)])
        elif ".attn.attn.in_proj_kv." in key:
            continue  # fused with its q above
        elif _MM_POINTWISE.match(key) and np.ndim(value) == 2:
            out[key] = np.asarray(value)[:, :, None, None]
        else:
            out[key] = value
    return out


def _timm_denormalize(key: str) -> str:
    return "patch_embed." + key[len("stages.0.downsample."):] if key.startswith("stages.0.downsample.") else key


def _timm_normalize(key: str) -> str:
    # timm keeps stage 0's patch embedding outside `stages` (stages 1-3 call theirs `downsample`).
    return "stages.0.downsample." + key[len("patch_embed."):] if key.startswith("patch_embed.") else key


def _hf_normalize(key: str) -> str:
    # A bare PvtV2Model or PvtV2Backbone has no 'pvt_v2.' prefix.
    return "pvt_v2." + key if key.startswith("encoder.") else key


def _format(name, modules, norm_leaves, **kwargs):
    return Format(name, rules(modules, norm_leaves, NATIVE_MODULES_V2), family="v2", **kwargs)


V2_FORMATS: dict[str, Format] = {
    NATIVE: _format(NATIVE, {m: m for m in NATIVE_MODULES_V2}, ("gamma", "beta")),
    OFFICIAL: _format(OFFICIAL, _OFFICIAL_MODULES, ("weight", "bias")),
    TIMM: _format(TIMM, _TIMM_MODULES, ("weight", "bias"), normalize=_timm_normalize, denormalize=_timm_denormalize),
    HUGGINGFACE: _format(HUGGINGFACE, _HF_MODULES, ("weight", "bias"), normalize=_hf_normalize),
    MMDETECTION: _format(MMDETECTION, _MMDET_MODULES, ("weight", "bias"), prepare=_mmdet_prepare,
                         unprepare=_mmdet_unprepare),
    MINDCV: _format(MINDCV, _MINDCV_MODULES, ("gamma", "beta")),
}
