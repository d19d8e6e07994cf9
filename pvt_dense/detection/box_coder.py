"""Box deltas of RetinaNet (mmdetection's `DeltaXYWHBBoxCoder`, means 0 and stds 1 by default).

For an anchor with centre (px, py) and size (pw, ph) and a box (gx, gy, gw, gh):
dx = (gx - px) / pw, dy = (gy - py) / ph, dw = log(gw / pw), dh = log(gh / ph), then (d - mean) / std.
Encoding runs inside the training graph (targets from padded ground truth), decoding on the host after inference.
Decoded width/height ratios are clamped to |log(1000 / 16)| so one wild delta cannot overflow `exp`.
"""
import math

import numpy as np
from mindspore import ops

MAX_LOG_RATIO = abs(math.log(16.0 / 1000.0))


def encode_deltas(anchors, boxes, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0)):
    """(..., 4) anchors and boxes (MindSpore Tensors, x1y1x2y2) -> (..., 4) normalised deltas.

    Degenerate boxes (zero width) give -inf/nan deltas; callers mask them (they are never positives).
    """
    pw = anchors[..., 2] - anchors[..., 0]
    ph = anchors[..., 3] - anchors[..., 1]
    px = (anchors[..., 0] + anchors[..., 2]) * 0.5
    py = (anchors[..., 1] + anchors[..., 3]) * 0.5
    gw = boxes[..., 2] - boxes[..., 0]
    gh = boxes[..., 3] - boxes[..., 1]
    gx = (boxes[..., 0] + boxes[..., 2]) * 0.5
    gy = (boxes[..., 1] + boxes[..., 3]) * 0.5
    return ops.stack([((gx - px) / pw - means[0]) / stds[0], ((gy - py) / ph - means[1]) / stds[1],
                      (ops.log(gw / pw) - means[2]) / stds[2], (ops.log(gh / ph) - means[3]) / stds[3]], axis=-1)

def decode_deltas(anchors, deltas, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0), max_shape=None):
    """(N, 4) numpy anchors and deltas -> (N, 4) boxes; clipped to max_shape (height, width) when given."""
    anchors = np.asarray(anchors, dtype=np.float32)
    deltas = np.asarray(deltas, dtype=np.float32) * np.asarray(stds, np.float32) + np.asarray(means, np.float32)
    pw = anchors[:, 2] - anchors[:, 0]
    ph = anchors[:, 3] - anchors[:, 1]
    px = (anchors[:, 0] + anchors[:, 2]) * 0.5
    py = (anchors[:, 1] + anchors[:, 3]) * 0.5
    dw = np.clip(deltas[:, 2], -MAX_LOG_RATIO, MAX_LOG_RATIO)
    dh = np.clip(deltas[:, 3], -MAX_LOG_RATIO, MAX_LOG_RATIO)
    gw = pw * np.exp(dw)
    gh = ph * np.exp(dh)
    gx = px + pw * deltas[:, 0]
    gy = py + ph * deltas[:, 1]
    boxes = np.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], axis=1)
    if max_shape is not None:
        height, width = max_shape
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    return boxes
