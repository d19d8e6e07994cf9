"""The building blocks of PVT v1: patch embedding, spatial-reduction attention, MLP, transformer block.

Every layer mirrors the official PyTorch code (whai362/PVT) so that converted weights give the same numbers:
PyTorch-style Conv2d padding and bias, LayerNorm eps per norm, exact (erf) GELU, (out, in) Linear weights.
Tokens are (B, N, C) with N = H * W in row-major order, the layout the official code uses.
"""
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.common.initializer import TruncatedNormal

from . import fast_ops
from .conv import PatchConv2d


# The official code uses 1e-6 for the block norms and the final norm, and PyTorch's default 1e-5 for the
# patch-embedding norm and the spatial-reduction norm. Mixing them up costs parity at the 1e-4 level.
# mmdetection's own PyramidVisionTransformer uses 1e-6 in those two as well; `PVTSpec.embed_norm_eps` selects.
BLOCK_NORM_EPS = 1e-6
EMBED_NORM_EPS = 1e-5

# Attention score matrices above this many elements (64 MB in float32) are computed in query-row chunks, so that
# a large input (800x1344: 67200 x 1050 scores per stage-1 block) never holds the whole matrix and its softmax at
# once. The result is the same: each query row's softmax is independent of the others.
MAX_ATTENTION_SCORES = 1 << 24


def dense(in_features, out_features, bias=True):
    """A Linear layer initialised as in the official code: truncated normal std 0.02, zero bias.

    With a bias (every Linear of the official sizes) it is the fused CPU kernel Cell, which has nn.Dense's
    Parameters and semantics."""
    if bias:
        return fast_ops.Dense(in_features, out_features, weight_init=TruncatedNormal(0.02), bias_init="zeros")
    return nn.Dense(in_features, out_features, weight_init=TruncatedNormal(0.02), has_bias=False)


def layer_norm(channels, eps):
    """LayerNorm over the last axis (Parameters `gamma`, `beta`): a fused CPU kernel with nn.LayerNorm's semantics."""
    return fast_ops.LayerNorm(channels, eps)


