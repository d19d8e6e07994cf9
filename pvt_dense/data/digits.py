"""scikit-learn's bundled handwritten digits as a tiny ImageNet: the whole training pipeline, offline, in seconds.

`load_digits()` ships with scikit-learn (1,797 8x8 images, 0-16 gray levels), so nothing is downloaded. The
images are written the way ImageNet is laid out on disk, `root/{train,val}/<wnid>/<file>.png`, with wnid-like
class folders `n00000000` ... `n00000009` whose sorted order is the digit, and as 3-channel PNGs, so the same
folder readers, transforms and class-index conventions as for ImageNet apply unchanged. Each file is named by its
index in `load_digits()` (`0042.png`), which lets anyone check a label against the source.

A `digits_meta.json` claims the directory: written first as incomplete, completed last. So a second call with
the same parameters rewrites nothing, a call interrupted halfway resumes, and a directory without that file is
someone else's and is never written into.
"""
import json
import os
import re

import numpy as np

from ..atomic import TEMP_PREFIX, fsync_directory, fsync_file, write_atomic
from ..errors import ConfigError

META_NAME = "digits_meta.json"
GENERATOR = "pvt_dense.data.digits"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
_OUR_IMAGE = re.compile(r"\d{4,}\.png")
_OUR_CLASS_DIR = re.compile(r"n\d{8}")


def class_folder_name(digit):
    return f"n{digit:08d}"


def _make_durable(paths):
    """Everything in `paths` (and the renames that named them) on disk before the dataset is marked complete."""
    if hasattr(os, "sync"):
        # One fsync per file costs a journal commit each: ~7 s for the 1,797 images on ext4, against ~0.1 s for
        # one sync of the whole batch.
        os.sync()
        return
    for path in paths:
        fsync_file(path)
    for folder in sorted({os.path.dirname(path) for path in paths}):
        fsync_directory(folder)


