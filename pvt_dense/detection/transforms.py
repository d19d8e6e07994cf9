"""Detection preprocessing with fixed padded shapes for graph mode (mmdetection's Resize, RandomFlip, Normalize,
Pad, with the pad target fixed per orientation instead of per batch).

`img_scale` is mmdetection's (long side, short side) bound, (1333, 800) in the recipe: an image is resized keeping
its ratio until its short side reaches 800 or its long side 1333. Every resized landscape image (width > height)
then fits one canvas of (short, long) rounded up to the pad divisor, (800, 1344), and every other image the
transposed canvas, (1344, 800). Batches are formed within one orientation (mmdetection's aspect-ratio grouping),
so graph mode compiles two shapes and no image is shrunk to fit the other orientation.
"""
import math

import cv2
import numpy as np

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from ..errors import ConfigError


def check_img_scale(img_scale, divisor):
    if len(img_scale) != 2 or min(img_scale) < 1 or divisor < 1:
        raise ConfigError(f"img_scale must be two positive sizes (long, short) and pad_divisor positive, got "
                          f"{img_scale} and {divisor}")


def is_landscape(height, width):
    return width > height


def canvas_shape(landscape, img_scale=(1333, 800), divisor=32):
    """The fixed padded (height, width) of a batch of landscape (or other) images."""
    check_img_scale(img_scale, divisor)
    long_side, short_side = max(img_scale), min(img_scale)
    short_pad = math.ceil(short_side / divisor) * divisor
    long_pad = math.ceil(long_side / divisor) * divisor
    return (short_pad, long_pad) if landscape else (long_pad, short_pad)


def rescale(height, width, img_scale, canvas):
    """(new_height, new_width, scale): keep the ratio within img_scale, and within the canvas whatever the
    annotation file claimed about the image's size. Rounded like mmcv (int(x * scale + 0.5))."""
    long_side, short_side = max(img_scale), min(img_scale)
    scale = min(short_side / min(height, width), long_side / max(height, width),
                canvas[0] / height, canvas[1] / width)
    new_height = min(max(int(height * scale + 0.5), 1), canvas[0])
    new_width = min(max(int(width * scale + 0.5), 1), canvas[1])
    return new_height, new_width, scale


def prepare_image(img, boxes, canvas, img_scale=(1333, 800), flip=False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(H, W, 3) uint8 RGB image and (K, 4) boxes -> ((3, canvas_h, canvas_w) float32, boxes in the resized
    image, meta).

    meta: `original_size`, `resized_size` (height, width), `scale_factor` (height, width ratios actually
    applied), `flip`. Padding is zeros after normalisation (the mean colour), bottom and right.
    """
    height, width = img.shape[:2]
    new_height, new_width, _ = rescale(height, width, img_scale, canvas)
    if (new_height, new_width) != (height, width):
        img = cv2.resize(img, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    scale_h, scale_w = new_height / height, new_width / width
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.asarray(
        [scale_w, scale_h, scale_w, scale_h], dtype=np.float32)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, new_width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, new_height)
    if flip:
        img = img[:, ::-1]
        boxes = np.stack([new_width - boxes[:, 2], boxes[:, 1], new_width - boxes[:, 0], boxes[:, 3]], axis=1)
    chw = np.zeros((3,) + tuple(canvas), dtype=np.float32)
    chw[:, :new_height, :new_width] = normalize(img, mean, std).transpose(2, 0, 1)
    meta = {"original_size": (height, width), "resized_size": (new_height, new_width),
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
