"""Pyramid Vision Transformer v2 (Wang et al., CVMJ 2022) as a dense-prediction backbone and as a classifier.

Read top to bottom: the variants (as data), one stage, the backbone, the classifier. v2 differs from v1 in its
layers (layers_v2.py: overlapping patch embedding, depth-wise conv in the MLP, linear attention for "-li") and in
having no position embedding and no cls token: every stage ends with its own LayerNorm (`stages.{s}.norm`, the
official `norm{i}`), and the classifier mean-pools the last stage's tokens. The backbone contract is v1's
(`PVTBackbone`): four stage maps, `out_channels`, `strides`, `feature_info`, any input size.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np
from mindspore import nn, ops

from .buckets import key_bias, token_mask
from .layers import BLOCK_NORM_EPS, EMBED_NORM_EPS, dense, layer_norm
from .layers_v2 import BlockV2, OverlapPatchEmbed
from .pvt import ChecksImageBatch, NormEpsStyle, PVTBackbone, drop_path_schedule, tokens_to_map


@dataclass(frozen=True)
class PVTv2Spec(NormEpsStyle):
    """Hyper-parameters of one PVT v2 size, as in the official classification/pvt_v2.py (and timm's pvt_v2.py)."""

    depths: Tuple[int, int, int, int]
    embed_dims: Tuple[int, int, int, int] = (64, 128, 320, 512)
    num_heads: Tuple[int, int, int, int] = (1, 2, 5, 8)
    mlp_ratios: Tuple[int, int, int, int] = (8, 8, 4, 4)
    sr_ratios: Tuple[int, int, int, int] = (8, 4, 2, 1)
    linear: bool = False  # linear spatial-reduction attention (pool to 7x7) and ReLU in the MLP: the "-li" sizes
    patch_sizes: Tuple[int, int, int, int] = (7, 3, 3, 3)  # conv kernel of each stage's patch embedding
    patch_strides: Tuple[int, int, int, int] = (4, 2, 2, 2)
    embed_norm_eps: float = EMBED_NORM_EPS  # patch-embedding and spatial-reduction norms (see NORM_EPS_STYLES)

    @property
    def strides(self):
        return tuple(int(np.prod(self.patch_strides[: i + 1])) for i in range(len(self.patch_strides)))

    def stage_grids(self, height, width):
        """The (h, w) token grid of every stage for an input of height x width: ceil divisions, as PyTorch's
        convolutions with padding k // 2 give."""
        grids = []
        for kernel, stride in zip(self.patch_sizes, self.patch_strides):
            pad = kernel // 2
            height = (height + 2 * pad - kernel) // stride + 1
            width = (width + 2 * pad - kernel) // stride + 1
            grids.append((height, width))
        return tuple(grids)


PVT_V2_SPECS = {
    "pvt_v2_b0": PVTv2Spec(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256)),
    "pvt_v2_b1": PVTv2Spec(depths=(2, 2, 2, 2)),
    "pvt_v2_b2": PVTv2Spec(depths=(3, 4, 6, 3)),
    "pvt_v2_b2_li": PVTv2Spec(depths=(3, 4, 6, 3), linear=True),
    "pvt_v2_b3": PVTv2Spec(depths=(3, 4, 18, 3)),
    "pvt_v2_b4": PVTv2Spec(depths=(3, 8, 27, 3)),
    "pvt_v2_b5": PVTv2Spec(depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}


class PVTv2Stage(nn.Cell):
    """Overlapping patch embedding + transformer blocks + the stage's LayerNorm.

    Input (B, C_in, H, W); output normalised tokens (B, h*w, C) and the grid (h, w).
    """

    def __init__(self, in_channels, dim, patch_size, patch_stride, num_heads, mlp_ratio, sr_ratio, linear,
                 drop_path_rates, drop_rate=0.0, attn_drop_rate=0.0, norm_eps=EMBED_NORM_EPS):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, patch_size, patch_stride, norm_eps)
        self.blocks = nn.CellList([
            BlockV2(dim, num_heads, mlp_ratio, sr_ratio, linear=linear, drop_path=rate, drop=drop_rate,
                    attn_drop=attn_drop_rate, sr_norm_eps=norm_eps)
            for rate in drop_path_rates
        ])
        self.norm = layer_norm(dim, BLOCK_NORM_EPS)

    def bucket_inputs(self, valid_grid, bucket_grid):
        """The `valid` argument of `construct` for a size bucket: the key bias that leaves padded keys out and the
        token mask that zeroes padding before the MLP's depth-wise conv."""
        sr_ratio = self.blocks[0].attn.sr_ratio
        return key_bias(valid_grid, bucket_grid, sr_ratio), token_mask(valid_grid, bucket_grid)

    def construct(self, x, valid=None):
        tokens, height, width = self.patch_embed(x)
        for block in self.blocks:
            if valid is None:
                tokens = block(tokens, height, width)
            else:
                tokens = block(tokens, height, width, valid[0], valid[1])
        return self.norm(tokens), height, width


