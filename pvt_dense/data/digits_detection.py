"""A small, deterministic detection set in COCO layout: scikit-learn's digits pasted onto dark canvases.

`root/{train,val}/000000.png` and `root/annotations/instances_{train,val}.json`, the layout of COCO itself, so
the COCO reader, training, pycocotools evaluation and inference run on it unchanged. Each canvas holds
`min_digits..max_digits` digits at sizes drawn from `digit_sizes`, placed without overlapping; the category is the
digit (names "0".."9", ids 1..10 as COCO's ids start at 1), the box the tight box around the digit's ink.
Everything is drawn from one generator seeded by `seed`, so the same parameters give the same files.

A `digits_detection_meta.json` claims the directory (written first as incomplete, completed last): a second call
with the same parameters rewrites nothing, and a non-empty directory without it is never written into.
"""
import json
import os

import numpy as np

from ..atomic import write_atomic
from ..errors import ConfigError
from .digits import read_generator_meta

META_NAME = "digits_detection_meta.json"
GENERATOR = "pvt_dense.data.digits_detection"
FORMAT_VERSION = 1
INK_THRESHOLD = 32  # pixels darker than this (of 255) are background when the tight box is measured


def _check(canvas_size, digit_sizes, min_digits, max_digits, classes, counts):
    if not 32 <= canvas_size <= 2048:
        raise ConfigError(f"canvas_size must be in 32..2048, got {canvas_size}")
    low, high = digit_sizes
    if not 8 <= low <= high <= canvas_size:
        raise ConfigError(f"digit_sizes must satisfy 8 <= low <= high <= canvas_size, got {digit_sizes}")
    if not 0 <= min_digits <= max_digits <= 50:
        raise ConfigError(f"need 0 <= min_digits <= max_digits <= 50, got {min_digits}, {max_digits}")
    if not 1 <= classes <= 10:
        raise ConfigError(f"classes must be in 1..10, got {classes}")
    if any(count < 1 for count in counts.values()):
        raise ConfigError(f"every split needs at least one image, got {counts}")


def _place(rng, canvas_size, size, taken, attempts=50):
    """Top-left corner of a size x size square that overlaps no square in `taken`, or None."""
    for _ in range(attempts):
        x, y = (int(v) for v in rng.integers(0, canvas_size - size + 1, size=2))
        if all(x + size <= tx or tx + ts <= x or y + size <= ty or ty + ts <= y for tx, ty, ts in taken):
            return x, y
    return None


def render_canvas(rng, digits, pool, canvas_size, digit_sizes, min_digits, max_digits):
    """One canvas (H, W, 3) uint8 and its annotations [(category index, [x, y, w, h])]."""
    import cv2
    canvas = np.zeros((canvas_size, canvas_size), np.uint8)
    annotations, taken = [], []
    for _ in range(int(rng.integers(min_digits, max_digits + 1))):
        size = int(rng.integers(digit_sizes[0], digit_sizes[1] + 1))
        corner = _place(rng, canvas_size, size, taken)
        if corner is None:
            continue
        index = int(pool[rng.integers(0, len(pool))])
        patch = cv2.resize(digits.images[index].astype(np.float32) * (255.0 / 16.0), (size, size),
                           interpolation=cv2.INTER_LINEAR)
        patch = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
        ys, xs = np.nonzero(patch > INK_THRESHOLD)
        if not len(xs):
            continue
        x, y = corner
        canvas[y:y + size, x:x + size] = np.maximum(canvas[y:y + size, x:x + size], patch)
        taken.append((x, y, size))
        box = [float(x + xs.min()), float(y + ys.min()), float(xs.max() - xs.min() + 1),
               float(ys.max() - ys.min() + 1)]
        annotations.append((int(digits.target[index]), box))
    return np.repeat(canvas[:, :, None], 3, axis=2), annotations


def _read_meta(root):
    return read_generator_meta(root, META_NAME, GENERATOR)


def make_digits_detection(root, train_images=64, val_images=16, canvas_size=96, digit_sizes=(24, 40),
                          min_digits=1, max_digits=3, classes=10, seed=0):
    """Write (or find already written) the digits detection set under `root`; returns a summary dict with the
    annotation and image paths per split, `num_classes`, box counts and `written`."""
    import cv2
    from sklearn.datasets import load_digits

    counts = {"train": int(train_images), "val": int(val_images)}
    _check(canvas_size, tuple(digit_sizes), min_digits, max_digits, classes, counts)
    root = os.path.abspath(os.fspath(root))
    parameters = {"train_images": counts["train"], "val_images": counts["val"], "canvas_size": canvas_size,
                  "digit_sizes": list(digit_sizes), "min_digits": min_digits, "max_digits": max_digits,
                  "classes": classes, "seed": seed}
    summary = {"root": root, "num_classes": classes, "parameters": parameters,
               **{f"{split}_ann": os.path.join(root, "annotations", f"instances_{split}.json") for split in counts},
               **{f"{split}_images": os.path.join(root, split) for split in counts}}
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"digits detection root {root} exists and is not a directory")
    previous = _read_meta(root) if os.path.isdir(root) else None
    if previous is None and os.path.isdir(root) and os.listdir(root):
        raise ConfigError(f"refusing to write the digits detection set into {root}: the directory is not empty and "
                          f"holds no {META_NAME} made by pvt_dense; choose an empty or new directory")
    if previous is not None and previous.get("complete") and previous.get("parameters") == parameters and all(
            os.path.isfile(summary[f"{split}_ann"]) for split in counts):
        return dict(summary, written=False, boxes=previous.get("boxes"))

    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    meta = {"generator": GENERATOR, "format": FORMAT_VERSION, "parameters": parameters, "complete": False}
    write_atomic(os.path.join(root, META_NAME), json.dumps(meta, indent=1).encode("utf-8"))

    digits = load_digits()
    pool = np.flatnonzero(digits.target < classes)
    rng = np.random.default_rng(seed)
    categories = [{"id": digit + 1, "name": str(digit), "supercategory": "digit"} for digit in range(classes)]
    box_counts = {}
    for split, count in counts.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for number in range(count):
            image, objects = render_canvas(rng, digits, pool, canvas_size, digit_sizes, min_digits, max_digits)
            file_name = f"{number:06d}.png"
            ok, encoded = cv2.imencode(".png", image)
            if not ok:
                raise ConfigError(f"OpenCV could not encode canvas {number} as PNG")
            write_atomic(os.path.join(root, split, file_name), encoded.tobytes(), durable=False)
            image_id = number + 1
            images.append({"id": image_id, "file_name": file_name, "width": canvas_size, "height": canvas_size})
            for digit, box in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": digit + 1,
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        box_counts[split] = len(annotations)
        document = {"info": {"description": "scikit-learn digits on canvases (pvt_dense)"}, "images": images,
                    "annotations": annotations, "categories": categories}
        write_atomic(summary[f"{split}_ann"], json.dumps(document).encode("utf-8"))
    if hasattr(os, "sync"):
        os.sync()
    meta.update(complete=True, boxes=box_counts)
    write_atomic(os.path.join(root, META_NAME), json.dumps(meta, indent=1).encode("utf-8"))
    return dict(summary, written=True, boxes=box_counts)
