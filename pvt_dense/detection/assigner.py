"""Max-IoU anchor assignment, exactly mmdetection 3.3's `MaxIoUAssigner` as RetinaNet configures it (pos_iou_thr 0.5,
neg_iou_thr 0.4, min_pos_iou 0, match_low_quality, gt_max_assign_all), with static shapes.

Ground truth arrives padded to `max_gt` boxes per image with a 0/1 mask, and each image marks which anchors lie on
its own padded area (mmdetection's valid flags); the whole assignment is a few dense (B, N, M) tensor operations
that compile once per input shape in graph mode. For each valid anchor, with IoU taken over the valid boxes:
- negative when its best IoU < neg_iou_thr (an image without objects makes every valid anchor negative);
- positive, matched to its best box (the first on ties), when that IoU >= pos_iou_thr;
- low-quality matches: each box's best anchors (every anchor tying its maximum IoU) become positive for that box
  even below pos_iou_thr, when that maximum is >= min_pos_iou; where boxes compete, the later box wins, as in
  mmdetection's loop over boxes. With min_pos_iou 0 this includes a box that overlaps no anchor at all: it claims
  every anchor of IoU 0, as mmdetection's code does (boxes the COCO reader keeps always overlap some anchor);
- everything else (between the thresholds, or off the image's padded area) is ignored by the loss.
"""
import mindspore as ms
from mindspore import nn, ops


def spread(tensor, shape):
    """`tensor` broadcast to `shape` as a tensor of its own. MindSpore 2.10's CPU element-wise kernels keep a table of
    8 bytes per output element for each input they broadcast, and the (B, N, M) pair tensors are among the largest
    of a detector's training step (RetinaNet at 400x608: 9.2M pairs); a BroadcastTo costs only its output, which
    is freed after use. Measured: this and the loss's explicit mask broadcast lowered the peak resident memory of
    RetinaNet-PVT-Tiny's training step at 400x608 (batch 2) by ~0.35 GB."""
    return ops.broadcast_to(tensor, shape)


def pairwise_iou(anchors, boxes):
    """IoU of (N, 4) anchors against (B, M, 4) boxes -> (B, N, M); x1y1x2y2, area = w * h (no +1), union floored
    at 1e-6 as mmdetection's `bbox_overlaps`."""
    shape = (boxes.shape[0], anchors.shape[0], boxes.shape[1])

    def anchor_side(index):
        return spread(anchors[:, index].reshape(1, -1, 1), shape)

    def box_side(index):
        return spread(ops.expand_dims(boxes[:, :, index], 1), shape)

    width = ops.clamp(ops.minimum(anchor_side(2), box_side(2)) - ops.maximum(anchor_side(0), box_side(0)), min=0.0)
    height = ops.clamp(ops.minimum(anchor_side(3), box_side(3)) - ops.maximum(anchor_side(1), box_side(1)),
                       min=0.0)
    inter = width * height
    area_a = ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])).reshape(1, -1, 1)
    area_b = ops.expand_dims((boxes[:, :, 2] - boxes[:, :, 0]) * (boxes[:, :, 3] - boxes[:, :, 1]), 1)
    union = ops.maximum(spread(area_b, shape) + spread(area_a, shape) - inter, 1e-6)
    return inter / union


class MaxIoUAssigner(nn.Cell):
    """construct(anchors (N, 4), gt_boxes (B, M, 4), gt_mask (B, M), anchor_valid (B, N) bool) -> (matched (B, N)
    int32, positive (B, N) bool, negative (B, N) bool); `matched` indexes the box of each positive anchor
    (meaningless elsewhere)."""

    def __init__(self, pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, match_low_quality=True):
        super().__init__()
        if not 0.0 <= neg_iou_thr <= pos_iou_thr <= 1.0:
            raise ValueError(f"need 0 <= neg_iou_thr ({neg_iou_thr}) <= pos_iou_thr ({pos_iou_thr}) <= 1")
        self.pos_iou_thr = float(pos_iou_thr)
        self.neg_iou_thr = float(neg_iou_thr)
        self.min_pos_iou = float(min_pos_iou)
        self.match_low_quality = bool(match_low_quality)
        self.best_over_boxes = ops.ArgMaxWithValue(axis=2)

    def construct(self, anchors, gt_boxes, gt_mask, anchor_valid):
        shape = (gt_boxes.shape[0], anchors.shape[0], gt_boxes.shape[1])  # (B, N, M): every element-wise op below
        box_valid = spread(ops.expand_dims(gt_mask > 0.5, 1), shape)  # takes same-shape inputs (see `spread`)
        pair_valid = ops.logical_and(box_valid, spread(ops.expand_dims(anchor_valid, -1), shape))
        # -1 marks pairs that do not exist: never a maximum against a real IoU (>= 0).
        iou = ops.where(pair_valid, pairwise_iou(anchors, gt_boxes), ops.full_like(pair_valid, -1.0,
                                                                                   dtype=ms.float32))
        matched, best_iou = self.best_over_boxes(iou)  # (B, N): -1 when an image has no boxes
        positive = best_iou >= self.pos_iou_thr
        if self.match_low_quality:
            box_best = ops.expand_dims(iou.max(axis=1), 1)  # (B, 1, M), over the valid anchors
            is_box_best = ops.logical_and(ops.logical_and(iou == spread(box_best, shape), pair_valid),
                                          spread(box_best >= self.min_pos_iou, shape))
            order = spread(ops.arange(1, gt_boxes.shape[1] + 1, dtype=ms.float32).reshape(1, 1, -1), shape)
            last_box, claimed = self.best_over_boxes(ops.cast(is_box_best, ms.float32) * order)
            low_quality = claimed > 0.5
            matched = ops.where(low_quality, last_box, matched)
            positive = ops.logical_or(positive, low_quality)
        negative = ops.logical_and(ops.logical_and(best_iou < self.neg_iou_thr, anchor_valid),
                                   ops.logical_not(positive))
        return ops.cast(matched, ms.int32), positive, negative
