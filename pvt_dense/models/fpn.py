"""Feature Pyramid Network neck shared by the detection and segmentation heads.

The semantics are mmdetection's `FPN` (which the official PVT detection and segmentation configs use), so converted
mmdet/mmseg neck weights keep their meaning: 1x1 lateral convs, a top-down pathway that upsamples each coarser map
to the exact size of the finer one (nearest), 3x3 output convs, and optional extra coarser levels made by stride-2
3x3 convs (RetinaNet's P6/P7) or by subsampling. The neck reads its input channels and strides from the backbone
(`build_neck`), and declares its own, so heads never copy channel lists from a config.
"""
import math

from mindspore import nn, ops
from mindspore.common.initializer import XavierUniform, Zero, initializer

from ..errors import ConfigError
from .conv import MatmulConv2d

EXTRA_CONV_SOURCES = ("on_input", "on_lateral", "on_output")


def conv2d(in_channels, out_channels, kernel_size, stride=1):
    """A PyTorch-equivalent conv (explicit symmetric padding, bias) with mmdet's FPN init (Xavier uniform, zero bias);
    3x3 ones through `MatmulConv2d` (MindSpore's CPU 3x3 kernel is the slow one)."""
    if kernel_size > 1:
        conv = MatmulConv2d(in_channels, out_channels, kernel_size, stride=stride, has_bias=True)
    else:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad", padding=0,
                         has_bias=True)
    conv.weight.set_data(initializer(XavierUniform(), conv.weight.shape, conv.weight.dtype))
    conv.bias.set_data(initializer(Zero(), conv.bias.shape, conv.bias.dtype))
    return conv


def apply_mask(x, masks, level):
    """x times masks[level] (broadcast explicitly: see models/conv.py on broadcasting kernels), or x without masks."""
    if masks is None:
        return x
    return x * ops.broadcast_to(masks[level], x.shape)


def add_upsampled(finer, coarse, training=False):
    """finer + coarse upsampled (nearest) to finer's size. In inference, where finer is exactly twice coarse's size
    (every input a multiple of 32), as one broadcasting add on a (h, 2, w, 2) view: MindSpore's
    ResizeNearestNeighbor runs on one thread, 62 ms for 256 channels at 128x176 against 5 ms for the add (the
    same values). Training keeps the interpolation, whose backward needs no broadcast tables."""
    batch, channels, height, width = coarse.shape
    if not training and finer.shape[2] == 2 * height and finer.shape[3] == 2 * width:
        return (finer.reshape(batch, channels, height, 2, width, 2)
                + coarse.reshape(batch, channels, height, 1, width, 1)).reshape(finer.shape)
    return finer + ops.interpolate(coarse, size=finer.shape[2:], mode="nearest")


