"""COCO-format detection datasets (`annotations/instances_*.json` + an image folder), read through pycocotools.

The JSON is checked record by record before pycocotools indexes it, because pycocotools trusts its input: a
record without `image_id` is a KeyError deep inside it, a duplicate annotation id silently replaces another box
and skews evaluation. Every problem is a `CocoFormatError` naming the file, the record and what is wrong.

Training view of each image (`DetectionRecord`), as mmdetection builds it:
- categories are mapped to contiguous labels 0..K-1 in the order of their sorted ids;
- crowd boxes (`iscrowd: 1`) and boxes narrower or lower than one pixel are left out of training (evaluation
  still sees them through pycocotools, which treats crowd boxes as regions to ignore);
- images without any box stay in the training set: they teach the classifier what background is;
- more than `max_gt` boxes in one image: the `max_gt` largest are kept, with one warning for all such images
  (ground truth is padded to `max_gt` per image for graph mode).
Missing image files are found when the dataset is opened (`MissingImagesError`, listing them); unreadable ones
only when read (`ImageReadError`, which the training batches skip and count).
"""
import contextlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from ..data.images import read_image
from ..errors import PVTDenseError


# The 80 object categories of COCO 2017 detection, in the order of their sorted category ids (labels 0..79), as
# released with the annotations; checkpoints without class names of their own predict these.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


class CocoFormatError(PVTDenseError):
    """A COCO annotation file is unreadable or a record in it is malformed."""


class MissingImagesError(PVTDenseError):
    """Images named by the annotation file are not in the image folder."""


@dataclass
class DetectionRecord:
    """One image of the dataset: boxes (K, 4) float32 x1y1x2y2 in pixels, labels (K,) int64 in 0..num_classes-1."""

    image_id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_annotation_file(path):
    """The parsed JSON of a COCO annotation file, or CocoFormatError (missing, not JSON, not an object)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CocoFormatError(f"annotation file not found: {path}")
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise CocoFormatError(f"{path}: not a UTF-8 JSON file") from None
    except (ValueError, RecursionError) as err:
        raise CocoFormatError(f"{path}: not valid JSON ({str(err)[:200]})") from None
    return validate_coco(data, path)


def validate_coco(data, origin="annotations"):
    """Check a COCO detection dict in place and fill what pycocotools needs but files often lack (annotation
    `id`, `area` = w * h, `iscrowd` = 0); returns it. Raises CocoFormatError for anything malformed."""
    def fail(message):
        raise CocoFormatError(f"{origin}: {message}")

    if not isinstance(data, dict):
        fail(f"a COCO annotation file holds a JSON object, got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            fail(f"missing the {key!r} list")
        if not isinstance(data[key], list):
            fail(f"{key!r} must be a list, got a {type(data[key]).__name__}")
    if not data["categories"]:
        fail("'categories' is empty: a detection dataset needs at least one category")

    category_ids = set()
    for number, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or not isinstance(
                category.get("name"), str):
            fail(f"categories[{number}] must be an object with an int 'id' and a str 'name', got "
                 f"{str(category)[:120]}")
        if category["id"] in category_ids:
            fail(f"categories[{number}]: duplicate category id {category['id']}")
        category_ids.add(category["id"])

    image_ids = set()
    for number, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            fail(f"images[{number}] must be an object with an int 'id', got {str(image)[:120]}")
        if not isinstance(image.get("file_name"), str) or not image["file_name"].strip():
            fail(f"images[{number}] (id {image['id']}): 'file_name' must be a non-empty string")
        for key in ("width", "height"):
            if not _is_int(image.get(key)) or image[key] < 1:
                fail(f"images[{number}] (id {image['id']}): {key!r} must be a positive int, got "
                     f"{image.get(key)!r}")
        if image["id"] in image_ids:
            fail(f"images[{number}]: duplicate image id {image['id']}")
        image_ids.add(image["id"])

    annotation_ids = set()
    for number, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            fail(f"annotations[{number}] must be an object, got {str(ann)[:120]}")
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
            fail(f"annotations[{number}]: image_id {ann.get('image_id')!r} is not the id of an image")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
            fail(f"annotations[{number}]: category_id {ann.get('category_id')!r} is not the id of a category "
                 f"(valid: {sorted(category_ids)[:20]})")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            fail(f"annotations[{number}]: 'bbox' must be [x, y, width, height] of finite numbers, got "
                 f"{str(bbox)[:120]}")
        if bbox[2] < 0 or bbox[3] < 0:
            fail(f"annotations[{number}]: negative box width or height in bbox {bbox}")
        crowd = ann.setdefault("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            fail(f"annotations[{number}]: 'iscrowd' must be 0 or 1, got {crowd!r}")
        area = ann.setdefault("area", float(bbox[2] * bbox[3]))
        if not _is_number(area) or area < 0:
            fail(f"annotations[{number}]: 'area' must be a non-negative number, got {area!r}")
        if "id" in ann:
            if not _is_int(ann["id"]):
                fail(f"annotations[{number}]: 'id' must be an int, got {ann['id']!r}")
            if ann["id"] in annotation_ids:
                fail(f"annotations[{number}]: duplicate annotation id {ann['id']}")
            annotation_ids.add(ann["id"])
    next_id = max(annotation_ids, default=0) + 1
    for ann in data["annotations"]:
        if "id" not in ann:
            ann["id"] = next_id
            next_id += 1
    return data


def coco_from_dict(data):
    """A pycocotools COCO index over an already checked dict (without its progress prints)."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _training_boxes(annotations, label_of):
    boxes, labels = [], []
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        if ann.get("iscrowd", 0) or w < 1 or h < 1:
            continue
        boxes.append([x, y, x + w, y + h])
        labels.append(label_of[ann["category_id"]])
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64))


