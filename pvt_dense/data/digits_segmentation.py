"""A small semantic-segmentation set in the ADE20K layout, generated offline from scikit-learn's digits.

Each canvas is a muted, noisy random colour background with one to three handwritten digits (8x8 sklearn digits,
upscaled with bilinear interpolation) pasted in saturated random colours, sizes and places; later digits cover
earlier ones.
The label map stores 0 for background and d + 1 for a pixel of digit d (or 1 for any digit's stroke with
`merge_digits=True`: a two-class set a few minutes of CPU training can learn), in
`root/annotations/{training,validation}/<name>.png`, with the images as JPEGs in `root/images/{...}/<name>.jpg`:
the same layout, file types and "0 is not an object" convention as ADEChallengeData2016. The demo config trains
with `reduce_zero_label: False` and `num_classes: classes + 1` (background is a class, so overlays show it);
`reduce_zero_label: True` with `num_classes: classes` treats it like ADE20K's "other" instead.

Training and validation canvases use disjoint source digits. Everything is a function of the parameters and the
seed; files are written atomically and `digits_segmentation_meta.json` claims the directory (written incomplete
first, complete last), so a second call rewrites nothing and a directory without it is never written into.
"""
import json
import os

import numpy as np

from ..atomic import write_atomic
from ..errors import ConfigError
from .digits import read_generator_meta

META_NAME = "digits_segmentation_meta.json"
GENERATOR = "pvt_dense.data.digits_segmentation"
FORMAT_VERSION = 2
SPLIT_FOLDERS = {"train": "training", "val": "validation"}


def class_names(classes, merge_digits=False):
    return ["background", "digit"] if merge_digits else ["background"] + [str(d) for d in range(classes)]


