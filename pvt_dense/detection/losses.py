"""RetinaNet's losses as element-wise MindSpore functions; reduction and normalisation are the caller's."""
from mindspore import ops


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Element-wise sigmoid focal loss (Lin et al. 2017), mmdetection's formulation.

    loss = w * BCE(logits, targets) with w = (alpha t + (1 - alpha)(1 - t)) * pt ** gamma and
    pt = (1 - p) t + p (1 - t), p = sigmoid(logits). BCE is computed from the logits in its stable form, so large
    logits cannot produce log(0).
    """
    probs = ops.sigmoid(logits)
    pt = (1.0 - probs) * targets + probs * (1.0 - targets)
    weight = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * ops.pow(pt, gamma)
    bce = ops.relu(logits) - logits * targets + ops.log1p(ops.exp(-ops.abs(logits)))
    return bce * weight


def l1_loss(pred, target):
    return ops.abs(pred - target)
