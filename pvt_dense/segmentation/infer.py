"""Colour-coded masks and overlays for images, a folder or a list file.

For each input `<name>` (its path relative to the input folder or list file) three files are written under the
output folder: `masks/<name>.png` (class indices, uint8: for programs), `color/<name>.png` (one colour per class) and
`overlay/<name>.jpg` (the colours blended over the image). Names are cleaned of `..`, absolute paths and empty parts,
so nothing lands outside the output folder. Files are written atomically; inputs whose three outputs already exist
are skipped (rerun after an interruption to finish), unreadable images are skipped and counted.
"""
import os

import cv2
import numpy as np

from ..atomic import write_atomic
from ..data.images import ImageReadError, list_image_entries, read_image
from ..errors import PVTDenseError

OUTPUT_KINDS = ("masks", "color", "overlay")


def palette(num_classes):
    """(num_classes, 3) uint8 RGB colours, distinct for every class: the bits of the class index spread over the
    high bits of the three channels (the PASCAL VOC colour-map construction), starting at class 1 so class 0 is not
    black."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for cls in range(num_classes):
        code, rgb = cls + 1, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << shift
            code >>= 3
        colours[cls] = rgb
    return colours


def colorize(mask, colours):
    return colours[np.minimum(mask, len(colours) - 1)]


def overlay(image, mask, colours, opacity=0.5):
    return np.clip(image.astype(np.float32) * (1 - opacity) + colorize(mask, colours) * opacity, 0, 255).astype(
        np.uint8)


def safe_relative_name(name):
    """A relative path without '..', '.', empty or absolute parts (and no drive letters), never outside the output
    folder; the extension is dropped (each output kind adds its own)."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    parts = [part.replace(":", "_") for part in parts]
    if not parts:
        raise PVTDenseError(f"input name {name!r} leaves no usable output file name")
    stem = os.path.splitext(parts[-1])[0] or parts[-1]
    return os.path.join(*parts[:-1], stem) if len(parts) > 1 else stem


def output_paths(output_dir, name):
    relative = safe_relative_name(name)
    root = os.path.realpath(output_dir)
    paths = {kind: os.path.join(root, kind, relative + (".jpg" if kind == "overlay" else ".png"))
             for kind in OUTPUT_KINDS}
    for path in paths.values():
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise PVTDenseError(f"output for {name!r} would leave the output folder {root}")
    return paths


def _encode(path, rgb_or_gray):
    extension = os.path.splitext(path)[1]
    array = rgb_or_gray[:, :, ::-1] if rgb_or_gray.ndim == 3 else rgb_or_gray
    ok, encoded = cv2.imencode(extension, np.ascontiguousarray(array))
    if not ok:
        raise PVTDenseError(f"OpenCV could not encode {path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, encoded.tobytes())


def infer_images(predictor, input_path, output_dir, num_classes, opacity=0.5, overwrite=False, progress=True):
    """Predict every image named by `input_path` with a `Predictor`; returns a summary dict (written, existing,
    unreadable: {name: reason}, class_pixels per class over the written images)."""
    from tqdm import tqdm
    entries = list_image_entries(input_path)
    os.makedirs(output_dir, exist_ok=True)
    colours = palette(num_classes)
    summary = {"written": [], "existing": [], "unreadable": {}, "class_pixels": np.zeros(num_classes, np.int64)}
    predictor.network.set_train(False)
    for entry in tqdm(entries, desc="infer", unit="img", disable=not progress):
        paths = output_paths(output_dir, entry.name)
        if not overwrite and all(os.path.isfile(p) for p in paths.values()):
            summary["existing"].append(entry.name)
            continue
        try:
            image = read_image(entry.path)
        except ImageReadError as err:
            summary["unreadable"][entry.name] = getattr(err, "reason", str(err))
            continue
        mask = predictor.predict(image)
        _encode(paths["masks"], mask)
        _encode(paths["color"], colorize(mask, colours))
        _encode(paths["overlay"], overlay(image, mask, colours, opacity))
        summary["class_pixels"] += np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
        summary["written"].append(entry.name)
    return summary