class FPN(nn.Cell):
    """Feature pyramid over backbone maps `inputs[start_level:]`, plus `num_outs - used` extra coarser levels.

    Args:
        in_channels: channels of each backbone output, finest first (e.g. (64, 128, 320, 512)).
        in_strides: stride of each backbone output; consecutive strides must double.
        out_channels: channels of every pyramid level.
        start_level: index of the first backbone output used (RetinaNet skips stride 4: too many anchors there).
        num_outs: number of pyramid levels returned (default: one per used backbone output).
        add_extra_convs: how extra levels are made: None subsamples the last output (1x1 max-pool, stride 2);
            "on_input" / "on_lateral" / "on_output" apply a stride-2 3x3 conv to the last backbone map used /
            its lateral / the last pyramid output, then stride-2 3x3 convs on each new level.
        relu_before_extra_convs: apply ReLU before every extra conv after the first.

    `construct(features)` takes the backbone's tuple of (N, C_i, H_i, W_i) maps and returns a tuple of `num_outs`
    maps (N, out_channels, H_k, W_k), finest first; `self.strides` and `self.out_channels` describe them.
    """

    def __init__(self, in_channels, in_strides, out_channels=256, start_level=0, num_outs=None,
                 add_extra_convs=None, relu_before_extra_convs=False):
        super().__init__()
        in_channels = tuple(int(c) for c in in_channels)
        in_strides = tuple(int(s) for s in in_strides)
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ConfigError(f"FPN needs one stride per input map: in_channels {in_channels}, in_strides "
                              f"{in_strides}")
        if not 0 <= start_level < len(in_channels):
            raise ConfigError(f"FPN start_level must be in 0..{len(in_channels) - 1} (the backbone gives "
                              f"{len(in_channels)} maps), got {start_level}")
        used_strides = in_strides[start_level:]
        for finer, coarser in zip(used_strides, used_strides[1:]):
            if coarser != 2 * finer:
                raise ConfigError(f"FPN inputs must have strides that double level to level, got {used_strides}")
        if not math.log2(used_strides[0]).is_integer():
            raise ConfigError(f"FPN input strides must be powers of two, got {used_strides}")
        used = len(in_channels) - start_level
        num_outs = used if num_outs is None else int(num_outs)
        if num_outs < used:
            raise ConfigError(f"FPN num_outs ({num_outs}) must be at least the number of backbone maps used "
                              f"({used})")
        if add_extra_convs not in (None, False) + EXTRA_CONV_SOURCES:
            raise ConfigError(f"FPN add_extra_convs must be one of None, {', '.join(EXTRA_CONV_SOURCES)}; got "
                              f"{add_extra_convs!r}")
        if out_channels < 1:
            raise ConfigError(f"FPN out_channels must be positive, got {out_channels}")

        self.start_level = int(start_level)
        self.used_levels = used
        self.num_outs = num_outs
        self.extra_source = add_extra_convs or None
        self.relu_before_extra_convs = bool(relu_before_extra_convs)
        self.lateral_convs = nn.CellList([conv2d(c, out_channels, 1) for c in in_channels[start_level:]])
        self.fpn_convs = nn.CellList([conv2d(out_channels, out_channels, 3) for _ in range(used)])
        extra_convs = []
        if self.extra_source is not None:
            for i in range(num_outs - used):
                source_channels = in_channels[-1] if i == 0 and self.extra_source == "on_input" else out_channels
                extra_convs.append(conv2d(source_channels, out_channels, 3, stride=2))
        self.extra_convs = nn.CellList(extra_convs)
        self.relu = nn.ReLU()
        self.subsample = nn.MaxPool2d(kernel_size=1, stride=2)
        self.out_channels = (int(out_channels),) * num_outs
        self.strides = tuple(used_strides[0] * 2 ** k for k in range(num_outs))

    def construct(self, features, masks=None):
        """`masks` (size buckets, inference): one (1, 1, h, w) 0/1 mask per output level (`models.buckets.
        level_masks`); every 3x3 conv then reads zeros beyond the valid region, as at the region's own size."""
        laterals = ()
        for i in range(self.used_levels):
            laterals = laterals + (self.lateral_convs[i](features[self.start_level + i]),)
        # Top-down: each coarser map, upsampled to the finer map's exact size (odd sizes included), is added in.
        merged = (laterals[self.used_levels - 1],)
        for i in range(self.used_levels - 2, -1, -1):
            finer = laterals[i]
            merged = (add_upsampled(finer, merged[0], self.training),) + merged
        outs = ()
        for i in range(self.used_levels):
            outs = outs + (self.fpn_convs[i](apply_mask(merged[i], masks, i)),)
        if self.num_outs > self.used_levels:
            if self.extra_source is None:
                for _ in range(self.num_outs - self.used_levels):
                    outs = outs + (self.subsample(outs[-1]),)
            else:
                if self.extra_source == "on_input":
                    source = features[len(features) - 1]
                elif self.extra_source == "on_lateral":
                    source = merged[self.used_levels - 1]
                else:
                    source = outs[-1]
                outs = outs + (self.extra_convs[0](apply_mask(source, masks, self.used_levels - 1)),)
                for i in range(1, self.num_outs - self.used_levels):
                    previous = self.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs = outs + (self.extra_convs[i](apply_mask(previous, masks, self.used_levels + i - 1)),)
        return outs


NECKS = {"fpn": FPN}
"""The one table of necks, shared by the detection and segmentation configs (their `neck:` key names one of these);
each recipe passes its own options (levels, extra convs) through `build_neck`."""


def build_neck(backbone, name="fpn", **options):
    """Build the neck `name` on top of `backbone`, reading its declared `out_channels` and `strides`."""
    if name not in NECKS:
        raise ConfigError(f"unknown neck {name!r}; valid necks: {', '.join(sorted(NECKS))}")
    return NECKS[name](backbone.out_channels, backbone.strides, **options)