def _check(canvas_size, train_images, val_images, classes, digit_size, seed, merge_digits):
    if not isinstance(merge_digits, bool):
        raise ConfigError(f"merge_digits must be True or False, got {merge_digits!r}")
    if isinstance(canvas_size, bool) or not isinstance(canvas_size, int) or not 32 <= canvas_size <= 1024:
        raise ConfigError(f"canvas_size must be an int from 32 to 1024, got {canvas_size!r}")
    for name, value in (("train_images", train_images), ("val_images", val_images)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100000:
            raise ConfigError(f"{name} must be an int from 1 to 100000, got {value!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= 10:
        raise ConfigError(f"classes must be an int from 1 to 10 (the digits 0..classes-1), got {classes!r}")
    low, high = digit_size
    if not 8 <= low <= high <= canvas_size:
        raise ConfigError(f"digit_size must be (low, high) with 8 <= low <= high <= canvas_size, got {digit_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")


def _background(rng, size):
    """Muted smooth colour with noise: clutter, but never as saturated as the digits."""
    import cv2
    coarse = rng.uniform(70, 170, size=(4, 4, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 10, size=(size, size, 3)).astype(np.float32)
    return np.clip(smooth + noise, 0, 255)


def _digit_colour(rng):
    """A saturated colour: one channel high, one low, one anywhere."""
    colour = np.array([rng.uniform(200, 255), rng.uniform(0, 50), rng.uniform(0, 255)], np.float32)
    return colour[rng.permutation(3)]


def render_canvas(rng, digit_images, digit_labels, canvas_size, digit_size, max_digits=3):
    """(H, W, 3) uint8 RGB image and (H, W) uint8 raw label (0 background, d + 1 digit d) of one canvas."""
    import cv2
    image = _background(rng, canvas_size)
    label = np.zeros((canvas_size, canvas_size), np.uint8)
    for _ in range(int(rng.integers(1, max_digits + 1))):
        pick = int(rng.integers(len(digit_images)))
        side = int(rng.integers(digit_size[0], digit_size[1] + 1))
        glyph = cv2.resize(digit_images[pick].astype(np.float32) / 16.0, (side, side), interpolation=cv2.INTER_LINEAR)
        top = int(rng.integers(0, canvas_size - side + 1))
        left = int(rng.integers(0, canvas_size - side + 1))
        color = _digit_colour(rng)
        region = image[top:top + side, left:left + side]
        alpha = np.clip(glyph * 1.5, 0, 1)[:, :, None]
        image[top:top + side, left:left + side] = region * (1 - alpha) + color * alpha
        label_region = label[top:top + side, left:left + side]
        label_region[glyph > 0.35] = digit_labels[pick] + 1
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _read_meta(root):
    return read_generator_meta(root, META_NAME, GENERATOR)


def _planned(root, counts):
    plan = []
    for split, count in counts.items():
        folder = SPLIT_FOLDERS[split]
        for index in range(count):
            name = f"{split}_{index:05d}"
            plan.append((split, index, os.path.join(root, "images", folder, name + ".jpg"),
                         os.path.join(root, "annotations", folder, name + ".png")))
    return plan


def make_digits_segmentation(root, canvas_size=64, train_images=200, val_images=40, classes=10,
                             digit_size=(20, 40), seed=0, merge_digits=False):
    """Write (or find already written) the digits segmentation set under `root`; returns a summary dict with
    root, num_classes (classes + 1: background and the digits; 2 with `merge_digits`: background and digit
    strokes), class_names, train / val counts and `written`."""
    import cv2
    from sklearn.datasets import load_digits

    digit_size = tuple(int(v) for v in digit_size)
    _check(canvas_size, train_images, val_images, classes, digit_size, seed, merge_digits)
    root = os.path.abspath(os.fspath(root))
    parameters = {"canvas_size": canvas_size, "train_images": train_images, "val_images": val_images,
                  "classes": classes, "digit_size": list(digit_size), "seed": seed, "merge_digits": merge_digits}
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"digits segmentation root {root} exists and is not a directory")
    previous = _read_meta(root) if os.path.isdir(root) else None
    if previous is None and os.path.isdir(root) and os.listdir(root):
        raise ConfigError(f"refusing to write the digits segmentation set into {root}: the directory is not empty "
                          f"and holds no {META_NAME} written by pvt_dense; choose an empty or new directory")
    plan = _planned(root, {"train": train_images, "val": val_images})
    summary = {"root": root, "num_classes": 2 if merge_digits else classes + 1,
               "class_names": class_names(classes, merge_digits),
               "train": train_images, "val": val_images, "parameters": parameters}
    same = previous is not None and previous.get("parameters") == parameters \
        and previous.get("format") == FORMAT_VERSION
    if same and previous.get("complete") and all(os.path.isfile(p) for _, _, i, a in plan for p in (i, a)):
        return dict(summary, written=False)

    os.makedirs(root, exist_ok=True)
    meta = {"generator": GENERATOR, "format": FORMAT_VERSION, "parameters": parameters, "complete": False}
    write_atomic(os.path.join(root, META_NAME), json.dumps(meta, indent=1).encode("utf-8"))

    digits = load_digits()
    keep = np.flatnonzero(digits.target < classes)
    order = np.random.default_rng(seed).permutation(keep)
    # Disjoint source digits: a validation canvas never shows a handwritten sample seen in training.
    cut = int(len(order) * 0.8)
    pools = {"train": order[:cut], "val": order[cut:]}
    for split, index, image_path, label_path in plan:
        if same and os.path.isfile(image_path) and os.path.isfile(label_path):
            continue  # an interrupted build with the same parameters wrote exactly this already
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
        pool = pools[split]
        image, label = render_canvas(rng, digits.images[pool], digits.target[pool], canvas_size, digit_size)
        if merge_digits:
            label = np.minimum(label, 1)
        for path, array, extension in ((image_path, image[:, :, ::-1], ".jpg"), (label_path, label, ".png")):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            ok, encoded = cv2.imencode(extension, array)
            if not ok:
                raise ConfigError(f"OpenCV could not encode {path}")
            write_atomic(path, encoded.tobytes(), durable=False)
    if hasattr(os, "sync"):
        os.sync()
    meta["complete"] = True
    write_atomic(os.path.join(root, META_NAME), json.dumps(meta, indent=1).encode("utf-8"))
    return dict(summary, written=True)