class DropPath(nn.Cell):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob` in training.

    The per-sample mask comes from a Dropout over a (B, 1, 1) tensor of ones, so it is scaled by 1/keep_prob and
    switches itself off in eval mode like every other dropout.
    """

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.enabled = self.drop_prob > 0.0
        self.dropout = nn.Dropout(p=self.drop_prob if self.enabled else 0.5)

    def construct(self, x):
        if not self.enabled or not self.training:
            return x
        mask = self.dropout(ops.ones((x.shape[0], 1, 1), x.dtype))
        # broadcast explicitly: MindSpore 2.10's CPU Mul keeps 8 bytes per output element for a broadcast input
        # (forward and gradient, every block: ~0.25 GB of RetinaNet-PVT-Tiny's training step at 400x608)
        return x * ops.broadcast_to(ops.stop_gradient(mask), x.shape)


class PatchEmbed(nn.Cell):
    """Non-overlapping patch embedding: (B, C_in, H, W) -> tokens (B, H//p * W//p, C) and the grid (H//p, W//p).

    A 'valid' convolution floors H/p and W/p exactly like PyTorch's Conv2d, so odd input sizes give the same grids.
    """

    def __init__(self, in_channels, embed_dim, patch_size, norm_eps=EMBED_NORM_EPS):
        super().__init__()
        self.proj = PatchConv2d(in_channels, embed_dim, patch_size)
        self.norm = layer_norm(embed_dim, norm_eps)

    def construct(self, x):
        tokens, height, width = self.proj.image_to_tokens(x)
        return self.norm(tokens), height, width


class SpatialReductionAttention(nn.Cell):
    """Multi-head attention whose keys and values come from a grid shrunk `sr_ratio` times by a strided conv.

    With the official ratios (8/4/2/1 at strides 4/8/16/32) the key/value length is (H/32)*(W/32) at every stage,
    which is what makes PVT affordable on high-resolution inputs.
    """

    def __init__(self, dim, num_heads, sr_ratio, qkv_bias=True, attn_drop=0.0, proj_drop=0.0,
                 norm_eps=EMBED_NORM_EPS):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = dense(dim, dim, bias=qkv_bias)
        self.kv = dense(dim, 2 * dim, bias=qkv_bias)
        self.proj = dense(dim, dim)
        self.sr_ratio = sr_ratio
        self.reduces = sr_ratio > 1
        if self.reduces:
            self.sr = PatchConv2d(dim, dim, sr_ratio)
            self.norm = layer_norm(dim, norm_eps)
        self.has_attn_drop = attn_drop > 0.0
        self.attn_drop = nn.Dropout(p=attn_drop) if self.has_attn_drop else nn.Identity()
        self.has_proj_drop = proj_drop > 0.0
        self.proj_drop = nn.Dropout(p=proj_drop) if self.has_proj_drop else nn.Identity()
        self.q_matmul_k = ops.BatchMatMul(transpose_b=True)
        self.attn_matmul_v = ops.BatchMatMul()
        self.softmax = ops.Softmax(axis=-1)
        # Unstack is ~8x faster than two strided slices kv[0], kv[1] on the CPU, with identical values.
        self.unstack_kv = ops.Unstack(axis=0)
        self.max_scores = MAX_ATTENTION_SCORES
        compiled = fast_ops.kernels_for_new_cell()
        # The fused kernel never stores the score matrix; attention dropout needs it, so it takes the ops path.
        self.use_kernel = compiled is not None and compiled.attention is not None and not self.has_attn_drop
        self.attention_kernel = compiled.attention if self.use_kernel else None
        self.attention_bias_kernel = compiled.attention_bias if self.use_kernel else None
        self.attention_meta = Tensor([float(num_heads), float(self.scale)], ms.float32)

    def construct(self, x, height, width, key_bias=None):
        """x (B, N, C) tokens of an (height, width) grid -> (B, N, C). `key_bias` (1, M), for size buckets
        (inference): added to every score of each key before the softmax, -1e30 on keys that lie in padding, which
        then weigh exactly nothing."""
        batch, num_tokens, channels = x.shape
        source = self.key_value_source(x, height, width)
        if key_bias is not None:
            key_bias = ops.broadcast_to(key_bias, (batch, key_bias.shape[1]))
        if self.use_kernel and x.dtype == ms.float32:
            # The kernel reads the heads, keys and values where the q and kv layers put them, and applies the scale.
            if key_bias is None:
                out = self.attention_kernel(self.q(x), self.kv(source), self.attention_meta)
            else:
                out = self.attention_bias_kernel(self.q(x), self.kv(source), self.attention_meta, key_bias)
        else:
            out = self.attention_heads(self.q(x), self.kv(source), key_bias)
        out = self.proj(out)
        if self.has_proj_drop:
            out = self.proj_drop(out)
        return out

    def attention_heads(self, q, kv, key_bias=None):
        """softmax(scale q k^T [+ key_bias]) v per head with MindSpore's operators: q (B, N, C) and kv (B, M, 2C)
        -> (B, N, C)."""
        batch, num_tokens, channels = q.shape
        q = q.reshape(batch, num_tokens, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        kv = kv.reshape(batch, -1, 2, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        k, v = self.unstack_kv(kv)
        q = q * self.scale
        if key_bias is not None:
            key_bias = key_bias.reshape(batch, 1, 1, -1)
        # Shapes are compile-time constants, so this branch and the loop below are resolved when compiling.
        num_scores = batch * self.num_heads * num_tokens * k.shape[2]
        if num_scores <= self.max_scores:
            out = self.attend(q, k, v, key_bias)
        else:
            step = -(-num_tokens // -(-num_scores // self.max_scores))
            parts = ()
            for start in range(0, num_tokens, step):
                parts = parts + (self.attend(q[:, :, start:start + step], k, v, key_bias),)
            out = ops.concat(parts, 2)
        return out.transpose(0, 2, 1, 3).reshape(batch, num_tokens, channels)

    def key_value_source(self, x, height, width):
        """The (B, M, C) tokens keys and values are computed from: the grid shrunk by the strided conv, or x."""
        if not self.reduces:
            return x
        return self.norm(self.sr.tokens_to_tokens(x, height, width))

    def attend(self, q, k, v, key_bias=None):
        """softmax(q k^T [+ key_bias]) v for (B, heads, n, head_dim) queries; softmax is per query row, so query
        chunks are independent."""
        scores = self.q_matmul_k(q, k)
        if key_bias is not None:
            scores = scores + ops.broadcast_to(key_bias, scores.shape)
        attn = self.softmax(scores)
        if self.has_attn_drop:
            attn = self.attn_drop(attn)
        return self.attn_matmul_v(attn, v)


def gelu_then_dense_kernel(fc2, has_drop):
    """The fused GELU + Linear kernel for `fc2` (a fast_ops.Dense), or None where it cannot be used: no kernels, or
    a dropout between the two. The fused kernel never stores GELU's output (the MLP's largest activation besides
    fc1's output); its backward recomputes it from fc1's output."""
    compiled = fast_ops.kernels_for_new_cell()
    if has_drop or not fc2.use_kernel or compiled is None:
        return None
    return compiled.gelu_dense


class Mlp(nn.Cell):
    """fc1 -> exact GELU -> fc2, the transformer feed-forward layer."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = dense(dim, hidden_dim)
        self.act = fast_ops.GELU()  # exact (erf) GELU, one fused pass instead of MindSpore's ~16
        self.fc2 = dense(hidden_dim, dim)
        self.has_drop = drop > 0.0
        self.drop = nn.Dropout(p=drop) if self.has_drop else nn.Identity()
        self.gelu_dense = gelu_then_dense_kernel(self.fc2, self.has_drop)
        self.use_gelu_dense = self.gelu_dense is not None
        # inference: the whole layer in one kernel, its hidden activations never leaving the cache (one stage-1
        # MLP of PVT-Tiny at 800x1216, one thread: 162-170 -> 107 ms; kernels/dense.cc)
        compiled = fast_ops.kernels_for_new_cell()
        self.mlp_kernel = compiled.mlp if self.use_gelu_dense and compiled is not None else None

    def construct(self, x):
        if self.mlp_kernel is not None and not self.training and x.dtype == ms.float32:
            return self.mlp_kernel(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        if self.use_gelu_dense and x.dtype == ms.float32:
            return self.gelu_dense(self.fc1(x), self.fc2.weight, self.fc2.bias)
        x = self.act(self.fc1(x))
        if self.has_drop:
            x = self.drop(x)
        x = self.fc2(x)
        if self.has_drop:
            x = self.drop(x)
        return x


class Block(nn.Cell):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each branch with drop path."""

    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, drop_path=0.0, drop=0.0, attn_drop=0.0,
                 sr_norm_eps=EMBED_NORM_EPS):
        super().__init__()
        self.norm1 = layer_norm(dim, BLOCK_NORM_EPS)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, attn_drop=attn_drop, proj_drop=drop,
                                              norm_eps=sr_norm_eps)
        self.drop_path = DropPath(drop_path)
        self.norm2 = layer_norm(dim, BLOCK_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def construct(self, x, height, width, key_bias=None):
        x = x + self.drop_path(self.attn(self.norm1(x), height, width, key_bias))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x
