"""Colour-coded masks and overlays for images, a folder or a list file.

For each input `<name>` (its output name by the rule of `pvt_dense.output_names`: relative, extension kept, made
distinct) three files are written under the output folder: `masks/<name>.png` (class indices, uint8: for programs),
`color/<name>.png` (one colour per class) and `overlay/<name>.jpg` (the colours blended over the image), so
`cat.jpg` gives `masks/cat.jpg.png` and `cat.png` its own `masks/cat.png.png`. Nothing lands outside the output
folder. Files are written atomically; inputs whose three outputs already exist are skipped (rerun after an
interruption to finish); unreadable images and unusable entries are skipped and reported, the rest still done.
Outputs that cannot be written (a full disk, a symlink out of the folder in place of one of them) are reported
apart, as `failed`: the tool exits non-zero for them. An output subfolder that leads out of the output folder is
refused before any image is read.
"""
import os

import cv2
import numpy as np

from ..atomic import write_atomic
from ..data.images import list_image_entries, read_image
from ..errors import PVTDenseError
from ..output_names import OutputNamer, contained_path

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


def output_paths(output_dir, relative):
    """The three output files of an input whose output name (by `pvt_dense.output_names`) is `relative`."""
    return {kind: contained_path(output_dir, f"{kind}/{relative}" + (".jpg" if kind == "overlay" else ".png"))
            for kind in OUTPUT_KINDS}


def _encode(path, rgb_or_gray):
    extension = os.path.splitext(path)[1]
    array = rgb_or_gray[:, :, ::-1] if rgb_or_gray.ndim == 3 else rgb_or_gray
    ok, encoded = cv2.imencode(extension, np.ascontiguousarray(array))
    if not ok:
        raise PVTDenseError(f"OpenCV could not encode {path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, encoded.tobytes())


def check_output_folders(output_dir):
    """PVTDenseError when masks/, color/ or overlay/ under `output_dir` leads out of it (a symlink) or is a file."""
    for kind in OUTPUT_KINDS:
        folder = os.path.join(output_dir, kind)
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise PVTDenseError(f"output folder {folder!r} exists and is not a folder")
        try:
            contained_path(output_dir, kind)
        except PVTDenseError:
            raise PVTDenseError(f"output folder {folder!r} leads out of {output_dir!r} (a symlink to "
                                f"{os.path.realpath(folder)!r}); nothing is written through it: remove it or choose "
                                "another output folder") from None


def infer_images(predictor, input_path, output_dir, num_classes, opacity=0.5, overwrite=False, progress=True):
    """Predict every image named by `input_path` with a `Predictor`; returns a summary dict (written, existing,
    unreadable: {name: reason} of inputs, failed: {name: reason} of outputs that could not be written,
    class_pixels per class over the written images)."""
    from tqdm import tqdm
    entries = list_image_entries(input_path)
    os.makedirs(output_dir, exist_ok=True)
    check_output_folders(output_dir)
    colours = palette(num_classes)
    summary = {"written": [], "existing": [], "unreadable": {}, "failed": {},
               "class_pixels": np.zeros(num_classes, np.int64)}
    predictor.network.set_train(False)
    if hasattr(predictor, "expect_files"):
        predictor.expect_files(entry.path for entry in entries)
    namer = OutputNamer()
    for entry in tqdm(entries, desc="infer", unit="img", disable=not progress):
        # One bad entry (a name that leaves nothing, an unreadable image) is reported with the unreadable images,
        # one output that cannot be written (a symlink out of the folder, a full disk) with the failed ones; the
        # others are still segmented.
        try:
            name = namer.name_for(entry.name)
        except PVTDenseError as err:
            summary["unreadable"][entry.name] = str(err)
            continue
        try:
            paths = output_paths(output_dir, name)
        except PVTDenseError as err:
            summary["failed"][entry.name] = str(err)
            continue
        if not overwrite and all(os.path.isfile(p) for p in paths.values()):
            summary["existing"].append(entry.name)
            continue
        try:
            image = read_image(entry.path)
        except PVTDenseError as err:
            summary["unreadable"][entry.name] = getattr(err, "reason", None) or str(err)
            continue
        mask = predictor.predict(image)
        try:
            _encode(paths["masks"], mask)
            _encode(paths["color"], colorize(mask, colours))
            _encode(paths["overlay"], overlay(image, mask, colours, opacity))
        except (PVTDenseError, OSError) as err:
            summary["failed"][entry.name] = getattr(err, "strerror", None) or str(err)
            continue
        summary["class_pixels"] += np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
        summary["written"].append(entry.name)
    return summary
