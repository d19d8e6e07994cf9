"""The Semantic FPN data pipelines of mmsegmentation's ADE20K config, on (H, W, 3) uint8 RGB images and (H, W)
uint8 label maps. Every random choice comes from the numpy Generator passed in, so a sample's augmentation is a pure
function of the seed it was given.

Training: random rescale of `scale` (2048, 512) by a ratio in 0.5-2.0 keeping the aspect ratio; a random crop of
`crop_size` in which no single class covers more than `cat_max_ratio` of the labelled pixels (10 tries); horizontal
flip; photometric distortion; ImageNet normalisation; padding to the crop size (image 0, label 255).
Test: rescale to fit (2048, 512) keeping the ratio (short side 512 for ordinary photos), then resize that image
again so both sides are rounded up to multiples of 32 (the official PVT code's `AlignResize`); optional sliding
windows.

All sizes are (height, width) unless a name says otherwise; `scale` pairs are (long side, short side) bounds as in
mmcv's `imrescale`.
"""

import cv2
import numpy as np

from ..data.transforms import network_input_size, normalize, rescaled_size
from ..errors import ConfigError
from .metrics import IGNORE_INDEX


def resize_pair(image, label, size):
    """Bilinear image, nearest label (labels are class indices, never averaged)."""
    height, width = size
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        if label is not None:
            label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, label


def random_rescale(image, label, rng, scale=(2048, 512), ratio_range=(0.5, 2.0)):
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    return resize_pair(image, label, rescaled_size(*image.shape[:2], min(target), max(target))[:2])


def crop_box(height, width, crop_size, rng):
    margin_h, margin_w = max(height - crop_size[0], 0), max(width - crop_size[1], 0)
    top = int(rng.integers(0, margin_h + 1))
    left = int(rng.integers(0, margin_w + 1))
    return top, min(top + crop_size[0], height), left, min(left + crop_size[1], width)


def random_crop(image, label, rng, crop_size=(512, 512), cat_max_ratio=0.75, ignore_index=IGNORE_INDEX, tries=10):
    """mmseg's RandomCrop: with `cat_max_ratio` < 1, redraw (up to `tries` boxes in all) while one class covers
    `cat_max_ratio` or more of the crop's labelled pixels, so crops of pure sky or wall are rare."""
    box = crop_box(*image.shape[:2], crop_size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            top, bottom, left, right = box
            classes, counts = np.unique(label[top:bottom, left:right], return_counts=True)
            counts = counts[classes != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = crop_box(*image.shape[:2], crop_size, rng)
    top, bottom, left, right = box
    return image[top:bottom, left:right], label[top:bottom, left:right]


def random_flip(image, label, rng, prob=0.5):
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def _convert(values, alpha=1.0, beta=0.0):
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg's PhotoMetricDistortion: each of brightness, contrast, saturation and hue with probability 0.5;
    contrast either first or last (also a coin flip). The HSV steps use OpenCV's 0-180 hue scale, as mmcv."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))

    def contrast(img):
        if rng.integers(2):
            img = _convert(img, alpha=rng.uniform(*contrast_range))
        return img

    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(*saturation_range))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta))) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
        image = contrast(image)
    return image


def pad_pair(image, label, size, ignore_index=IGNORE_INDEX):
    """Pad bottom/right to `size`: image with 0 (the mean, after normalisation), label with the ignore index."""
    pad_h, pad_w = size[0] - image.shape[0], size[1] - image.shape[1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"cannot pad {image.shape[:2]} to the smaller {size}")
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=ignore_index)
    return image, label


class TrainTransform:
    """Image + label -> ((3, crop_h, crop_w) float32, (crop_h, crop_w) int32) with the recipe's augmentation."""

    def __init__(self, scale=(2048, 512), ratio_range=(0.5, 2.0), crop_size=(512, 512), cat_max_ratio=0.75,
                 flip_prob=0.5, photometric=True, ignore_index=IGNORE_INDEX):
        if ratio_range[0] <= 0 or ratio_range[0] > ratio_range[1]:
            raise ConfigError(f"ratio_range must be 0 < low <= high, got {tuple(ratio_range)}")
        if min(crop_size) < 1 or min(scale) < 1:
            raise ConfigError(f"crop_size and scale must be positive, got {tuple(crop_size)} and {tuple(scale)}")
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.crop_size = tuple(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.ignore_index = ignore_index

    def __call__(self, image, label, rng):
        image, label = random_rescale(image, label, rng, self.scale, self.ratio_range)
        image, label = random_crop(image, label, rng, self.crop_size, self.cat_max_ratio, self.ignore_index)
        image, label = random_flip(image, label, rng, self.flip_prob)
        if self.photometric:
            image = photometric_distortion(image, rng)
        image, label = pad_pair(normalize(image), label, self.crop_size, self.ignore_index)
        return np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(label, dtype=np.int32)


def prepare_test_image(image, scale=(2048, 512), size_divisor=32):
    """(H, W, 3) uint8 RGB -> (3, H', W') float32 normalised network input at the aligned test size.

    Two bilinear resizes, as the official `AlignResize(keep_ratio=True)` does them: the uint8 image to the
    keep-ratio size, then that uint8 result to the aligned size. One resize straight to the aligned size samples
    other pixels, so it would not be the protocol the published numbers were measured with.
    """
    rescaled = rescaled_size(*image.shape[:2], min(scale), max(scale))[:2]
    aligned = network_input_size(*image.shape[:2], scale, size_divisor)
    resized, _ = resize_pair(image, None, rescaled)
    resized, _ = resize_pair(resized, None, aligned)
    return np.ascontiguousarray(normalize(resized).transpose(2, 0, 1))


def sliding_windows(height, width, crop_size=(512, 512), stride=(341, 341)):
    """mmseg's slide-inference windows (top, bottom, left, right) covering an image; the last window of a row or
    column is shifted back inside the image, and an image smaller than the crop is one window of its own size."""
    crop_h, crop_w = crop_size
    stride_h, stride_w = stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            top, left = row * stride_h, col * stride_w
            bottom, right = min(top + crop_h, height), min(left + crop_w, width)
            top, left = max(bottom - crop_h, 0), max(right - crop_w, 0)
            windows.append((top, bottom, left, right))
    return windows
