"""One rank of the cross-rank BatchNorm test (started by msrun from test_segmentation_syncbn.py; not a test).

Every rank takes its slice of one global batch, runs CrossRankBatchNorm2d forward in training mode and backward
for the loss sum(output * weights), and saves its output, input gradient, gamma/beta gradients and moving statistics.
"""
import sys

import mindspore as ms
import numpy as np
from mindspore import ops
from mindspore.communication import get_group_size, get_rank, init

from pvt_dense.segmentation.sync_batchnorm import CrossRankBatchNorm2d

if __name__ == "__main__":
    out_dir, mode = sys.argv[1], sys.argv[2]
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    init()
    rank, world = get_rank(), get_group_size()
    rng = np.random.default_rng(0)
    x_all = rng.normal(2.0, 3.0, size=(4, 3, 5, 6)).astype(np.float32)
    w_all = rng.normal(size=(4, 3, 5, 6)).astype(np.float32)
    per_rank = 4 // world
    x = ms.Tensor(x_all[rank * per_rank:(rank + 1) * per_rank])
    w = ms.Tensor(w_all[rank * per_rank:(rank + 1) * per_rank])
    bn = CrossRankBatchNorm2d(3)
    bn.gamma.set_data(ms.Tensor(np.array([1.0, 2.0, 0.5], np.float32)))
    bn.beta.set_data(ms.Tensor(np.array([0.0, -1.0, 0.3], np.float32)))
    bn.set_train(True)

    class Loss(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def construct(self, inputs, weights):
            return (self.bn(inputs) * weights).sum()

    loss = Loss()
    output = bn(x)
    grad_fn = ops.GradOperation(get_all=True, get_by_list=True)(loss, ms.ParameterTuple([bn.gamma, bn.beta]))
    (grad_x, _), (grad_gamma, grad_beta) = grad_fn(x, w)
    np.savez(f"{out_dir}/rank{rank}.npz", output=output.asnumpy(), grad_x=grad_x.asnumpy(),
             grad_gamma=grad_gamma.asnumpy(), grad_beta=grad_beta.asnumpy(),
             moving_mean=bn.moving_mean.asnumpy(), moving_variance=bn.moving_variance.asnumpy())
