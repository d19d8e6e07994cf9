"""Host-side decoding of RetinaNet's raw outputs into detections, step for step mmdetection 3.3's
`RetinaHead.predict_by_feat` (`BaseDenseHead._predict_by_feat_single` and `_bbox_post_process`).

Per image: per level, sigmoid scores of every (anchor, class) pair above `score_thr`, sorted by score, the `nms_pre`
best kept; all levels' candidates decoded against their anchors (`DeltaXYWHBBoxCoder`, sizes clamped by
wh_ratio_clip 16/1000, boxes clipped to the resized image), mapped back to the original image (multiplied by the
inverse scale factors, not clipped again), boxes no wider or taller than `min_bbox_size` dropped, then class-wise
NMS at `nms_iou` and the `max_per_img` best kept. Variable-length work, so it runs in numpy, outside the graph.
"""
import math
from dataclasses import dataclass

import cv2
import numpy as np

from .box_coder import decode_deltas


@dataclass(frozen=True)
class InferenceSettings:
    score_thr: float = 0.05
    nms_pre: int = 1000
    nms_iou: float = 0.5
    max_per_img: int = 100
    min_bbox_size: float = 0.0


def nms(boxes, scores, iou_thr, max_num=None):
    """Indices of the boxes greedy NMS keeps, best score first: a box is dropped when its IoU with a kept,
    higher-scoring box is above `iou_thr`. Ties in score keep the earlier box first. OpenCV's NMS (C++, a stable
    sort, the same IoU without a +1 pixel offset) does exactly this, ~15x faster than a numpy loop at 1000 boxes.
    `max_num` keeps the first that many (what `max_per_img` keeps).

    A box of zero (or negative) width or height overlaps nothing: its IoU with any box is 0, or 0/0 with another
    such box, never above the threshold, so it is never dropped and drops nothing, as in torchvision's and mmcv's
    NMS (OpenCV alone would drop one of two identical empty boxes)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if boxes.shape[0] == 0:
        return np.zeros((0,), np.int64)
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if empty.any():
        solid = np.flatnonzero(~empty)
        kept = np.concatenate([solid[_opencv_nms(boxes[solid], scores[solid], iou_thr)], np.flatnonzero(empty)])
        # Best score first, ties in index order: the order the kept boxes have in a single NMS pass.
        return kept[np.lexsort((kept, -scores[kept]))][:max_num]
    return _opencv_nms(boxes, scores, iou_thr)[:max_num]


def _opencv_nms(boxes, scores, iou_thr):
    if boxes.shape[0] == 0:
        return np.zeros((0,), np.int64)
    if scores.min() <= 0:  # OpenCV keeps only scores above 0: the same order and ties, as ranks from 1
        scores = (np.unique(scores, return_inverse=True)[1] + 1).astype(np.float32)
    corner_and_size = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float64)
    keep = cv2.dnn.NMSBoxes(corner_and_size, scores, 0.0, float(iou_thr))
    return np.asarray(keep, dtype=np.int64).reshape(-1)


def batched_nms(boxes, scores, labels, iou_thr, max_num=None):
    """NMS within each class only: boxes of different classes are shifted apart so that they never overlap.
    Empty boxes are kept as `nms` keeps them (emptiness is judged after the shift, in float32, as mmcv does)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.zeros((0,), np.int64)
    # offsets added in float32, as mmcv's batched_nms adds them
    offsets = np.asarray(labels, dtype=np.float32)[:, None] * (float(boxes.max()) + 1.0)
    return nms(boxes + offsets, scores, iou_thr, max_num)


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow for large -x


def flatten_level(cls_map, reg_map, num_classes):
    """(A*K, H, W), (A*4, H, W) of one image -> (H*W*A, K) scores, (H*W*A, 4) deltas, in anchor order."""
    scores = sigmoid(cls_map.astype(np.float32).transpose(1, 2, 0).reshape(-1, num_classes))
    deltas = reg_map.astype(np.float32).transpose(1, 2, 0).reshape(-1, 4)
    return scores, deltas


def level_candidates(cls_map, reg_map, num_classes, score_thr, count):
    """The `count` best (anchor index, label, score, deltas) of one level whose score is above `score_thr`, best
    first, ties in anchor order: exactly what sigmoid-ing `flatten_level`'s whole score map, thresholding it and
    `best_first` give, without computing a sigmoid or a transposed copy of all A*K*H*W logits (12M at a COCO-size
    P3 level, of which a trained detector keeps a few hundred).

    The sigmoid is monotonic, so only logits above logit(score_thr) can pass; those within a small margin below it
    are kept too and the float32 scores compared exactly as before."""
    channels, height, width = cls_map.shape
    logits = cls_map.reshape(channels, height * width)
    if score_thr <= 0.0:
        bound = -np.inf
    elif score_thr >= 1.0:
        bound = np.inf
    else:
        bound = math.log(score_thr / (1.0 - score_thr)) - 1e-3
    above = logits > bound
    if np.count_nonzero(above) > above.size // 64:
        # Dense scores (an untrained head, or a low threshold): only the `count` best can be kept, so raise the
        # bound to just below the count-th largest logit, where a lower logit's float32 score is strictly below
        # that logit's: nothing under it can reach the count best, ties in score included.
        kth = kth_largest(logits.reshape(-1), count)
        lower = np.float32(kth) - np.float32(1e-3)
        edge = sigmoid(np.array([lower, kth], np.float32))  # float32 scores, as flatten_level computes them
        if edge[0] < edge[1]:
            above = logits > max(bound, float(np.nextafter(lower, np.float32(-np.inf))))
        else:
            above = None  # scores saturate there (all 1.0 in float32): many may tie, take the full map
    if above is None:
        scores, deltas = flatten_level(cls_map, reg_map, num_classes)
        flat = scores.reshape(-1)
        chosen = best_first(flat, np.flatnonzero(flat > score_thr), count)
        return chosen // num_classes, chosen % num_classes, flat[chosen], deltas[chosen // num_classes]
    channel, position = np.nonzero(above)
    scores = sigmoid(logits[channel, position].astype(np.float32))
    passed = scores > score_thr
    flat = position[passed] * channels + channel[passed]  # index into flatten_level's (H*W*A, K) scores
    scores = scores[passed]
    order = np.argsort(flat, kind="stable")
    flat, scores = flat[order], scores[order]
    chosen = best_first(scores, np.arange(flat.size), count)
    flat, scores = flat[chosen], scores[chosen]
    anchor_index, labels = np.divmod(flat, num_classes)
    num_anchors = channels // num_classes
    cell, anchor_in_cell = np.divmod(anchor_index, num_anchors)
    rows = anchor_in_cell[:, None] * 4 + np.arange(4)
    deltas = reg_map.reshape(num_anchors * 4, height * width)[rows, cell[:, None]].astype(np.float32)
    return anchor_index, labels, scores, deltas


