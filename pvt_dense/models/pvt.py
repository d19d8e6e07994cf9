"""Pyramid Vision Transformer v1 (Wang et al., ICCV 2021) as a dense-prediction backbone and as a classifier.

Read top to bottom: the variants (as data), one stage, the backbone that returns stage maps, the classifier.
The backbone declares its outputs (`out_channels`, `strides`, `feature_info`) so necks and heads never copy them.
"""
from dataclasses import dataclass, replace
from typing import Tuple

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import TruncatedNormal, initializer

from .buckets import check_bucket, key_bias, pad_tokens
from .layers import BLOCK_NORM_EPS, EMBED_NORM_EPS, Block, PatchEmbed, dense, layer_norm

# LayerNorm eps of the patch-embedding and spatial-reduction norms, by the code a checkpoint was trained with: the
# official PVT code (PyTorch's default 1e-5 there) or mmdetection's PyramidVisionTransformer (1e-6 in every norm).
# The block norms are 1e-6 in both.
NORM_EPS_STYLES = {"official": EMBED_NORM_EPS, "mmdet": BLOCK_NORM_EPS}


class NormEpsStyle:
    """`embed_norm_eps` of a spec dataclass named by the code its weights come from (see NORM_EPS_STYLES)."""

    @property
    def norm_eps_style(self):
        return next((name for name, eps in NORM_EPS_STYLES.items() if eps == self.embed_norm_eps), "custom")

    def with_norm_eps_style(self, style):
        if style not in NORM_EPS_STYLES:
            raise ValueError(f"unknown norm eps style {style!r}; choose one of {', '.join(NORM_EPS_STYLES)}")
        return replace(self, embed_norm_eps=NORM_EPS_STYLES[style])


@dataclass(frozen=True)
class PVTSpec(NormEpsStyle):
    """Hyper-parameters of one PVT size. Everything but `depths` is shared by the four official sizes."""

    depths: Tuple[int, int, int, int]
    embed_dims: Tuple[int, int, int, int] = (64, 128, 320, 512)
    num_heads: Tuple[int, int, int, int] = (1, 2, 5, 8)
    mlp_ratios: Tuple[int, int, int, int] = (8, 8, 4, 4)
    sr_ratios: Tuple[int, int, int, int] = (8, 4, 2, 1)
    patch_sizes: Tuple[int, int, int, int] = (4, 2, 2, 2)
    pretrain_size: int = 224
    embed_norm_eps: float = EMBED_NORM_EPS  # patch-embedding and spatial-reduction norms (see NORM_EPS_STYLES)

    @property
    def strides(self):
        return tuple(int(np.prod(self.patch_sizes[: i + 1])) for i in range(len(self.patch_sizes)))

    def grid(self, stage):
        side = self.pretrain_size // self.strides[stage]
        return side, side


PVT_SPECS = {
    "pvt_tiny": PVTSpec(depths=(2, 2, 2, 2)),
    "pvt_small": PVTSpec(depths=(3, 4, 6, 3)),
    "pvt_medium": PVTSpec(depths=(3, 4, 18, 3)),
    "pvt_large": PVTSpec(depths=(3, 8, 27, 3)),
}


def drop_path_schedule(depths, drop_path_rate):
    """Per-stage lists of drop-path rates rising linearly over all blocks of all stages (official schedule)."""
    total = sum(depths)
    rates = [float(r) for r in np.linspace(0.0, drop_path_rate, total)] if total > 1 else [0.0] * total
    schedule, start = [], 0
    for depth in depths:
        schedule.append(rates[start:start + depth])
        start += depth
    return schedule


