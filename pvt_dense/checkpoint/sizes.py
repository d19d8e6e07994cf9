"""Which PVT size a native state dict holds, told from its block counts, stage-0 width and attention kind.

The names and numbers of the sizes belong to the models layer above (`pvt_dense.models.factory.MODEL_SPECS`); it
hands them down with `register_sizes` when it is imported, which happens before any pvt_dense module runs (the
package's `__init__` imports `pvt_dense.models`). This layer keeps only the plain numbers, so it imports nothing
from the models.
"""
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class SizeSignature:
    """What a state dict's shapes say about the model: blocks per stage, stage-0 width, PVT v2, linear SRA."""

    depths: Tuple[int, ...]
    width: Optional[int]  # None: the file does not say (no or a 0-d patch-embedding weight)
    is_v2: bool
    linear: Optional[bool]  # None: no stage-0 reduction conv (v1, or a size without one)


# name -> SizeSignature, in the models layer's order (the first that fits wins).
SIZE_TABLE: Dict[str, SizeSignature] = {}


def register_sizes(signatures):
    """Called by the models layer with {model name: SizeSignature} for every size it builds."""
    SIZE_TABLE.update(signatures)


def size_signature(state):
    """The `SizeSignature` of a native state dict."""
    depths = []
    for stage in range(4):
        blocks = {int(m.group(1)) for k in state for m in [re.match(rf"^stages\.{stage}\.blocks\.(\d+)\.", k)] if m}
        depths.append(max(blocks) + 1 if blocks else 0)
    is_v2 = any(k.endswith("mlp.dwconv.weight") for k in state)
    embed = state.get("stages.0.patch_embed.proj.weight")
    width = int(np.shape(embed)[0]) if embed is not None and np.ndim(embed) else None  # a 0-d tensor: no size
    sr = state.get("stages.0.blocks.0.attn.sr.weight")
    linear = tuple(np.shape(sr)[2:]) == (1, 1) if sr is not None else None
    return SizeSignature(tuple(depths), width, is_v2, linear)


def infer_model_name(state):
    """The PVT size (v1 or v2) whose depths, widths and attention kind match a native state dict (None if none
    does). v2 is told from v1 by its depth-wise MLP convs; b0 from b1 by the stage-0 width; b2_li from b2 by its
    1x1 reduction conv in stage 0; b5 from the others by its depths."""
    found = size_signature(state)
    for name, size in SIZE_TABLE.items():
        if found.depths != size.depths or found.is_v2 != size.is_v2:
            continue
        if found.width is not None and found.width != size.width:
            continue
        if found.is_v2 and found.linear is not None and found.linear != size.linear:
            continue
        return name
    return None