def _check_parameters(image_size, val_fraction, classes, seed, limit_per_class):
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 1024:
        raise ConfigError(f"image_size must be an int from 8 to 1024, got {image_size!r}")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 2 <= classes <= 10:
        raise ConfigError(f"classes must be an int from 2 to 10 (the digits 0..classes-1), got {classes!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    # Two images per class is the least that puts every class in both splits.
    if limit_per_class is not None and (isinstance(limit_per_class, bool) or not isinstance(limit_per_class, int)
                                        or limit_per_class < 2):
        raise ConfigError(f"limit_per_class must be None or an int >= 2, got {limit_per_class!r}")


def _plan_split(targets, val_fraction, classes, seed, limit_per_class):
    """{split: {digit: sorted source indices}}, stratified: every class is split in the same proportion."""
    rng = np.random.default_rng(seed)
    plan = {split: {} for split in SPLITS}
    for digit in range(classes):
        indices = rng.permutation(np.flatnonzero(targets == digit))
        if limit_per_class is not None:
            indices = indices[:limit_per_class]
        val_count = min(max(int(round(len(indices) * val_fraction)), 1), len(indices) - 1)
        plan["val"][digit] = sorted(int(i) for i in indices[:val_count])
        plan["train"][digit] = sorted(int(i) for i in indices[val_count:])
    return plan


def _planned_files(root, plan):
    return {os.path.join(root, split, class_folder_name(digit), f"{index:04d}.png"): index
            for split in SPLITS for digit, indices in plan[split].items() for index in indices}


def _digit_image(gray_8x8, image_size):
    """0-16 gray -> (S, S, 3) uint8 with identical channels, the form ImageNet readers expect."""
    import cv2
    scaled = gray_8x8.astype(np.float32) * (255.0 / 16.0)
    if image_size != scaled.shape[0]:
        scaled = cv2.resize(scaled, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_generator_meta(root, meta_name, generator):
    """The meta dict a generated dataset left in `root/meta_name`, if `generator` wrote it; else None. The digits
    sets (classification, detection, segmentation) use it to know which files are theirs to resume or rewrite."""
    try:
        with open(os.path.join(root, meta_name), encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == generator else None


def _read_our_meta(root):
    return read_generator_meta(root, META_NAME, GENERATOR)


def _remove_our_files(root, keep):
    """Delete images and temporaries of an earlier build that `keep` does not list; touch nothing else."""
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        for class_dir in os.listdir(split_dir):
            class_path = os.path.join(split_dir, class_dir)
            if not (_OUR_CLASS_DIR.fullmatch(class_dir) and os.path.isdir(class_path)):
                continue
            for name in os.listdir(class_path):
                path = os.path.join(class_path, name)
                ours = _OUR_IMAGE.fullmatch(name) or name.startswith(TEMP_PREFIX)
                if ours and path not in keep and os.path.isfile(path):
                    os.remove(path)
            if not os.listdir(class_path):
                os.rmdir(class_path)


def _summary(root, parameters, plan, written):
    counts = {split: {class_folder_name(digit): len(indices) for digit, indices in plan[split].items()}
              for split in SPLITS}
    return {"root": root, "class_names": [class_folder_name(d) for d in range(parameters["classes"])],
            "num_classes": parameters["classes"], "train": sum(counts["train"].values()),
            "val": sum(counts["val"].values()), "counts": counts, "parameters": parameters, "written": written}


def make_digits_imagenet(root, image_size=32, val_fraction=0.2, classes=10, seed=0, limit_per_class=None):
    """Write (or find already written) the digits as an ImageNet folder tree in `root`; returns a summary dict.

    Summary: root, class_names, num_classes, train / val image counts, per-class counts, the parameters, and
    `written` (False when a complete dataset with the same parameters was already there and nothing was
    touched). Refuses (ConfigError) a non-empty `root` that is not a digits dataset made here.
    """
    from sklearn.datasets import load_digits

    _check_parameters(image_size, val_fraction, classes, seed, limit_per_class)
    root = os.path.abspath(os.fspath(root))
    parameters = {"image_size": image_size, "val_fraction": float(val_fraction), "classes": classes,
                  "seed": seed, "limit_per_class": limit_per_class}
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"digits dataset root {root} exists and is not a directory")
    previous = _read_our_meta(root) if os.path.isdir(root) else None
    if previous is None and os.path.isdir(root) and os.listdir(root):
        raise ConfigError(f"refusing to write the digits dataset into {root}: the directory is not empty and "
                          f"holds no {META_NAME} of a digits dataset made by pvt_dense; choose an empty or new "
                          "directory")

    digits = load_digits()
    plan = _plan_split(digits.target, val_fraction, classes, seed, limit_per_class)
    files = _planned_files(root, plan)
    same_parameters = previous is not None and previous.get("parameters") == parameters \
        and previous.get("format") == FORMAT_VERSION
    if same_parameters and previous.get("complete") and all(os.path.isfile(path) for path in files):
        return _summary(root, parameters, plan, written=False)

    os.makedirs(root, exist_ok=True)
    meta = {"generator": GENERATOR, "format": FORMAT_VERSION, "parameters": parameters, "complete": False,
            "files": len(files), "source": "sklearn.datasets.load_digits"}
    # Claimed before the first image, so an interrupted build is recognised as ours and resumed, not refused.
    write_atomic(os.path.join(root, META_NAME), json.dumps(meta, indent=1).encode("utf-8"))
    # Images of an interrupted build with the same parameters are identical to what would be written again.
    keep = set(files) if same_parameters else set()
    _remove_our_files(root, keep)

    import cv2
    for path, index in files.items():
        if path in keep and os.path.isfile(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ok, encoded = cv2.imencode(".png", _digit_image(digits.images[index], image_size))
        if not ok:
            raise ConfigError(f"OpenCV could not encode digit image {index} as PNG")
        write_atomic(path, encoded.tobytes(), durable=False)
    _make_durable(files)

    meta["complete"] = True
    meta["counts"] = {split: {class_folder_name(d): len(ix) for d, ix in plan[split].items()} for split in SPLITS}
    write_atomic(os.path.join(root, META_NAME), json.dumps(meta, indent=1).encode("utf-8"))
    fsync_directory(root)
    return _summary(root, parameters, plan, written=True)
