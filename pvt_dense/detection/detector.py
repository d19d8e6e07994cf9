"""RetinaNet = backbone + neck + head, and the Cell that trains it from padded ground truth in graph mode."""
import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..models.buckets import level_masks
from ..models.fast_ops import kernels_for_new_cell
from .anchors import graph_level_anchors, graph_level_valid
from .assigner import MaxIoUAssigner, spread
from .box_coder import encode_deltas
from .checkpoint import DETECTION_LAYOUT
from .losses import l1_loss, sigmoid_focal_loss


class RetinaNet(nn.Cell):
    """construct(images (B, 3, H, W)) -> the head's raw outputs: L class-logit maps then L box-delta maps.

    The neck's declared strides must be the anchor strides; `anchor_generator` carries them to post-processing.
    """

    checkpoint_layout = DETECTION_LAYOUT  # how whole-model checkpoints name its head (`pvt_dense.checkpoint.whole_model`)

    def __init__(self, backbone, neck, head, anchor_generator):
        super().__init__()
        if tuple(neck.strides) != anchor_generator.strides:
            raise ValueError(f"the neck's output strides {tuple(neck.strides)} differ from the anchor strides "
                             f"{anchor_generator.strides}")
        if head.num_anchors != anchor_generator.num_base_anchors:
            raise ValueError(f"the head predicts {head.num_anchors} anchors per location, the anchor generator "
                             f"makes {anchor_generator.num_base_anchors}")
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.anchor_generator = anchor_generator
        self.num_classes = head.num_classes
        self.num_levels = len(anchor_generator.strides)

    @property
    def supports_buckets(self):
        return getattr(self.backbone, "supports_buckets", False)

    def bucket_inputs(self, valid_size, bucket_size):
        """The `valid` argument of `construct` for a valid region in a zero-padded bucket (`models.buckets`)."""
        return (self.backbone.bucket_inputs(valid_size, bucket_size),
                level_masks(valid_size, bucket_size, self.neck.strides))

    def construct(self, images, valid=None):
        """With `valid` (`bucket_inputs`), each level's outputs on the valid region's own grid (top-left) equal
        those of the valid region run alone; the host crops them."""
        if valid is None:
            return self.head(self.neck(self.backbone(images)))
        return self.head(self.neck(self.backbone(images, valid[0]), valid[1]), valid[1])


