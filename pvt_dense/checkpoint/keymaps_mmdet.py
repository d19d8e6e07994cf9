"""The key maps of whole OpenMMLab RetinaNet / Semantic FPN files that the backbone key tables (`keymaps`,
`keymaps_v2`) do not cover: mmdetection's own PVT v1 backbone names (`PyramidVisionTransformer`, with
`nn.MultiheadAttention` and 1x1-conv FFNs) to the official ones, and mmdetection's FPN names to ours (its extra
levels' convs appended to `fpn_convs`). `whole_model` reads the files and applies them."""
import re

import numpy as np

from ..errors import CheckpointError
from ..messages import examples

_MMDET_PATCH = re.compile(r"^layers\.(\d+)\.0\.(projection|norm)\.(weight|bias)$")
_MMDET_POS = re.compile(r"^layers\.(\d+)\.1\.0\.pos_embed$")
_MMDET_LAYER = re.compile(r"^layers\.(\d+)\.1\.(\d+)\.(.+)$")
# mmdetection's encoder-layer parameters -> the official block's (inverse of mmdet's `pvt_convert`); the in-proj of
# nn.MultiheadAttention stacks q, k, v and is split below.
_MMDET_LAYER_PARAMS = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attn.attn.out_proj.weight": "attn.proj.weight", "attn.attn.out_proj.bias": "attn.proj.bias",
    "attn.sr.weight": "attn.sr.weight", "attn.sr.bias": "attn.sr.bias",
    "attn.norm.weight": "attn.norm.weight", "attn.norm.bias": "attn.norm.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "ffn.layers.0.weight": "mlp.fc1.weight", "ffn.layers.0.bias": "mlp.fc1.bias",  # 1x1 convs there
    "ffn.layers.3.weight": "mlp.fc2.weight", "ffn.layers.3.bias": "mlp.fc2.bias",
}


def mmdet_pvt_to_official(state, label="the checkpoint"):
    """mmdetection `PyramidVisionTransformer` names (no `backbone.` prefix) -> official PVT names.

    The inverse of mmdetection 3.3's `pvt_convert`: `in_proj_weight/bias` rows [0:C] become `q`, [C:3C] `kv`
    (keys then values, the official layout); the FFN's 1x1 convs become Linear weights. Anything else (a PVTv2
    depth-wise conv FFN, a norm after a stage) raises CheckpointError naming the keys.
    """
    out, unknown = {}, []
    for key, value in state.items():
        value = np.asarray(value)
        match = _MMDET_PATCH.match(key)
        if match:
            stage, module, leaf = match.groups()
            out[f"patch_embed{int(stage) + 1}.{'proj' if module == 'projection' else 'norm'}.{leaf}"] = value
            continue
        match = _MMDET_POS.match(key)
        if match:
            out[f"pos_embed{int(match.group(1)) + 1}"] = value
            continue
        match = _MMDET_LAYER.match(key)
        if not match or int(match.group(2)) < 1:
            unknown.append(key)
            continue
        stage, layer, name = int(match.group(1)) + 1, int(match.group(2)) - 1, match.group(3)
        prefix = f"block{stage}.{layer}."
        if name in ("attn.attn.in_proj_weight", "attn.attn.in_proj_bias"):
            if value.shape[0] % 3:
                raise CheckpointError(f"{label}: {key} has {value.shape[0]} rows, not 3 x embed dims (q, k, v)")
            dim = value.shape[0] // 3
            leaf = "weight" if name.endswith("weight") else "bias"
            out[prefix + f"attn.q.{leaf}"] = np.ascontiguousarray(value[:dim])
            out[prefix + f"attn.kv.{leaf}"] = np.ascontiguousarray(value[dim:])
        elif name in _MMDET_LAYER_PARAMS:
            if name.startswith("ffn.") and name.endswith("weight"):
                if value.ndim != 4 or value.shape[2:] != (1, 1):
                    raise CheckpointError(f"{label}: {key} has shape {value.shape}, not a 1x1 conv")
                value = value.reshape(value.shape[:2])
            out[prefix + _MMDET_LAYER_PARAMS[name]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{label}: {len(unknown)} backbone keys are not parameters of mmdetection's PVT v1 "
                              f"(use_abs_pos_embed, no conv FFN, no norm after stages) nor of its PVT v2 "
                              f"(MixFFN with ffn.layers.1 a depth-wise conv, layers.{{s}}.2 norms): "
                              f"{examples(('backbone.' + k for k in unknown), 6)}")
    return out


_NECK = re.compile(r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)$")


def neck_name(key, used_levels):
    match = _NECK.match(key)
    if not match:
        return None
    kind, index, leaf = match.group(1), int(match.group(2)), match.group(3)
    if kind == "fpn_convs" and index >= used_levels:  # mmdet appends the extra levels' convs to fpn_convs
        return f"neck.extra_convs.{index - used_levels}.{leaf}"
    return f"neck.{kind}.{index}.{leaf}"