def kth_largest(values, count):
    """The `count`-th largest of a 1-D array (the smallest when it is shorter). A full np.partition of a COCO-size
    P3 level (12M logits) takes ~0.2 s; a strided sample first gives a value that a few times `count` of them
    exceed, and only those are partitioned (the whole array when the guess keeps too few)."""
    size = values.size
    count = min(max(int(count), 1), size)
    step = max(1, size // (count * 16))
    sample = values[::step]
    rank = max(0, sample.size - 1 - (4 * count) // step)
    guess = np.partition(sample, rank)[rank]
    pick = values[values >= guess]
    if pick.size < count:
        pick = values
    return np.partition(pick, pick.size - count)[pick.size - count]


def best_first(scores, candidates, count):
    """The first `count` of `candidates` (indices into `scores`) ordered by score, best first, ties in index order:
    `candidates[np.argsort(-scores[candidates], kind="stable")[:count]]`, without sorting them all (a COCO-size P3
    level has up to 12M candidates: 2.4 s to sort, ~0.1 s this way)."""
    values = scores[candidates]
    if values.size > count:
        kth = np.partition(values, values.size - count)[values.size - count]  # the count-th largest score
        above = np.flatnonzero(values > kth)
        ties = np.flatnonzero(values == kth)[: count - above.size]
        chosen = np.sort(np.concatenate([above, ties]))
        candidates, values = candidates[chosen], values[chosen]
    return candidates[np.argsort(-values, kind="stable")]


def detect_image(outputs, image_index, anchor_generator, num_classes, meta, settings=InferenceSettings(),
                 target_means=(0.0, 0.0, 0.0, 0.0), target_stds=(1.0, 1.0, 1.0, 1.0)):
    """Detections of image `image_index` of a batch of head outputs (numpy arrays, L class maps then L box maps).

    meta: `resized_size` (height, width) of the image before padding (mmdetection's img_shape), `scale_factor`
    (height, width) applied by the resize.
    Returns (boxes (D, 4) float32 x1y1x2y2 in original pixels, scores (D,), labels (D,) int64), best first.
    """
    num_levels = len(anchor_generator.strides)
    all_anchors, all_deltas, all_scores, all_labels = [], [], [], []
    for level in range(num_levels):
        cls_map = outputs[level][image_index]
        reg_map = outputs[num_levels + level][image_index]
        anchors = anchor_generator.level_anchors(level, cls_map.shape[1], cls_map.shape[2])
        anchor_index, labels, scores, deltas = level_candidates(cls_map, reg_map, num_classes, settings.score_thr,
                                                                settings.nms_pre)
        all_anchors.append(anchors[anchor_index])
        all_deltas.append(deltas)
        all_scores.append(scores)
        all_labels.append(labels)
    boxes = decode_deltas(np.concatenate(all_anchors), np.concatenate(all_deltas), target_means, target_stds,
                          max_shape=meta["resized_size"])
    boxes = rescale_to_original(boxes, meta)
    scores = np.concatenate(all_scores).astype(np.float32)
    labels = np.concatenate(all_labels).astype(np.int64)
    if settings.min_bbox_size >= 0:
        sized = ((boxes[:, 2] - boxes[:, 0]) > settings.min_bbox_size) & (
            (boxes[:, 3] - boxes[:, 1]) > settings.min_bbox_size)
        boxes, scores, labels = boxes[sized], scores[sized], labels[sized]
    keep = batched_nms(boxes, scores, labels, settings.nms_iou, max_num=settings.max_per_img)
    return boxes[keep], scores[keep], labels[keep]


def rescale_to_original(boxes, meta):
    """Boxes of the resized image in original pixels: multiplied by float32(1 / scale), as mmdetection's
    `scale_boxes` does (no clipping to the original image)."""
    scale_h, scale_w = meta["scale_factor"]
    inverse = np.asarray([1.0 / scale_w, 1.0 / scale_h, 1.0 / scale_w, 1.0 / scale_h], dtype=np.float32)
    return (np.asarray(boxes, np.float32).reshape(-1, 4) * inverse).astype(np.float32)