class RetinaNetLoss(nn.Cell):
    """mmdetection 3.3's `RetinaHead.loss_by_feat` on the head's raw outputs, with padded ground truth.

    construct(outputs, gt_boxes (B, M, 4), gt_labels (B, M) int32, gt_mask (B, M) float, pad_sizes (B, 2) float)
    -> (L class losses, then L box losses), one scalar per pyramid level; their sum is the training loss.
    `outputs` is the head's tuple (L class-logit maps (B, A*K, H_i, W_i), then L box-delta maps (B, A*4, H_i,
    W_i)); `pad_sizes` is each image's (height, width) padded to the divisor, mmdetection's `pad_shape`: anchors
    beyond it (a larger batch canvas) are neither positive nor negative.

    Focal loss over positive and negative anchors and L1 on the positives' box deltas, each divided by the number
    of positives of the whole batch, each image counting at least one (mmdetection's `avg_factor` with
    `PseudoSampler`), so an image without objects trains its classifier towards background and adds nothing to
    the box loss.
    """

    def __init__(self, anchor_generator, num_classes, assigner=None, focal_alpha=0.25, focal_gamma=2.0,
                 box_loss_weight=1.0, target_means=(0.0, 0.0, 0.0, 0.0), target_stds=(1.0, 1.0, 1.0, 1.0)):
        super().__init__()
        self.assigner = assigner or MaxIoUAssigner()
        self.num_levels = len(anchor_generator.strides)
        self.num_classes = int(num_classes)
        self.num_base_anchors = anchor_generator.num_base_anchors
        self.strides = tuple(float(s) for s in anchor_generator.strides)
        self.base_anchors = tuple(Tensor(np.asarray(base), ms.float32) for base in anchor_generator.base)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.box_loss_weight = float(box_loss_weight)
        self.target_means = tuple(float(m) for m in target_means)
        self.target_stds = tuple(float(s) for s in target_stds)
        # The kernel library's focal loss keeps no (batch, anchors, classes) temporaries for the backward (~1.5 GB
        # of a PVT-Tiny training step at 800x1216, batch 2, in the element-wise form); same values.
        kernels = kernels_for_new_cell()
        self.fused_focal_loss = kernels.focal_loss if kernels is not None else None
        self.focal_meta = Tensor([self.focal_alpha, self.focal_gamma], ms.float32)

    def flatten_outputs(self, outputs, pad_sizes):
        """(B, N, K) logits, (B, N, 4) deltas, (N, 4) anchors and (B, N) valid flags, all levels concatenated in
        anchor order, plus the number of anchors of each level."""
        logits, deltas, anchors, valid, counts = (), (), (), (), ()
        for level in range(self.num_levels):
            cls_map = outputs[level]
            reg_map = outputs[self.num_levels + level]
            batch, _, height, width = cls_map.shape
            logits = logits + (cls_map.transpose(0, 2, 3, 1).reshape(batch, -1, self.num_classes),)
            deltas = deltas + (reg_map.transpose(0, 2, 3, 1).reshape(batch, -1, 4),)
            anchors = anchors + (graph_level_anchors(self.base_anchors[level], self.strides[level], height, width),)
            valid = valid + (graph_level_valid(pad_sizes, self.strides[level], height, width,
                                               self.num_base_anchors),)
            counts = counts + (height * width * self.num_base_anchors,)
        return (ops.concat(logits, axis=1), ops.concat(deltas, axis=1), ops.concat(anchors, axis=0),
                ops.concat(valid, axis=1), counts)

    def per_level_sums(self, values, counts):
        """Sum of a (B, N) array over each level's anchors."""
        sums, start = (), 0
        for count in counts:
            sums = sums + (values[:, start:start + count].sum(),)
            start = start + count
        return sums

    def assign(self, anchors, anchor_valid, gt_boxes, gt_labels, gt_mask):
        """mmdetection's `get_targets` for all anchors concatenated, with the class as an index: (target class
        (B, N) float, the positives' class, -1 elsewhere; label weights (B, N) 1 on positives and negatives; box
        targets (B, N, 4) deltas of the positives (0 elsewhere); positive (B, N) bool; avg_factor: the number of
        positives, at least one per image)."""
        matched, positive, negative = self.assigner(anchors, gt_boxes, gt_mask, anchor_valid)
        positive_f = ops.cast(positive, ms.float32)
        labels = ops.cast(ops.gather_elements(gt_labels, 1, matched), ms.float32)
        target_class = ops.stop_gradient(ops.where(positive, labels, ops.full_like(labels, -1.0)))
        label_weights = ops.cast(ops.logical_or(positive, negative), ms.float32)
        avg_factor = ops.stop_gradient(ops.maximum(positive_f.sum(axis=1), 1.0).sum())
        index = ops.tile(ops.expand_dims(matched, -1), (1, 1, 4))
        matched_boxes = ops.gather_elements(gt_boxes, 1, index)
        box_targets = encode_deltas(ops.expand_dims(anchors, 0), matched_boxes, self.target_means, self.target_stds)
        # Anchors matched to padding encode log(0): replace, not multiply, or 0 * inf poisons the gradient.
        box_targets = ops.stop_gradient(ops.where(ops.expand_dims(positive, -1), box_targets,
                                                  ops.zeros_like(box_targets)))
        return target_class, label_weights, box_targets, positive, avg_factor

    def one_hot_targets(self, target_class):
        """(B, N, K) one-hot class targets of the positives (rows of zeros elsewhere) from `assign`'s classes."""
        positive_f = ops.cast(target_class >= 0, ms.float32)
        class_targets = ops.one_hot(ops.cast(ops.maximum(target_class, 0.0), ms.int32), self.num_classes,
                                    Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        # broadcast explicitly: a broadcasting Mul would keep 8 bytes per (B, N, K) element (see assigner.spread)
        return ops.stop_gradient(class_targets * spread(ops.expand_dims(positive_f, -1), class_targets.shape))

    def targets(self, anchors, anchor_valid, gt_boxes, gt_labels, gt_mask):
        """`assign` with the classes as (B, N, K) one-hot targets, as mmdetection's element-wise focal loss takes
        them."""
        target_class, label_weights, box_targets, positive, avg_factor = self.assign(
            anchors, anchor_valid, gt_boxes, gt_labels, gt_mask)
        return self.one_hot_targets(target_class), label_weights, box_targets, positive, avg_factor

    def construct(self, outputs, gt_boxes, gt_labels, gt_mask, pad_sizes):
        logits, deltas, anchors, anchor_valid, counts = self.flatten_outputs(outputs, pad_sizes)
        target_class, label_weights, box_targets, positive, avg_factor = self.assign(
            anchors, anchor_valid, gt_boxes, gt_labels, gt_mask)
        if self.fused_focal_loss is None:
            cls_elements = sigmoid_focal_loss(logits, self.one_hot_targets(target_class), self.focal_alpha,
                                              self.focal_gamma).sum(axis=2)
        else:
            cls_elements = self.fused_focal_loss(logits, target_class, self.focal_meta)
        cls_elements = cls_elements * label_weights
        box_elements = (l1_loss(deltas, box_targets) * ops.expand_dims(ops.cast(positive, ms.float32), -1)).sum(
            axis=2)
        cls_losses = self.per_level_sums(cls_elements, counts)
        box_losses = self.per_level_sums(box_elements, counts)
        cls_out, box_out = (), ()
        for level in range(self.num_levels):
            cls_out = cls_out + (cls_losses[level] / avg_factor,)
            box_out = box_out + (self.box_loss_weight * box_losses[level] / avg_factor,)
        return cls_out + box_out


class RetinaNetWithLoss(nn.Cell):
    """construct(images, gt_boxes (B, M, 4), gt_labels (B, M) int32, gt_mask (B, M) float, pad_sizes (B, 2) float)
    -> scalar loss: the sum of `RetinaNetLoss`'s per-level losses on the detector's outputs."""

    def __init__(self, detector, assigner=None, focal_alpha=0.25, focal_gamma=2.0, box_loss_weight=1.0,
                 target_means=(0.0, 0.0, 0.0, 0.0), target_stds=(1.0, 1.0, 1.0, 1.0)):
        super().__init__()
        self.detector = detector
        self.loss = RetinaNetLoss(detector.anchor_generator, detector.num_classes, assigner, focal_alpha,
                                  focal_gamma, box_loss_weight, target_means, target_stds)

    def construct(self, images, gt_boxes, gt_labels, gt_mask, pad_sizes):
        losses = self.loss(self.detector(images), gt_boxes, gt_labels, gt_mask, pad_sizes)
        total = losses[0]
        for value in losses[1:]:
            total = total + value
        return total

