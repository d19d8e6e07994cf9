"""The building blocks PVT v2 adds to v1's (Wang et al., "PVT v2: Improved Baselines with Pyramid Vision
Transformer", CVMJ 2022): overlapping patch embedding, the MLP with a depth-wise 3x3 conv, linear spatial-reduction
attention (the "-li" variants) and the block that ties them together.

Semantics follow the official code (whai362/PVT, branch v2, classification/pvt_v2.py), which timm's `pvt_v2.py`
and mmdetection's `PyramidVisionTransformerV2` reproduce: LayerNorm eps 1e-5 in the patch embedding and the
attention's reduction, 1e-6 in the blocks; exact (erf) GELU; PyTorch Conv2d padding with bias everywhere.
"""
import mindspore as ms
from mindspore import nn, ops

from . import fast_ops
from .conv import DepthwiseConv2d, MatmulConv2d
from .layers import (BLOCK_NORM_EPS, EMBED_NORM_EPS, DropPath, SpatialReductionAttention, dense,
                     gelu_then_dense_kernel, layer_norm)

# The linear ("li") attention pools keys and values to this fixed grid whatever the input size.
LINEAR_POOL_SIZE = 7


def tokens_to_grid(tokens, height, width):
    """(B, h*w, C) -> (B, C, h, w)."""
    batch, _, channels = tokens.shape
    return tokens.transpose(0, 2, 1).reshape(batch, channels, height, width)


def grid_to_tokens(grid):
    """(B, C, h, w) -> (B, h*w, C)."""
    batch, channels, height, width = grid.shape
    return grid.reshape(batch, channels, height * width).transpose(0, 2, 1)


class OverlapPatchEmbed(nn.Cell):
    """Overlapping patch embedding: a k x k conv with stride s and padding k // 2, then LayerNorm.

    (B, C_in, H, W) -> tokens (B, h*w, C) and the grid (h, w) with h = floor((H - 1) / s) + 1 for the official
    (k, s) pairs (7, 4) and (3, 2), i.e. ceil(H / s): unlike v1, no pixel at the border is dropped.
    """

    def __init__(self, in_channels, embed_dim, kernel_size, stride, norm_eps=EMBED_NORM_EPS):
        super().__init__()
        if kernel_size <= stride:
            raise ValueError(f"an overlapping patch embedding needs kernel_size > stride, got {kernel_size}, {stride}")
        self.proj = MatmulConv2d(in_channels, embed_dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = layer_norm(embed_dim, norm_eps)

    def construct(self, x):
        x = self.proj(x)
        _, _, height, width = x.shape
        return self.norm(grid_to_tokens(x)), height, width


class LinearSpatialReductionAttention(SpatialReductionAttention):
    """v2's linear SRA: keys and values come from the grid average-pooled to 7x7 (PyTorch's adaptive pooling bins),
    then a 1x1 conv, LayerNorm and GELU, so the attention costs O(h*w * 49) at any input size."""

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, norm_eps=EMBED_NORM_EPS):
        super().__init__(dim, num_heads, sr_ratio=1, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.pool = nn.AdaptiveAvgPool2d(LINEAR_POOL_SIZE)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1, pad_mode="valid", has_bias=True)
        self.norm = layer_norm(dim, norm_eps)
        self.act = fast_ops.GELU()

    def key_value_source(self, x, height, width):
        reduced = self.sr(self.pool(tokens_to_grid(x, height, width)))
        return self.act(self.norm(grid_to_tokens(reduced)))


class ConvMlp(nn.Cell):
    """fc1 -> [ReLU, li only] -> depth-wise 3x3 conv on the token grid -> exact GELU -> fc2.

    The depth-wise conv gives every token its neighbours' features, which is what lets v2 drop the position
    embedding (and so run at any input size without resizing one)."""

    def __init__(self, dim, hidden_dim, drop=0.0, extra_relu=False):
        super().__init__()
        self.fc1 = dense(dim, hidden_dim)
        self.extra_relu = extra_relu
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = DepthwiseConv2d(hidden_dim, 3)
        self.act = fast_ops.GELU()
        self.fc2 = dense(hidden_dim, dim)
        self.has_drop = drop > 0.0
        self.drop = nn.Dropout(p=drop) if self.has_drop else nn.Identity()
        self.gelu_dense = gelu_then_dense_kernel(self.fc2, self.has_drop)
        self.use_gelu_dense = self.gelu_dense is not None

    def construct(self, x, height, width, token_mask=None):
        """`token_mask` (1, N, 1), for size buckets (inference): 1 on the tokens of the valid region, 0 on padding,
        so the depth-wise conv reads zeros beyond the valid region exactly as at the region's own size."""
        x = self.fc1(x)
        if self.extra_relu:
            x = self.relu(x)
        if token_mask is not None:
            x = x * ops.broadcast_to(token_mask, x.shape)
        x = grid_to_tokens(self.dwconv(tokens_to_grid(x, height, width)))
        if self.use_gelu_dense and x.dtype == ms.float32:
            return self.gelu_dense(x, self.fc2.weight, self.fc2.bias)
        x = self.act(x)
        if self.has_drop:
            x = self.drop(x)
        x = self.fc2(x)
        if self.has_drop:
            x = self.drop(x)
        return x


class BlockV2(nn.Cell):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)) with the conv MLP, each branch with drop path."""

    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, linear=False, drop_path=0.0, drop=0.0, attn_drop=0.0,
                 sr_norm_eps=EMBED_NORM_EPS):
        super().__init__()
        self.norm1 = layer_norm(dim, BLOCK_NORM_EPS)
        if linear:
            self.attn = LinearSpatialReductionAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop,
                                                        norm_eps=sr_norm_eps)
        else:
            self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, attn_drop=attn_drop, proj_drop=drop,
                                                  norm_eps=sr_norm_eps)
        self.drop_path = DropPath(drop_path)
        self.norm2 = layer_norm(dim, BLOCK_NORM_EPS)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop, extra_relu=linear)

    def construct(self, x, height, width, key_bias=None, token_mask=None):
        x = x + self.drop_path(self.attn(self.norm1(x), height, width, key_bias))
        x = x + self.drop_path(self.mlp(self.norm2(x), height, width, token_mask))
        return x
