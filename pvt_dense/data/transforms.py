"""The dense-prediction preprocessing of the PVT detection and segmentation recipes (mmdet/mmseg style).

In order: resize keeping the aspect ratio so the short side reaches `short_side` unless the long side would
pass `max_long_side` (bilinear, on uint8, like mmcv's `imrescale`), normalise with the ImageNet statistics on
the 0-255 scale in RGB order, then pad bottom and right with zeros (the mean colour, after normalisation) to a
multiple of `divisor`. A divisor of 32, the stride of the last PVT stage, makes every stage map exactly
padded_size // stride.

All sizes are (height, width).
"""
import math

import cv2
import numpy as np

from ..errors import ConfigError

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def check_positive(**values):
    for name, value in values.items():
        if int(value) != value or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def rescaled_size(height, width, short_side, max_long_side):
    """(new_height, new_width, scale) of the keep-ratio rescale, rounded like mmcv (int(x * scale + 0.5))."""
    check_positive(short_side=short_side, max_long_side=max_long_side)
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    # A 1x10000 strip would round its short side to 0; one pixel is the least an image can keep.
    new_height = max(int(height * scale + 0.5), 1)
    new_width = max(int(width * scale + 0.5), 1)
    return new_height, new_width, scale


def resize_keep_ratio(img, short_side, max_long_side):
    """Resize an (H, W[, C]) image with bilinear interpolation; see `rescaled_size` for the size."""
    height, width = img.shape[:2]
    new_height, new_width, _ = rescaled_size(height, width, short_side, max_long_side)
    if (new_height, new_width) == (height, width):
        return img.copy()
    return cv2.resize(img, (new_width, new_height), interpolation=cv2.INTER_LINEAR)


def normalize(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(img - mean) / std per channel, as float32; `img` is RGB on the 0-255 scale."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    return (img.astype(np.float32) - mean) / std


def padded_size(height, width, divisor=32):
    check_positive(divisor=divisor)
    return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor


def network_input_size(height, width, scale, divisor=32):
    """The (height, width) network input of an image at test time in both dense tasks: the keep-ratio size within
    `scale` (its long and short side bounds, in either order; mmcv's `imrescale`), each side rounded up to a
    multiple of `divisor` (detection pads to it, segmentation's `AlignResize` resizes to it)."""
    new_height, new_width, _ = rescaled_size(height, width, min(scale), max(scale))
    return padded_size(new_height, new_width, divisor)


def pad_to_multiple(img, divisor=32):
    """Pad an (H, W[, C]) image with zeros at the bottom and right to a multiple of `divisor`."""
    height, width = img.shape[:2]
    target_height, target_width = padded_size(height, width, divisor)
    padding = [(0, target_height - height), (0, target_width - width)] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, padding, mode="constant", constant_values=0)


def preprocess_dense(img, short_side=800, max_long_side=1333, divisor=32, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(H, W, 3) uint8 RGB image -> ((3, H_pad, W_pad) float32, meta).

    meta holds `original_size`, `resized_size` and `padded_size` as (height, width) and `scale_factor` as
    (resized_height / height, resized_width / width): the ratios actually applied after rounding, which is what
    maps boxes back to the original image.
    """
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"preprocess_dense expects an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
    height, width = img.shape[:2]
    resized = resize_keep_ratio(img, short_side, max_long_side)
    padded = pad_to_multiple(normalize(resized, mean, std), divisor)
    meta = {
        "original_size": (height, width),
        "resized_size": resized.shape[:2],
        "padded_size": padded.shape[:2],
        "scale_factor": (resized.shape[0] / height, resized.shape[1] / width),
    }
    return np.ascontiguousarray(padded.transpose(2, 0, 1)), meta
