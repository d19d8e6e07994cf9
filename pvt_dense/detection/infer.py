"""Detect objects in image files with a trained RetinaNet: images with boxes, class names and scores drawn, and
one JSON of every detection.

Output names come from the input names by the rule of `pvt_dense.output_names`, so nothing is written outside the
output directory whatever the input is called.
"""
import json
import os

import cv2
import numpy as np
from tqdm import tqdm

from ..atomic import write_atomic
from ..class_names import printable
from ..data.images import header_image_size, list_image_entries, read_image
from ..errors import ImageReadError, PVTDenseError
from ..output_names import OutputNamer, contained_path
from .evaluation import DetectorForward, announce_sizes
from .postprocess import detect_image
from .transforms import prepare_image

DRAWABLE = (".jpg", ".jpeg", ".png", ".bmp")
RESULTS_NAME = "detections.json"


def drawn_name(name, namer):
    """The output name of input `name` by the rule of `pvt_dense.output_names`; '.png' is appended to names that
    OpenCV cannot write back in their own format."""
    suffix = "" if name.lower().endswith(DRAWABLE) else ".png"
    return namer.name_for(name, suffix)


def class_color(label):
    rng = np.random.default_rng(int(label) + 7)
    return tuple(int(c) for c in rng.integers(64, 256, size=3))


def draw_detections(image_rgb, boxes, scores, labels, class_names, scale=1):
    """A BGR copy of the image with each box, its class name and score; `scale` > 1 enlarges the image first
    (nearest neighbour, boxes scaled along) so labels stay readable on small images."""
    canvas = np.ascontiguousarray(image_rgb[:, :, ::-1])
    if scale != 1:
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * scale
    thickness = max(1, round(min(canvas.shape[:2]) / 300))
    font_scale = max(0.35, min(canvas.shape[:2]) / 900)
    for box, score, label in zip(boxes, scores, labels):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        color = class_color(label)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        text = f"{printable(class_names[label], 40) if label < len(class_names) else label} {score:.2f}"
        (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        top = max(y1 - height - baseline, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + width, top + height + baseline), color, -1)
        cv2.putText(canvas, text, (x1, top + height), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return canvas


def class_list(class_names, category_ids=None):
    """detections.json's "classes": each class named once, {"label", "name"[, "category_id"]} in label order."""
    return [{"label": label, "name": name, **({"category_id": int(category_ids[label])} if category_ids else {})}
            for label, name in enumerate(class_names)]


def detect_file(detector, image, settings, img_scale, size_divisor, mean, std, forward=None):
    """Detections of one RGB image under mmdetection's test protocol (resize, pad to a multiple of size_divisor)."""
    chw, _, meta = prepare_image(image, np.zeros((0, 4), np.float32), img_scale, False, mean, std, size_divisor)
    outputs = (forward or DetectorForward(detector))(chw[None])
    return detect_image(outputs, 0, detector.anchor_generator, detector.num_classes, meta, settings)


def infer_images(detector, input_path, output_dir, class_names, settings, img_scale=(1333, 800), size_divisor=32,
                 mean=None, std=None, draw_thr=0.3, category_ids=None, progress=True, forward=None, draw_scale=1):
    """Detect in every image of `input_path` (file, directory or .txt list); write drawn images (detections with
    score >= draw_thr) and `detections.json` (every detection above the config's score_thr) to `output_dir`.
    `forward` runs the network (default: a `DetectorForward` of the detector); `draw_scale` enlarges the drawn
    images (the JSON keeps the input's pixels).

    The JSON names each class once, in its top-level "classes" list ({"label", "name"[, "category_id"]}); each
    detection gives its "label" (and "category_id"). It is written even when an image fails unexpectedly half-way
    (the error then propagates): the detections of the images before are never lost.
    Returns {"written": [...], "failed": [(name, reason)] (unreadable inputs and outputs not written), "unwritten":
    [names of the inputs whose drawn image could not be written], "json": path, "input_shapes": distinct input shapes,
    "forward_stats": the forward's `ShapeStats` (None for a forward without)}."""
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    entries = list_image_entries(input_path)
    os.makedirs(output_dir, exist_ok=True)
    detector.set_train(False)
    forward = forward or DetectorForward(detector)
    sizes = (header_image_size(entry.path) for entry in entries)
    announce_sizes(forward, (size for size in sizes if size is not None), tuple(img_scale), size_divisor)
    records, written, failed, unwritten, namer = {}, [], [], [], OutputNamer(reserved=(RESULTS_NAME,))
    json_path = contained_path(output_dir, RESULTS_NAME)
    entry = None
    try:
        for entry in tqdm(entries, desc="detect", unit="img", disable=not progress):
            try:
                image = read_image(entry.path)
            except ImageReadError as err:
                failed.append((entry.name, getattr(err, "reason", str(err))))
                continue
            boxes, scores, labels = detect_file(detector, image, settings, tuple(img_scale), size_divisor,
                                                mean or IMAGENET_MEAN, std or IMAGENET_STD, forward)
            name = drawn_name(entry.name, namer)
            shown = scores >= draw_thr
            drawn = draw_detections(image, boxes[shown], scores[shown], labels[shown], class_names, draw_scale)
            ok, encoded = cv2.imencode(os.path.splitext(name)[1], drawn)
            if not ok:
                failed.append((entry.name, "OpenCV could not encode the drawn image"))
                unwritten.append(entry.name)
                continue
            try:
                path = contained_path(output_dir, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_atomic(path, encoded.tobytes())
            except (PVTDenseError, OSError) as err:
                failed.append((entry.name, getattr(err, "strerror", None) or str(err)))
                unwritten.append(entry.name)
                continue
            written.append(path)
            records[entry.name] = {"output": name, "height": int(image.shape[0]), "width": int(image.shape[1]),
                                   "detections": [
                                       {"bbox_xyxy": [round(float(v), 2) for v in box],
                                        "score": round(float(score), 5), "label": int(label),
                                        **({"category_id": int(category_ids[label])} if category_ids else {})}
                                       for box, score, label in zip(boxes, scores, labels)]}
            entry = None
    except BaseException as err:
        if entry is not None:
            failed.append((entry.name, f"stopped here: {type(err).__name__}"))
        raise
    finally:
        write_atomic(json_path, json.dumps({"classes": class_list(class_names, category_ids), "images": records,
                                            "failed": dict(failed)}, indent=1).encode("utf-8"))
    shapes = getattr(forward, "shapes", None)
    return {"written": written, "failed": failed, "unwritten": unwritten, "json": json_path,
            "input_shapes": len(shapes) if shapes is not None else None,
            "forward_stats": getattr(forward, "stats", None)}
