"""The ADE20K (ADEChallengeData2016) layout and its label conventions.

    data_dir/images/{training,validation}/<name>.jpg       (any image format read_image decodes)
    data_dir/annotations/{training,validation}/<name>.png  (one class index per pixel, 8- or 16-bit, or a palette)

ADE20K's annotations use 0 for "other objects" and 1..150 for the classes. With `reduce_zero_label` (the recipe's
setting) 0 becomes the ignore index 255 and k becomes k - 1, so the network predicts 150 classes 0..149 and
"other" never counts, in training or in the metrics. After the shift, values that are not a class (>= num_classes)
and not 255 are ignored too, and counted so the user learns that the labels do not match the class count.

A label whose size differs from its image is an `AnnotationError` naming the file: resizing it would invent labels.
"""
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.images import IMAGE_EXTENSIONS, read_image, resolve_max_pixels
from ..errors import PVTDenseError
from .metrics import IGNORE_INDEX

SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

# The 150 classes of the ADE20K scene-parsing benchmark, in label order (label k+1 in the files, k after the shift).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


class AnnotationError(PVTDenseError):
    """A label map cannot be read, is not a single-channel class map, or does not fit its image."""


@dataclass(frozen=True)
class Sample:
    """One image and its annotation (None where a split has no labels, e.g. for inference)."""

    image: str
    label: object
    name: str


def annotation_error(path, reason):
    err = AnnotationError(f"annotation {os.fspath(path)!r}: {reason}")
    err.path = os.fspath(path)
    return err


# PIL's names of formats whose compression changes pixel values, so a class-index map cannot survive them.
LOSSY_FORMATS = ("JPEG", "MPO", "WEBP", "JPEG2000")


def read_label_raw(path, max_pixels=None):
    """The stored class indices of a label PNG as an (H, W) int64 array: 8-bit, 16-bit and palette PNGs give their
    indices (a palette PNG's indices, not its colours). Anything else raises `AnnotationError` naming the file."""
    path = os.fspath(path)
    max_pixels = resolve_max_pixels(max_pixels)
    if not os.path.isfile(path):
        raise annotation_error(path, "no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise annotation_error(path, f"{width}x{height} exceeds the limit of {max_pixels} pixels")
                if image.format in LOSSY_FORMATS:
                    # Lossy compression blurs class boundaries into indices of other classes, whatever the name.
                    raise annotation_error(path, f"the file is {image.format} data, a lossy format that corrupts "
                                                 "class indices at every edge (labels must be PNG)")
                mode = image.mode
                if mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
                    raise annotation_error(path, f"PIL mode {mode!r} is not a class-index map (expected an 8- or "
                                                 "16-bit single-channel or palette PNG; colour labels must be "
                                                 "converted to indices first)")
                image.load()
                pixels = np.array(image)
    except AnnotationError:
        raise
    except Image.DecompressionBombError:
        raise annotation_error(path, f"too many pixels (above PIL's limit, and the limit of {max_pixels})") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError... on bad bytes
        raise annotation_error(path, f"not a readable PNG ({type(err).__name__}: {err})") from None
    if pixels.ndim != 2 or pixels.shape != (height, width) or pixels.size == 0:
        raise annotation_error(path, f"decoded to shape {pixels.shape}, not one class index per pixel")
    return pixels.astype(np.int64)


def convert_label(raw, num_classes, reduce_zero_label=True, ignore_index=IGNORE_INDEX):
    """Stored indices -> (uint8 training labels in 0..num_classes-1 or ignore_index, count of out-of-range pixels).

    A stored ignore index (255) stays ignored. With `reduce_zero_label`, 0 is ignored too and every other k becomes
    k - 1 (mmseg's shift). Then any value that is not a class becomes the ignore index and is counted.
    """
    if not 1 <= num_classes <= 255:
        raise PVTDenseError(f"num_classes must be in 1..255 to fit uint8 label maps, got {num_classes}")
    raw = np.asarray(raw, dtype=np.int64)
    ignored = raw == ignore_index
    label = raw
    if reduce_zero_label:
        ignored = ignored | (raw == 0)
        label = raw - 1
    outside = ~ignored & ((label < 0) | (label >= num_classes))
    count = int(outside.sum())
    label = np.where(ignored | outside, ignore_index, label)
    return label.astype(np.uint8), count


def read_label(path, num_classes, reduce_zero_label=True, expected_size=None, max_pixels=None):
    """(uint8 label map, out-of-range pixel count) of one annotation; `expected_size` (H, W) is its image's size."""
    raw = read_label_raw(path, max_pixels)
    if expected_size is not None and tuple(raw.shape) != tuple(expected_size):
        raise annotation_error(path, f"size {raw.shape[1]}x{raw.shape[0]} (WxH) differs from its image's "
                                     f"{expected_size[1]}x{expected_size[0]}")
    return convert_label(raw, num_classes, reduce_zero_label)


def read_sample(sample, num_classes, reduce_zero_label=True, max_pixels=None):
    """(RGB uint8 image, uint8 label or None, out-of-range label pixel count) for a `Sample`."""
    image = read_image(sample.image, max_pixels)
    if sample.label is None:
        return image, None, 0
    label, outside = read_label(sample.label, num_classes, reduce_zero_label, image.shape[:2], max_pixels)
    return image, label, outside


def split_directories(data_dir, split):
    folder = SPLITS.get(split, split)
    return os.path.join(data_dir, "images", folder), os.path.join(data_dir, "annotations", folder)


def list_samples(data_dir, split, require_labels=True):
    """The `Sample`s of a split, sorted by name. Every image needs `annotations/<split>/<stem>.png` unless
    `require_labels` is False; an annotation without an image is ignored (ADE20K ships none)."""
    data_dir = os.fspath(data_dir)
    image_dir, label_dir = split_directories(data_dir, split)
    if not os.path.isdir(image_dir):
        raise PVTDenseError(f"{image_dir} is not a directory: data_dir must hold the ADE20K layout "
                            "images/{training,validation} and annotations/{training,validation} "
                            "(e.g. /path/to/ADEChallengeData2016)")
    samples, missing = [], []
    for folder, subfolders, filenames in os.walk(image_dir):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for filename in filenames:
            if filename.startswith(".") or not filename.lower().endswith(IMAGE_EXTENSIONS):
                continue
            relative = os.path.relpath(os.path.join(folder, filename), image_dir)
            stem = os.path.splitext(relative)[0]
            label = os.path.join(label_dir, stem + ".png")
            if not os.path.isfile(label):
                if require_labels:
                    missing.append(relative)
                label = None
            samples.append(Sample(os.path.join(image_dir, relative), label, stem.replace(os.sep, "/")))
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PVTDenseError(f"{len(missing)} images in {image_dir} have no annotation in {label_dir} "
                            f"(expected <name>.png): {shown}")
    if not samples:
        raise PVTDenseError(f"no images found in {image_dir}")
    return sorted(samples, key=lambda sample: sample.name)
