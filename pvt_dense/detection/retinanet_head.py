"""RetinaNet's head (Lin et al. 2017): a classification and a box branch shared by every pyramid level."""
import math

from mindspore import nn
from mindspore.common.initializer import Constant, Normal

from ..models.conv import MatmulConv2d
from ..models.fpn import apply_mask


def conv3x3(in_channels, out_channels, bias_init=0.0):
    # PyTorch-compatible padding and a bias, initialised like mmdetection's RetinaHead (normal std 0.01); computed
    # by im2col + matmul (MatmulConv2d: MindSpore's CPU 3x3 conv kernel is 20-30x slower than its matmul).
    return MatmulConv2d(in_channels, out_channels, 3, has_bias=True, weight_init=Normal(sigma=0.01),
                        bias_init=Constant(bias_init))


def prior_bias(prior_prob):
    """The classification bias that makes every anchor start at probability `prior_prob` of each class, so the
    many easy negatives do not swamp the first iterations (the paper's pi = 0.01)."""
    return -math.log((1.0 - prior_prob) / prior_prob)


class RetinaNetHead(nn.Cell):
    """Per level: `stacked_convs` 3x3 conv + ReLU blocks per branch, then a 3x3 classifier and box regressor.

    Args:
        in_channels: channels of every input level (the FPN's, 256 in the recipe).
        num_classes: object classes K (no background class: sigmoid per class).
        num_anchors: base anchors per location A (9 in the recipe).
        feat_channels: width of the stacked convs (256).
        stacked_convs: depth of each branch (4).
        prior_prob: initial foreground probability of the classifier (0.01).

    construct(features) takes a tuple of L maps (B, in_channels, H_i, W_i) and returns a tuple of 2L maps: the L
    class logits (B, A*K, H_i, W_i), then the L box deltas (B, A*4, H_i, W_i).
    """

    def __init__(self, in_channels, num_classes, num_anchors=9, feat_channels=256, stacked_convs=4,
                 prior_prob=0.01):
        super().__init__()
        if num_classes < 1 or num_anchors < 1 or stacked_convs < 0 or feat_channels < 1:
            raise ValueError(f"RetinaNetHead: num_classes ({num_classes}), num_anchors ({num_anchors}), "
                             f"feat_channels ({feat_channels}) must be positive, stacked_convs ({stacked_convs}) "
                             ">= 0")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.stacked_convs = stacked_convs
        cls_layers, reg_layers = [], []
        for index in range(stacked_convs):
            channels = in_channels if index == 0 else feat_channels
            cls_layers += [conv3x3(channels, feat_channels), nn.ReLU()]
            reg_layers += [conv3x3(channels, feat_channels), nn.ReLU()]
        self.cls_convs = nn.SequentialCell(cls_layers) if cls_layers else nn.Identity()
        self.reg_convs = nn.SequentialCell(reg_layers) if reg_layers else nn.Identity()
        last = feat_channels if stacked_convs else in_channels
        self.retina_cls = conv3x3(last, num_anchors * num_classes, bias_init=prior_bias(prior_prob))
        self.retina_reg = conv3x3(last, num_anchors * 4)

    def construct(self, features, masks=None):
        """`masks`: one (1, 1, h, w) 0/1 mask per level for size buckets (inference; see `models.buckets`)."""
        cls_outs = ()
        reg_outs = ()
        if masks is None:
            for x in features:
                cls_outs = cls_outs + (self.retina_cls(self.cls_convs(x)),)
                reg_outs = reg_outs + (self.retina_reg(self.reg_convs(x)),)
            return cls_outs + reg_outs
        for level in range(len(features)):
            # every 3x3 conv reads zeros beyond the valid region, as the region's own run pads
            cls_outs = cls_outs + (self.retina_cls(self.masked_branch(self.cls_convs, features[level], masks, level)),)
            reg_outs = reg_outs + (self.retina_reg(self.masked_branch(self.reg_convs, features[level], masks, level)),)
        return cls_outs + reg_outs

    def masked_branch(self, convs, x, masks, level):
        """The stacked conv + ReLU pairs of a branch with the level's mask before each conv, and before the last."""
        x = apply_mask(x, masks, level)
        for index in range(self.stacked_convs):
            x = apply_mask(convs[2 * index + 1](convs[2 * index](x)), masks, level)
        return x
