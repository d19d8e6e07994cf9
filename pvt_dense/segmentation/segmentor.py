"""Backbone + neck + head as one network, and the two ways it is run: with the loss (training) and to logits at the
input size (inference).

All modules are wired by constructor arguments (`EncoderDecoder(backbone, neck, head)`); `build.build_segmentor`
makes them from a config.
"""
import mindspore as ms
from mindspore import nn, ops

from ..models.buckets import level_edges, level_masks
from .checkpoint import SEGMENTATION_LAYOUT
from .metrics import IGNORE_INDEX
from .semfpn_head import replicate_edge


class EncoderDecoder(nn.Cell):
    """images (N, 3, H, W) -> logits (N, num_classes, H_s, W_s) at the head's stride (4 for Semantic FPN)."""

    checkpoint_layout = SEGMENTATION_LAYOUT  # how whole-model checkpoints name its head (`pvt_dense.checkpoint.whole_model`)

    def __init__(self, backbone, neck, head):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.num_classes = head.num_classes

    @property
    def supports_buckets(self):
        return getattr(self.backbone, "supports_buckets", False)

    @property
    def output_stride(self):
        """The logits' stride: the head predicts at the finest neck level."""
        return self.neck.strides[0]

    def bucket_inputs(self, valid_size, bucket_size):
        """The `valid` argument of `construct` for a valid region in a zero-padded bucket (`models.buckets`):
        the backbone's, then per neck level a mask and the edge-replicating gather indices."""
        return (self.backbone.bucket_inputs(valid_size, bucket_size),
                level_masks(valid_size, bucket_size, self.neck.strides),
                level_edges(valid_size, bucket_size, self.neck.strides))

    def construct(self, images, valid=None):
        if valid is None:
            return self.head(self.neck(self.backbone(images)))
        return self.head(self.neck(self.backbone(images, valid[0]), valid[1]), valid[1], valid[2])


def ignore_cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, avg_non_ignore=False):
    """Mean cross entropy of (N, C, H, W) logits against (N, H, W) int32 labels; ignored pixels contribute 0.

    mmseg divides by all pixels (`avg_non_ignore=False`, its default and the official PVT recipe's); with True it
    divides by the labelled pixels only, like `torch.nn.functional.cross_entropy(ignore_index=...)`.
    """
    valid = labels != ignore_index
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    log_probs = ops.log_softmax(logits, axis=1)
    picked = ops.gather_elements(log_probs, 1, ops.expand_dims(safe, 1)).squeeze(1)
    weights = ops.cast(valid, logits.dtype)
    total = -(picked * weights).sum()
    if avg_non_ignore:
        return total / ops.maximum(weights.sum(), 1.0)
    return total / weights.size


class SegmentorWithLoss(nn.Cell):
    """(images, labels) -> scalar loss; logits are upsampled bilinearly to the label size first, as mmseg does."""

    def __init__(self, segmentor, ignore_index=IGNORE_INDEX, avg_non_ignore=False):
        # No name prefix: parameter names stay those of the bare segmentor, so checkpoints load into either.
        super().__init__(auto_prefix=False)
        self.segmentor = segmentor
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore

    def construct(self, images, labels):
        logits = self.segmentor(images)
        logits = ops.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
        return ignore_cross_entropy(logits, ops.cast(labels, ms.int32), self.ignore_index, self.avg_non_ignore)


class SegmentorInference(nn.Cell):
    """images (N, 3, H, W) -> (logits,): upsampled to the input size (N, num_classes, H, W) by default (what an
    exported graph gives); with `upsample=False` at the head's stride `output_stride`, for a caller that resizes
    them itself (`evaluation.Predictor` resizes them on the host, straight to the image's own size: the logits
    upsampled in the graph were 150 x H x W floats, 216 MB at 512x704, resized on one thread in 47 ms, copied out
    and cropped, to be resized once more)."""

    def __init__(self, segmentor, upsample=True):
        super().__init__(auto_prefix=False)
        self.segmentor = segmentor
        self.upsample = bool(upsample)

    @property
    def output_stride(self):
        return 1 if self.upsample else self.segmentor.output_stride

    @property
    def supports_buckets(self):
        return getattr(self.segmentor, "supports_buckets", False)

    def bucket_inputs(self, valid_size, bucket_size):
        return self.segmentor.bucket_inputs(valid_size, bucket_size)

    def construct(self, images, valid=None):
        """With `valid` (`EncoderDecoder.bucket_inputs`) the logits on the valid region (top-left; the host crops)
        equal those of the region run alone: the finest level's edge is replicated before the upsampling."""
        logits = self.segmentor(images) if valid is None else self.segmentor(images, valid)
        if not self.upsample:
            return (logits,)
        if valid is not None:
            logits = replicate_edge(logits, valid[2][0])
        return (ops.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False),)