class CocoDetection:
    """A COCO detection set: `records` (one `DetectionRecord` per image, sorted by image id), `class_names`,
    `category_ids` (label -> COCO category id) and the pycocotools index `coco` for evaluation.

    Args:
        ann_file: path of the annotation JSON.
        image_dir: folder the images' `file_name`s are relative to.
        max_gt: the most boxes one image keeps for training (the largest by area; a warning says how many
            images lost boxes). None: no cap.
        check_files: raise MissingImagesError when any image file is missing.
    """

    def __init__(self, ann_file, image_dir, max_gt=None, check_files=True):
        self.ann_file = os.fspath(ann_file)
        self.image_dir = os.fspath(image_dir)
        data = read_annotation_file(self.ann_file)
        self.coco = coco_from_dict(data)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [c["name"] for c in categories]
        label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}
        self.records = []
        capped = []
        for image in sorted(data["images"], key=lambda i: i["id"]):
            boxes, labels = _training_boxes(self.coco.imgToAnns.get(image["id"], []), label_of)
            if max_gt is not None and len(boxes) > max_gt:
                largest = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
                keep = np.sort(largest[:max_gt])
                capped.append((image["id"], len(boxes)))
                boxes, labels = boxes[keep], labels[keep]
            self.records.append(DetectionRecord(image["id"], os.path.join(self.image_dir, image["file_name"]),
                                                image["width"], image["height"], boxes, labels))
        if capped:
            shown = ", ".join(f"{image_id} ({count} boxes)" for image_id, count in capped[:5])
            warnings.warn(f"{self.ann_file}: {len(capped)} images have more than max_gt={max_gt} training boxes; "
                          f"kept the {max_gt} largest of each (raise max_gt to keep all): {shown}"
                          f"{' ...' if len(capped) > 5 else ''}", RuntimeWarning, stacklevel=2)
        self.capped_images = capped
        if check_files:
            self.check_files()

    def check_files(self):
        missing = [record.path for record in self.records if not os.path.isfile(record.path)]
        if missing:
            shown = "\n  ".join(missing[:10])
            raise MissingImagesError(f"{len(missing)} of {len(self.records)} images named in {self.ann_file} are "
                                     f"missing from {self.image_dir}:\n  {shown}"
                                     f"{chr(10) + '  ...' if len(missing) > 10 else ''}")

    @property
    def num_classes(self):
        return len(self.category_ids)

    def __len__(self):
        return len(self.records)

    def read(self, index):
        """(RGB uint8 image, record) of image `index`; ImageReadError when the file cannot be decoded."""
        record = self.records[index]
        return read_image(record.path), record