def build_v2_stages(spec, drop_path_rate, with_cls_token=False, drop_rate=0.0, attn_drop_rate=0.0, num_stages=None,
                    frozen_stages=0):
    """The first `num_stages` stages (all by default), with v1's drop-path schedule over all blocks (the official
    v2 code uses the same linspace) and v1's rule that frozen stages get no dropout or drop path."""
    if with_cls_token:
        raise ValueError("PVT v2 has no cls token")
    schedule = drop_path_schedule(spec.depths, drop_path_rate)
    stages, in_channels = [], 3
    for i in range(num_stages or len(spec.depths)):
        frozen = i < frozen_stages
        stages.append(PVTv2Stage(
            in_channels, spec.embed_dims[i], spec.patch_sizes[i], spec.patch_strides[i], spec.num_heads[i],
            spec.mlp_ratios[i], spec.sr_ratios[i], spec.linear, [0.0] * spec.depths[i] if frozen else schedule[i],
            drop_rate=0.0 if frozen else drop_rate, attn_drop_rate=0.0 if frozen else attn_drop_rate,
            norm_eps=spec.embed_norm_eps))
        in_channels = spec.embed_dims[i]
    return nn.CellList(stages)


class PVTv2Backbone(PVTBackbone):
    """PVT v2 as a dense-prediction backbone: NCHW float32 images of any size -> tuple of NCHW stage maps.

    Arguments and outputs as `PVTBackbone` (out_indices, drop_path_rate, frozen_stages, recompute_stages), with
    each stage map taken after that stage's LayerNorm, as in the official detection/pvt_v2.py. Map sizes are
    ceil(H / s_i) x ceil(W / s_i) (`spec.stage_grids`): the overlapping embeddings pad their input.
    """

    stage_builder = staticmethod(build_v2_stages)

    @property
    def supports_buckets(self):
        # The linear ("-li") attention pools the whole grid to 7x7: padding changes every key, so no bucket.
        return not self.spec.linear


class PVTv2Classifier(ChecksImageBatch, nn.Cell):
    """The ImageNet classifier of the official code: all four stages, mean of the last stage's normalised tokens,
    linear head.

    `forward_features(x)` returns the pooled embedding (B, C); `construct(x)` the logits (B, num_classes).
    `drop_rate` is the dropout inside the blocks (the official `drop_rate`), not a dropout before the head.
    """

    def __init__(self, spec, num_classes=1000, drop_path_rate=0.0, drop_rate=0.0, attn_drop_rate=0.0):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.spec = spec
        self.num_classes = num_classes
        self.stages = build_v2_stages(spec, drop_path_rate, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate)
        self.num_stages = len(spec.depths)
        dim = spec.embed_dims[-1]
        self.has_head = num_classes > 0
        self.head = dense(dim, num_classes) if self.has_head else nn.Identity()
        self.in_channels = 3
        self.num_features = dim

    def forward_features(self, x):
        last = self.num_stages - 1
        for i in range(last):
            tokens, height, width = self.stages[i](x)
            x = tokens_to_map(tokens, height, width)
        tokens, _, _ = self.stages[last](x)
        return ops.mean(tokens, 1)

    def construct(self, x):
        return self.head(self.forward_features(x))