class PVTStage(nn.Cell):
    """Patch embedding + position embedding + transformer blocks of one stage.

    Input (B, C_in, H, W); output tokens (B, [1 +] h*w, C) and the grid (h, w). The position embedding is learned
    for the pretraining grid and bilinearly resized (PyTorch semantics, align_corners=False) to any other grid.
    With `with_cls_token` the embedding carries one extra leading slot for the classifier's cls token.
    """

    def __init__(self, in_channels, dim, patch_size, grid, depth, num_heads, mlp_ratio, sr_ratio, drop_path_rates,
                 with_cls_token=False, drop_rate=0.0, attn_drop_rate=0.0, norm_eps=EMBED_NORM_EPS):
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size, norm_eps)
        self.grid_h, self.grid_w = grid
        self.with_cls_token = with_cls_token
        num_positions = self.grid_h * self.grid_w + (1 if with_cls_token else 0)
        self.pos_embed = Parameter(initializer(TruncatedNormal(0.02), (1, num_positions, dim)), name="pos_embed")
        self.has_pos_drop = drop_rate > 0.0
        self.pos_drop = nn.Dropout(p=drop_rate) if self.has_pos_drop else nn.Identity()
        self.blocks = nn.CellList([
            Block(dim, num_heads, mlp_ratio, sr_ratio, drop_path=rate, drop=drop_rate, attn_drop=attn_drop_rate,
                  sr_norm_eps=norm_eps)
            for rate in drop_path_rates
        ])
        self.dim = dim
        self.sr_ratio = sr_ratio

    def resized_pos_embed(self, pos_embed, height, width):
        """(1, gh*gw, C) learned grid -> (1, height*width, C); identity at the pretraining grid."""
        if height == self.grid_h and width == self.grid_w:
            return pos_embed
        grid = pos_embed.reshape(1, self.grid_h, self.grid_w, self.dim).transpose(0, 3, 1, 2)
        grid = ops.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        return grid.reshape(1, self.dim, height * width).transpose(0, 2, 1)

    def bucket_inputs(self, valid_grid, bucket_grid, sr_ratio=None):
        """The `valid` argument of `construct` for a size bucket (see `pvt_dense.models.buckets`): the position
        embedding resized to the valid grid and zero beyond it, and the key bias that leaves padded keys out."""
        height, width = valid_grid
        pos = self.resized_pos_embed(self.pos_embed, height, width).asnumpy()
        return (pad_tokens(pos, valid_grid, bucket_grid), key_bias(valid_grid, bucket_grid, self.sr_ratio))

    def construct(self, x, cls_token=None, valid=None):
        tokens, height, width = self.patch_embed(x)
        if valid is not None:
            # a size bucket: the embedding of the valid grid comes in (zero beyond it); padded keys are left out
            tokens = tokens + valid[0]
            for block in self.blocks:
                tokens = block(tokens, height, width, valid[1])
            return tokens, height, width
        if self.with_cls_token:
            pos = ops.concat((self.pos_embed[:, :1], self.resized_pos_embed(self.pos_embed[:, 1:], height, width)), 1)
            cls = ops.broadcast_to(cls_token, (tokens.shape[0], 1, self.dim))
            tokens = ops.concat((cls, tokens), 1)
        else:
            pos = self.resized_pos_embed(self.pos_embed, height, width)
        tokens = tokens + pos
        if self.has_pos_drop:
            tokens = self.pos_drop(tokens)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        return tokens, height, width


def build_stages(spec, drop_path_rate, with_cls_token, drop_rate=0.0, attn_drop_rate=0.0, num_stages=None,
                 frozen_stages=0):
    """The first `num_stages` stages (all by default). The drop-path schedule always spans all blocks of all
    stages, as in the official code. Frozen stages get no dropout or drop path at all: a parent Cell's
    `set_train(True)` reaches them too, and a frozen stage must behave as in eval mode."""
    schedule = drop_path_schedule(spec.depths, drop_path_rate)
    stages, in_channels = [], 3
    last = len(spec.depths) - 1
    for i in range(num_stages or len(spec.depths)):
        frozen = i < frozen_stages
        stages.append(PVTStage(
            in_channels, spec.embed_dims[i], spec.patch_sizes[i], spec.grid(i), spec.depths[i], spec.num_heads[i],
            spec.mlp_ratios[i], spec.sr_ratios[i], [0.0] * spec.depths[i] if frozen else schedule[i],
            with_cls_token=with_cls_token and i == last, drop_rate=0.0 if frozen else drop_rate,
            attn_drop_rate=0.0 if frozen else attn_drop_rate, norm_eps=spec.embed_norm_eps))
        in_channels = spec.embed_dims[i]
    return nn.CellList(stages)


