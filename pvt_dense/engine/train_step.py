"""One optimizer step with loss scaling that reports overflows, for every training loop in pvt_dense.

mindcv's `TrainStep` returns only the loss: with a fixed loss scale it applies the update even when the scaled
gradients overflowed, and with a dynamic one it hides whether the step was skipped. Long runs need both facts
(`tests/test_training.py` shows the first), so this cell returns (loss, overflow, scale) and never updates on an
overflow, whichever kind of scale is used. MindSpore's `nn.TrainOneStepWithLossScaleCell` (with a
`DynamicLossScaleUpdateCell`) would do that, but off the GPU it checks overflow with an Ascend-only kernel, so it
cannot run on the CPU (`tests/test_loop.py`); it also has no gradient-norm clipping, which the recipes use, and
reports each rank's own loss instead of the global batch's.
"""
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.communication import get_group_size
from mindspore.context import ParallelMode

from ..models.fast_ops import kernels_for_new_cell

_grad_sum = ops.MultitypeFuncGraph("grad_sum")


@_grad_sum.register("Tensor")
def _sum_of_grad(grad):
    return ops.cast(grad.sum(), ms.float32)


_scale_grad = ops.MultitypeFuncGraph("scale_grad")


@_scale_grad.register("Tensor", "Tensor")
def _scaled(factor, grad):
    return grad * ops.cast(factor, grad.dtype)


