"""BatchNorm whose batch statistics are computed over every rank's images, for data-parallel training.

Semantic FPN is trained with a few crops per device, too few for stable per-device statistics, so the recipe
synchronises them (mmseg's SyncBN). MindSpore's `nn.SyncBatchNorm` only knows the HCCL and NCCL world groups
(Ascend, GPU); this cell sums the per-channel count, sum and sum of squares with one `AllReduce`, which works with
every collective backend, the CPU's included. Its backward goes through the AllReduce too (MindSpore's AllReduce
gradient is the AllReduce of the incoming gradients), as the exact gradient of the synchronised statistics needs.

Parameter names and the moving-statistics update match `nn.BatchNorm2d` (momentum 0.9 = PyTorch's 0.1; the moving
variance uses the unbiased variance like PyTorch), so checkpoints move freely between the two.
"""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer


class CrossRankBatchNorm2d(nn.Cell):
    """`nn.BatchNorm2d` with statistics over all ranks of the default communication group while training."""

    def __init__(self, num_features, eps=1e-5, momentum=0.9):
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.gamma = Parameter(initializer("ones", (num_features,), ms.float32), name="gamma")
        self.beta = Parameter(initializer("zeros", (num_features,), ms.float32), name="beta")
        self.moving_mean = Parameter(initializer("zeros", (num_features,), ms.float32), name="mean",
                                     requires_grad=False)
        self.moving_variance = Parameter(initializer("ones", (num_features,), ms.float32), name="variance",
                                         requires_grad=False)
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        if self.training:
            count = ops.ones((1,), ms.float32) * (x.shape[0] * x.shape[2] * x.shape[3])
            sums = ops.concat((count, x.sum(axis=(0, 2, 3)), (x * x).sum(axis=(0, 2, 3))))
            sums = self.all_reduce(sums)
            total = sums[0]
            mean = sums[1:1 + self.num_features] / total
            variance = ops.maximum(sums[1 + self.num_features:] / total - mean * mean, 0.0)
            unbiased = ops.stop_gradient(variance * total / ops.maximum(total - 1.0, 1.0))
            keep = self.momentum
            x = ops.depend(x, ops.assign(self.moving_mean,
                                         keep * self.moving_mean + (1.0 - keep) * ops.stop_gradient(mean)))
            x = ops.depend(x, ops.assign(self.moving_variance, keep * self.moving_variance + (1.0 - keep) * unbiased))
        else:
            mean, variance = self.moving_mean, self.moving_variance
        scale = self.gamma / ops.sqrt(variance + self.eps)
        shift = self.beta - mean * scale
        return x * scale.reshape((1, -1, 1, 1)) + shift.reshape((1, -1, 1, 1))


def batch_norm(num_features, synchronized=False):
    """The head's norm layer: plain BatchNorm2d, or the cross-rank one when training is distributed."""
    if synchronized:
        return CrossRankBatchNorm2d(num_features)
    return nn.BatchNorm2d(num_features, eps=1e-5, momentum=0.9)


__all__ = ["CrossRankBatchNorm2d", "batch_norm"]