def tokens_to_map(tokens, height, width):
    """(B, h*w, C) -> (B, C, h, w)."""
    batch, _, channels = tokens.shape
    return tokens.transpose(0, 2, 1).reshape(batch, channels, height, width)


@dataclass(frozen=True)
class FeatureInfo:
    """What one returned stage map is: its stage index, channel count and stride relative to the input."""

    stage: int
    channels: int
    stride: int


def check_image_batch(shape, in_channels, min_side, owner):
    """Raise a clear error for inputs the convolutions would reject deep inside MindSpore."""
    if len(shape) != 4:
        raise ValueError(f"{owner} expects a 4-D NCHW image batch, got a {len(shape)}-D tensor of shape "
                         f"{tuple(shape)}")
    if shape[1] != in_channels:
        raise ValueError(f"{owner} expects {in_channels} input channels (NCHW), got shape {tuple(shape)}")
    if shape[2] < min_side or shape[3] < min_side:
        raise ValueError(f"{owner} needs images of at least {min_side}x{min_side} pixels (one stride-{min_side} "
                         f"cell), got {shape[2]}x{shape[3]}")


class ChecksImageBatch:
    """Mixin for the PVT Cells that take images: the input batch is checked (rank, channels, at least one cell of
    the last used stage's stride) before MindSpore sees it, in graph and PyNative mode alike."""

    def __call__(self, *args, **kwargs):
        if args and hasattr(args[0], "shape"):
            check_image_batch(args[0].shape, self.in_channels, self.spec.strides[self.num_stages - 1],
                              type(self).__name__)
        return super().__call__(*args, **kwargs)


