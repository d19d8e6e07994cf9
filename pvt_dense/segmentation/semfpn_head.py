"""The Semantic FPN head (Kirillov et al., 2019; mmseg's `FPNHead`) that the official PVT segmentation code uses.

Each pyramid level goes through 3x3 conv-BN-ReLU blocks, one per factor of two between its stride and the finest
stride, each followed by a 2x bilinear upsampling (align_corners=False): stride 32 takes three blocks to reach
stride 4, stride 4 takes one and no upsampling. The per-level maps are summed at the finest level's size, then
dropout and a 1x1 classifier give the class logits at the finest stride.
"""
import math

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.common.initializer import HeNormal, Normal, Zero, initializer

from ..errors import ConfigError
from ..models.conv import MatmulConv2d
from ..models.fast_ops import kernels_for_new_cell
from ..models.fpn import apply_mask
from .sync_batchnorm import batch_norm


class ConvBNReLU(nn.Cell):
    """3x3 conv (no bias: the norm has one) + BatchNorm + ReLU; mmcv's ConvModule init (Kaiming normal, fan-out)."""

    def __init__(self, in_channels, out_channels, synchronized_bn=False):
        super().__init__()
        self.conv = MatmulConv2d(in_channels, out_channels, 3, has_bias=False)  # see models/conv.py: speed
        self.conv.weight.set_data(initializer(HeNormal(mode="fan_out", nonlinearity="relu"), self.conv.weight.shape))
        self.bn = batch_norm(out_channels, synchronized_bn)
        self.relu = nn.ReLU()
        compiled = kernels_for_new_cell()
        self.fused = compiled.conv2d(3, 1, 1, relu=True) if compiled is not None else None
        self.fused_meta = Tensor([1.0, 1.0, 1.0], ms.float32)  # stride 1, padding 1, ReLU

    def construct(self, x):
        if self.fused is not None and not self.training and x.dtype == ms.float32:
            # Inference: the BatchNorm's moving statistics folded into the convolution's weight and bias, and the
            # ReLU applied by the convolution kernel on each block while it is in cache: one pass over the map
            # instead of three (conv, norm, ReLU).
            scale = self.bn.gamma / ops.sqrt(self.bn.moving_variance + self.bn.eps)
            weight = self.conv.weight * scale.reshape(-1, 1, 1, 1)
            return self.fused(x, weight, self.bn.beta - self.bn.moving_mean * scale, self.fused_meta)
        return self.relu(self.bn(self.conv(x)))


class Upsample2x(nn.Cell):
    def construct(self, x):
        return ops.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear", align_corners=False)


class SemanticFPNHead(nn.Cell):
    """Pyramid maps -> class logits at the finest pyramid stride.

    Args:
        in_channels: channels of each pyramid level, finest first (e.g. (256,) * 4 from the FPN).
        in_strides: stride of each level; each must be a power-of-two multiple of the first.
        num_classes: classes predicted (150 for ADE20K after the zero-label shift).
        channels: width of every conv block (128 in the recipe).
        dropout_ratio: dropout before the classifier (0.1).
        synchronized_bn: BatchNorm statistics over all ranks (for distributed training).

    `construct(features)` takes the tuple of (N, C_i, H_i, W_i) maps and returns (N, num_classes, H_0, W_0).
    """

    def __init__(self, in_channels, in_strides, num_classes, channels=128, dropout_ratio=0.1, synchronized_bn=False):
        super().__init__()
        in_channels, in_strides = tuple(in_channels), tuple(in_strides)
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ConfigError(f"the Semantic FPN head needs one stride per input: {in_channels}, {in_strides}")
        if num_classes < 1 or channels < 1 or not 0.0 <= dropout_ratio < 1.0:
            raise ConfigError(f"num_classes and channels must be positive and dropout_ratio in [0, 1): "
                              f"{num_classes}, {channels}, {dropout_ratio}")
        scale_heads, level_steps = [], []
        for channels_in, stride in zip(in_channels, in_strides):
            steps = math.log2(stride / in_strides[0])
            if not steps.is_integer() or steps < 0:
                raise ConfigError(f"head input strides must be power-of-two multiples of the first, got {in_strides}")
            blocks = []
            for k in range(max(1, int(steps))):
                blocks.append(ConvBNReLU(channels_in if k == 0 else channels, channels, synchronized_bn))
                if steps > 0:
                    blocks.append(Upsample2x())
            scale_heads.append(nn.SequentialCell(blocks))
            level_steps.append(int(steps))
        self.scale_heads = nn.CellList(scale_heads)
        self.level_steps = tuple(level_steps)  # 2x upsamplings of each level (0: conv only)
        self.num_levels = len(in_channels)
        self.num_classes = int(num_classes)
        self.use_dropout = dropout_ratio > 0
        self.dropout = nn.Dropout(p=dropout_ratio) if self.use_dropout else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1, pad_mode="valid", has_bias=True)
        self.classifier.weight.set_data(initializer(Normal(0.01), self.classifier.weight.shape))
        self.classifier.bias.set_data(initializer(Zero(), self.classifier.bias.shape))
        self.stride = int(in_strides[0])

    def construct(self, features, masks=None, edges=None):
        """`masks` and `edges` (size buckets, inference; see `models.buckets`): per level, a (1, 1, h, w) 0/1 mask
        and the (rows, columns) gather indices that replicate the valid region's edge. Each 3x3 conv then reads
        zeros beyond the valid region and each 2x upsampling reads the replicated edge, as the region's own run
        pads and clamps."""
        if masks is None:
            output = self.scale_heads[0](features[0])
        else:
            output = self.masked_scale_head(0, features[0], masks, edges)
        for i in range(1, self.num_levels):
            if masks is None:
                level = self.scale_heads[i](features[i])
            else:
                level = self.masked_scale_head(i, features[i], masks, edges)
            # Odd input sizes floor differently per stride, so the upsampled map can be a pixel off.
            output = output + ops.interpolate(level, size=output.shape[2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(output))

    def masked_scale_head(self, i, x, masks, edges):
        """Scale head i block by block, at level i, i - 1, ... as it upsamples."""
        blocks = self.scale_heads[i]
        steps = self.level_steps[i]
        if steps == 0:
            return blocks[0](apply_mask(x, masks, i))
        for k in range(steps):
            x = blocks[2 * k](apply_mask(x, masks, i - k))
            x = blocks[2 * k + 1](replicate_edge(x, edges[i - k]))
        return x


def replicate_edge(x, edge):
    """(B, C, H, W) with rows and columns beyond the valid region replaced by its last row and column."""
    return ops.gather(ops.gather(x, edge[0], 2), edge[1], 3)
