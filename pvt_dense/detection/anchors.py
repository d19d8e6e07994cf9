"""RetinaNet's anchors (mmdetection's `AnchorGenerator` semantics), on the host and inside the graph.

Per level of stride s there are `len(ratios) * scales_per_octave` base anchors centred on (0, 0): side
s * octave_base_scale * 2 ** (k / scales_per_octave), reshaped by each aspect ratio r = h / w with the area kept,
ordered ratio-major then scale. Anchors of a map of size (H, W) are the base anchors shifted to (x * s, y * s),
ordered location-major (row, column) then base anchor: exactly the order in which the head's (B, A*K, H, W) output
flattens after a permute to (B, H, W, A*K). Boxes are (x1, y1, x2, y2) with width x2 - x1 (no +1).
"""
import mindspore as ms
import numpy as np
from mindspore import ops

from ..errors import ConfigError


def base_anchors(stride, octave_base_scale=4, scales_per_octave=3, ratios=(0.5, 1.0, 2.0)):
    """(A, 4) float32 anchors of one level centred on the origin, A = len(ratios) * scales_per_octave."""
    if stride <= 0 or octave_base_scale <= 0 or scales_per_octave < 1 or not ratios or min(ratios) <= 0:
        raise ConfigError(f"anchor settings must be positive: stride {stride}, octave_base_scale "
                          f"{octave_base_scale}, scales_per_octave {scales_per_octave}, ratios {ratios}")
    # float32 throughout, in mmdetection's order of operations, so the anchors equal its own bit for bit.
    scales = (np.asarray([2.0 ** (k / scales_per_octave) for k in range(scales_per_octave)]) *
              octave_base_scale).astype(np.float32)
    h_ratios = np.sqrt(np.asarray(ratios, dtype=np.float32))
    w_ratios = np.float32(1.0) / h_ratios
    widths = (np.float32(stride) * w_ratios[:, None] * scales[None, :]).reshape(-1)
    heights = (np.float32(stride) * h_ratios[:, None] * scales[None, :]).reshape(-1)
    half = np.float32(0.5)
    return np.stack([-half * widths, -half * heights, half * widths, half * heights], axis=1).astype(np.float32)


class AnchorGenerator:
    """Anchors of every pyramid level.

    Args:
        strides: one stride per level, e.g. (8, 16, 32, 64, 128) for P3-P7.
        octave_base_scale, scales_per_octave, ratios: see the module docstring (RetinaNet: 4, 3, (0.5, 1, 2)).
    """

    def __init__(self, strides=(8, 16, 32, 64, 128), octave_base_scale=4, scales_per_octave=3,
                 ratios=(0.5, 1.0, 2.0)):
        self.strides = tuple(int(s) for s in strides)
        self.base = tuple(base_anchors(s, octave_base_scale, scales_per_octave, ratios) for s in self.strides)
        self.num_base_anchors = len(ratios) * scales_per_octave

    def level_anchors(self, level, height, width):
        """(height * width * A, 4) float32 anchors of one level for a (height, width) feature map."""
        stride = self.strides[level]
        xs = np.arange(width, dtype=np.float32) * stride
        ys = np.arange(height, dtype=np.float32) * stride
        grid_x, grid_y = np.meshgrid(xs, ys)  # (H, W), row-major
        shifts = np.stack([grid_x, grid_y, grid_x, grid_y], axis=-1).reshape(-1, 1, 4)
        return (shifts + self.base[level][None]).reshape(-1, 4)

    def grid_anchors(self, feature_sizes):
        """One (H_i * W_i * A, 4) array per level for feature maps of sizes [(H_i, W_i), ...]."""
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"{len(feature_sizes)} feature maps for {len(self.strides)} anchor strides")
        return [self.level_anchors(i, h, w) for i, (h, w) in enumerate(feature_sizes)]


def graph_level_anchors(base, stride, height, width):
    """The same anchors as `AnchorGenerator.level_anchors`, built with MindSpore ops inside `construct`.

    `base` is the level's (A, 4) Tensor; height and width are the feature map's (compile-time constant) size.
    """
    xs = ops.arange(0, width, dtype=ms.float32) * stride
    ys = ops.arange(0, height, dtype=ms.float32) * stride
    grid_x = ops.tile(xs.reshape(1, width), (height, 1))
    grid_y = ops.tile(ys.reshape(height, 1), (1, width))
    shifts = ops.stack([grid_x, grid_y, grid_x, grid_y], axis=-1).reshape(-1, 1, 4)
    return (shifts + base.reshape(1, -1, 4)).reshape(-1, 4)


def graph_level_valid(pad_sizes, stride, height, width, num_base_anchors):
    """(B, height * width * A) bool: the anchors of one level that lie on each image's padded area (mmdetection's
    `AnchorGenerator.valid_flags` with the image's `pad_shape`); anchors on the rest of a larger batch canvas take
    no part in assignment or loss. `pad_sizes` is (B, 2) float32 (height, width) of each image padded to the
    divisor."""
    valid_h = ops.ceil(pad_sizes[:, 0:1] / stride)  # (B, 1)
    valid_w = ops.ceil(pad_sizes[:, 1:2] / stride)
    ys = ops.tile(ops.arange(0, height, dtype=ms.float32).reshape(height, 1), (1, width)).reshape(1, -1)
    xs = ops.tile(ops.arange(0, width, dtype=ms.float32).reshape(1, width), (height, 1)).reshape(1, -1)
    valid = ops.cast(ops.logical_and(ys < valid_h, xs < valid_w), ms.float32)  # (B, H*W)
    batch = pad_sizes.shape[0]
    return ops.tile(ops.expand_dims(valid, -1), (1, 1, num_base_anchors)).reshape(batch, -1) > 0.5