class TrainStep(nn.Cell):
    """forward + backward + (all-reduce) + clip + optimizer, skipping the update when gradients are not finite.

    Args:
        network: a Cell returning the scalar loss for `*inputs`.
        optimizer: a MindSpore optimizer over the network's trainable parameters.
        loss_scale: the fixed loss scale (float), used as given for the whole run.
        dynamic_loss_scale: halve the scale on overflow and double it after `scale_window` clean steps instead.
        clip_grad_norm: clip the global gradient norm to this value (0: no clipping), after unscaling.

    Returns (loss, overflow, scale) per call: the unscaled loss, whether the update was skipped, and the loss
    scale for the next step.
    """

    def __init__(self, network, optimizer, loss_scale=1.0, dynamic_loss_scale=False, scale_window=2000,
                 clip_grad_norm=0.0):
        super().__init__(auto_prefix=False)
        self.network = network
        self.network.set_grad()
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.hyper_map = ops.HyperMap()
        self.scale = Parameter(Tensor(float(loss_scale), ms.float32), name="loss_scale", requires_grad=False)
        self.dynamic = bool(dynamic_loss_scale)
        self.scale_window = int(scale_window)
        # A fixed scale of 1 leaves the gradients as they are: no unscaling pass over every gradient.
        self.unit_scale = not self.dynamic and float(loss_scale) == 1.0
        self.clean_steps = Parameter(Tensor(0, ms.int32), name="loss_scale_clean_steps", requires_grad=False)
        self.clip = clip_grad_norm > 0
        self.clip_grad_norm = float(clip_grad_norm)
        self.reduce_grads = ms.get_auto_parallel_context("parallel_mode") == ParallelMode.DATA_PARALLEL
        if self.reduce_grads:
            self.world_size = get_group_size()
            self.grad_reducer = nn.DistributedGradReducer(self.weights, mean=True, degree=self.world_size)
            self.all_reduce = ops.AllReduce()
        else:
            self.grad_reducer = nn.Identity()
        # The kernel library's one-pass global norm (float32 gradients only) serves the overflow check and the
        # clipping: 237 -> 148 ms per PVT-Tiny RetinaNet step on 64x64 canvases, batch 8 (see `_fused_construct`).
        kernels = kernels_for_new_cell()
        self.global_norm = kernels.global_norm if kernels is not None and all(
            p.dtype == ms.float32 for p in self.weights) else None

    def construct(self, *inputs):
        loss = self.network(*inputs)
        scale = self.scale
        sens = ops.ones_like(loss) * ops.cast(scale, loss.dtype)
        grads = self.grad(self.network, self.weights)(*inputs, sens)
        grads = self.grad_reducer(grads)
        if self.global_norm is not None:
            return self._fused_construct(loss, grads, scale)
        if not self.unit_scale:
            grads = self.hyper_map(ops.partial(_scale_grad, ops.reciprocal(scale)), grads)
        loss, overflow = self._agree(loss, self._all_finite(grads))
        if self.clip:
            grads = ops.clip_by_global_norm(grads, clip_norm=self.clip_grad_norm)
        return self._update(loss, overflow, grads), overflow, scale

    def _fused_construct(self, loss, grads, scale):
        # One pass over the gradients gives their norm and whether all are finite; the unscaling and the clipping
        # are then one multiply by one factor, which is skipped when it is 1 for sure (unit scale, no clipping).
        stats = self.global_norm(*grads)
        loss, overflow = self._agree(loss, stats[1] > 0.5)
        factor = ops.reciprocal(scale)
        if self.clip:
            # torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / norm where the norm exceeds max_norm.
            norm = stats[0] * factor
            factor = factor * self.clip_grad_norm / ops.maximum(norm, self.clip_grad_norm)
        if self.clip or not self.unit_scale:
            grads = self.hyper_map(ops.partial(_scale_grad, factor), grads)
        return self._update(loss, overflow, grads), overflow, scale

    def _agree(self, loss, grads_finite):
        """(loss, overflow): whether this step's update is skipped, decided from the loss and the gradients."""
        finite = ops.cast(ops.logical_and(ops.isfinite(loss), grads_finite), ms.float32)
        if self.reduce_grads:
            # Every rank must take the same decision, or the replicas drift apart; and the reported loss is the
            # mean over all ranks, the loss of the global batch.
            finite = ops.cast(self.all_reduce(1.0 - finite) == 0, ms.float32)
            loss = self.all_reduce(loss) / self.world_size
        return loss, finite < 0.5

    def _update(self, loss, overflow, grads):
        """The optimizer step unless it overflowed, then the loss scale's update; returns the loss after both."""
        if not overflow:
            loss = ops.depend(loss, self.optimizer(grads))
        if self.dynamic:
            loss = ops.depend(loss, self._update_scale(overflow))
        return loss

    def _all_finite(self, grads):
        # An inf or nan anywhere makes the total non-finite (inf - inf is nan). One float sum per gradient costs
        # a fifth of isfinite + all (which writes and reduces a boolean copy of every gradient): 40 ms of a
        # PVT-Tiny step at 224x224 batch 8. Finite gradients whose total passes float32's 3.4e38 also count as an
        # overflow; such a step would be thrown away by any loss scaler anyway.
        return ops.isfinite(ops.stack(self.hyper_map(_grad_sum, grads)).sum())

    def _update_scale(self, overflow):
        if overflow:
            ops.assign(self.scale, ops.maximum(self.scale / 2.0, Tensor(1.0, ms.float32)))
            ops.assign(self.clean_steps, Tensor(0, ms.int32))
        else:
            ops.assign_add(self.clean_steps, Tensor(1, ms.int32))
            if self.clean_steps >= self.scale_window:
                ops.assign(self.scale, self.scale * 2.0)
                ops.assign(self.clean_steps, Tensor(0, ms.int32))
        return self.scale


def training_state_parameters(network, optimizer, train_step):
    """What a resumable checkpoint holds: the network's parameters (BatchNorm statistics included), the optimizer
    state (moments, step) and the loss-scale state of `train_step`; not the lr table, which is derived from the
    config (a resumed run may extend the schedule)."""
    unique = {}
    for param in list(network.get_parameters()) + list(optimizer.get_parameters()) + [
            train_step.scale, train_step.clean_steps]:
        if not param.name.startswith("learning_rate"):
            unique.setdefault(param.name, param)
    return list(unique.values())