class PVTBackbone(ChecksImageBatch, nn.Cell):
    """PVT as a dense-prediction backbone: NCHW float32 images of any size -> tuple of NCHW stage maps.

    Args:
        spec: a `PVTSpec` (see `PVT_SPECS`).
        out_indices: which stages to return, in increasing order (0..3); channels 64/128/320/512 at strides
            4/8/16/32 for the official sizes.
        drop_path_rate: the stochastic-depth rate of the last block; earlier blocks rise linearly from 0.
        frozen_stages: freeze the patch embedding, position embedding and blocks of the first k stages (-1: none).
            Frozen stages are built without dropout or drop path, so they compute the same in train and eval mode
            wherever the backbone is nested.
        recompute_stages: stage indices whose activations are recomputed in the backward pass (saves memory at
            high resolution, costs one extra forward of those stages).

    Outputs of `construct(x)`: a tuple with one (B, C_i, H // s_i, W // s_i) map per selected stage, where the
    division floors exactly like PyTorch's strided convolutions.
    """

    # Builds the stages from the spec; PVT v2's backbone (pvt_v2.py) shares everything else and swaps this.
    stage_builder = staticmethod(build_stages)

    def __init__(self, spec, out_indices=(0, 1, 2, 3), drop_path_rate=0.0, frozen_stages=-1, recompute_stages=(),
                 drop_rate=0.0, attn_drop_rate=0.0):
        super().__init__()
        num_stages = len(spec.depths)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not all(
                0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices must be increasing stage indices in 0..{num_stages - 1}, got "
                             f"{out_indices}")
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be in -1..{num_stages}, got {frozen_stages}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.spec = spec
        self.out_indices = out_indices
        # Stages after the last requested output are never run, so they are not built either.
        self.num_stages = out_indices[-1] + 1
        self.frozen_stages = min(frozen_stages, self.num_stages)
        self.stages = self.stage_builder(spec, drop_path_rate, with_cls_token=False, drop_rate=drop_rate,
                                         attn_drop_rate=attn_drop_rate, num_stages=self.num_stages,
                                         frozen_stages=max(self.frozen_stages, 0))
        self.return_flags = tuple(i in out_indices for i in range(self.num_stages))
        self.feature_info = tuple(FeatureInfo(i, spec.embed_dims[i], spec.strides[i]) for i in out_indices)
        self.out_channels = tuple(info.channels for info in self.feature_info)
        self.strides = tuple(info.stride for info in self.feature_info)
        self.in_channels = 3
        for stage_index in recompute_stages:
            if not 0 <= stage_index < self.num_stages:
                raise ValueError(f"recompute_stages entries must be in 0..{self.num_stages - 1}, got {stage_index}")
            self.stages[stage_index].recompute()
        self._freeze_stages()

    def _freeze_stages(self):
        for stage in list(self.stages)[: max(self.frozen_stages, 0)]:
            for param in stage.get_parameters():
                param.requires_grad = False

    # Whether `bucket_inputs` can make one graph serve many input sizes exactly (see `pvt_dense.models.buckets`).
    supports_buckets = True

    def bucket_inputs(self, valid_size, bucket_size):
        """The `valid` argument of `construct` for images whose valid region `valid_size` (h, w: multiples of the
        last stage's stride) lies top-left in a zero-padded `bucket_size` input: one tuple per stage."""
        check_bucket(valid_size, bucket_size, self.spec.strides[self.num_stages - 1])
        return tuple(self.stages[i].bucket_inputs(
            (valid_size[0] // stride, valid_size[1] // stride), (bucket_size[0] // stride, bucket_size[1] // stride))
            for i, stride in enumerate(self.spec.strides[:self.num_stages]))

    def construct(self, x, valid=None):
        """x (B, 3, H, W) -> the selected stage maps. With `valid` (`bucket_inputs`) the maps equal, on the valid
        region, those of the valid region alone; beyond it they hold values nothing should read."""
        outs = ()
        for i in range(self.num_stages):
            if valid is None:
                tokens, height, width = self.stages[i](x)
            else:
                tokens, height, width = self.stages[i](x, valid=valid[i])
            x = tokens_to_map(tokens, height, width)
            if self.return_flags[i]:
                outs = outs + (x,)
        return outs


class PVTClassifier(ChecksImageBatch, nn.Cell):
    """The ImageNet classifier of the official code: cls token joins at the last stage, final norm, linear head.

    `forward_features(x)` returns the normalised cls embedding (B, C); `construct(x)` the logits (B, num_classes).
    """

    def __init__(self, spec, num_classes=1000, drop_path_rate=0.0, drop_rate=0.0, attn_drop_rate=0.0):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.spec = spec
        self.num_classes = num_classes
        self.stages = build_stages(spec, drop_path_rate, with_cls_token=True, drop_rate=drop_rate,
                                   attn_drop_rate=attn_drop_rate)
        self.num_stages = len(spec.depths)
        dim = spec.embed_dims[-1]
        self.cls_token = Parameter(initializer(TruncatedNormal(0.02), (1, 1, dim)), name="cls_token")
        self.norm = layer_norm(dim, BLOCK_NORM_EPS)
        self.has_head = num_classes > 0
        self.head = dense(dim, num_classes) if self.has_head else nn.Identity()
        self.in_channels = 3
        self.num_features = dim

    def forward_features(self, x):
        last = self.num_stages - 1
        for i in range(last):
            tokens, height, width = self.stages[i](x)
            x = tokens_to_map(tokens, height, width)
        tokens, _, _ = self.stages[last](x, self.cls_token)
        return self.norm(tokens)[:, 0]

    def construct(self, x):
        return self.head(self.forward_features(x))


def parameter_count(net):
    return int(sum(np.prod(p.shape) for p in net.get_parameters()))
