"""Detection preprocessing: mmdetection 3.3's `Resize(scale=(1333, 800), keep_ratio=True)`, `RandomFlip`, and its
`DetDataPreprocessor` (normalise, pad to a multiple of 32).

`img_scale` is mmdetection's (long side, short side) bound: an image is resized keeping its ratio until its short
side reaches 800 or its long side 1333, sizes rounded as `mmcv.imrescale` does, pixels by OpenCV's bilinear resize.
At test time each image is padded only to the next multiple of `size_divisor`, as mmdetection does: PVT's attention is
global, so every padding token changes every output, and only this protocol reproduces mmdetection's detections.
Training pads a batch to its largest image rounded up to the divisor (mmdetection), then further up to a coarser
`grid` so that graph mode compiles a bounded number of batch shapes (`batch_shape`); the loss ignores the anchors
beyond each image's own padded size, so the extra padding changes only what the backbone sees.
"""
import math

import cv2
import numpy as np

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, padded_size, rescaled_size
from ..errors import ConfigError


def check_img_scale(img_scale, divisor):
    if len(img_scale) != 2 or min(img_scale) < 1 or divisor < 1:
        raise ConfigError(f"img_scale must be two positive sizes (long, short) and size_divisor positive, got "
                          f"{img_scale} and {divisor}")


def is_landscape(height, width):
    return width > height


def round_up(value, divisor):
    return int(math.ceil(value / divisor) * divisor)


def canvas_shape(landscape, img_scale=(1333, 800), divisor=32):
    """The largest padded (height, width) a resized landscape (or other) image can need: the bound of the
    training batch shapes, (800, 1344) or (1344, 800) in the recipe."""
    check_img_scale(img_scale, divisor)
    long_side, short_side = max(img_scale), min(img_scale)
    short_pad, long_pad = round_up(short_side, divisor), round_up(long_side, divisor)
    return (short_pad, long_pad) if landscape else (long_pad, short_pad)


def batch_shape(pad_shapes, grid, limit):
    """The (height, width) a training batch is padded to: the largest of its images' padded shapes (mmdetection),
    each side rounded up to a multiple of `grid` but not beyond `limit` (the orientation's canvas) unless an image
    needs more. grid = size_divisor is mmdetection's batch padding; a grid >= the canvas is one fixed shape per
    orientation."""
    shape = []
    for axis in range(2):
        need = max(int(p[axis]) for p in pad_shapes)
        shape.append(max(need, min(round_up(need, grid), int(limit[axis]))))
    return tuple(shape)


def resize_image(img, img_scale):
    """The keep-ratio resize of an (H, W, 3) uint8 image (cv2 bilinear, as mmcv with backend 'cv2' calls it even
    when the size does not change)."""
    new_height, new_width, _ = rescaled_size(img.shape[0], img.shape[1], min(img_scale), max(img_scale))
    return cv2.resize(img, (new_width, new_height), interpolation=cv2.INTER_LINEAR)


def prepare_image(img, boxes, img_scale=(1333, 800), flip=False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  size_divisor=32, canvas=None):
    """(H, W, 3) uint8 RGB image and (K, 4) boxes -> ((3, H_pad, W_pad) float32, boxes in the resized image, meta).

    The image is resized, flipped when asked, normalised and padded with zeros (the mean colour) at the bottom
    and right to `canvas` (height, width) when given, else to its own size rounded up to `size_divisor`.
    meta: `original_size`, `resized_size` (mmdetection's img_shape), `pad_size` (pad_shape: the resized size
    rounded up to the divisor) as (height, width); `scale_factor` (height, width ratios actually applied); `flip`.
    """
    height, width = img.shape[:2]
    img = resize_image(img, img_scale)
    new_height, new_width = img.shape[:2]
    scale_h, scale_w = new_height / height, new_width / width
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.asarray(
        [scale_w, scale_h, scale_w, scale_h], dtype=np.float32)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, new_width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, new_height)
    if flip:
        img = img[:, ::-1]
        boxes = np.stack([new_width - boxes[:, 2], boxes[:, 1], new_width - boxes[:, 0], boxes[:, 3]], axis=1)
    pad_size = padded_size(new_height, new_width, size_divisor)
    canvas = pad_size if canvas is None else tuple(canvas)
    if canvas[0] < pad_size[0] or canvas[1] < pad_size[1]:
        raise ValueError(f"canvas {canvas} is smaller than the padded image {pad_size}")
    chw = np.zeros((3,) + tuple(canvas), dtype=np.float32)
    chw[:, :new_height, :new_width] = normalize(img, mean, std).transpose(2, 0, 1)
    meta = {"original_size": (height, width), "resized_size": (new_height, new_width), "pad_size": pad_size,
            "scale_factor": (scale_h, scale_w), "flip": bool(flip)}
    return chw, boxes.astype(np.float32), meta


def pad_targets(boxes, labels, max_gt):
    """(max_gt, 4) boxes, (max_gt,) int32 labels and a (max_gt,) float32 mask of the real ones."""
    count = min(len(boxes), max_gt)
    padded_boxes = np.zeros((max_gt, 4), np.float32)
    padded_labels = np.zeros((max_gt,), np.int32)
    mask = np.zeros((max_gt,), np.float32)
    padded_boxes[:count] = boxes[:count]
    padded_labels[:count] = labels[:count]
    mask[:count] = 1.0
    return padded_boxes, padded_labels, mask
