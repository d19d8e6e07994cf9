"""Attention three ways agree, output and gradients: MindSpore ops over the whole score matrix, MindSpore ops over
query-row chunks (large inputs), and the fused CPU kernel (default; its backward recomputes the probabilities)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from pvt_dense.models import fast_ops
from pvt_dense.models.layers import SpatialReductionAttention


class Loss(nn.Cell):
    def __init__(self, attention, height, width):
        super().__init__()
        self.attention, self.height, self.width = attention, height, width

    def construct(self, x, g):
        return (self.attention(x, self.height, self.width) * g).sum()


def run(max_scores, x, g, height, width, kernel=False):
    ms.set_seed(0)
    if kernel:
        attention = SpatialReductionAttention(dim=64, num_heads=2, sr_ratio=2)
        assert attention.use_kernel
    else:
        with fast_ops.mindspore_ops_only():
            attention = SpatialReductionAttention(dim=64, num_heads=2, sr_ratio=2)
    attention.max_scores = max_scores
    # Weights large enough that the softmax is far from uniform (the default init gives nearly flat attention).
    rng = np.random.default_rng(1)
    for param in attention.trainable_params():
        fan_in = int(np.prod(param.shape[1:])) if len(param.shape) > 1 else 4
        param.set_data(ms.Tensor((rng.standard_normal(param.shape) * 2 / np.sqrt(fan_in)).astype(np.float32)))
    out = attention(ms.Tensor(x), height, width).asnumpy()
    _, (dx, grads) = ms.value_and_grad(Loss(attention, height, width), grad_position=0,
                                       weights=attention.trainable_params())(ms.Tensor(x), ms.Tensor(g))
    return [out, dx.asnumpy()] + [grad.asnumpy() for grad in grads]


HEIGHT, WIDTH = 10, 13  # 130 queries (2 blocks of 64 and 2 rows), 5x6 = 30 keys, 2 heads, batch 2: 15600 scores


def inputs():
    rng = np.random.default_rng(0)
    x = 2 * rng.standard_normal((2, HEIGHT * WIDTH, 64)).astype(np.float32)
    g = rng.standard_normal((2, HEIGHT * WIDTH, 64)).astype(np.float32)
    return x, g


def test_chunked_attention_equals_whole_attention(pynative):
    x, g = inputs()
    whole = run(1 << 30, x, g, HEIGHT, WIDTH)
    chunked = run(4000, x, g, HEIGHT, WIDTH)  # 4 chunks of 33 rows, the last one shorter
    for a, b in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())


@pytest.mark.skipif(fast_ops.kernels() is None or fast_ops.kernels().attention is None,
                    reason="no compiled attention kernel on this machine")
@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_fused_attention_kernel_equals_mindspore_attention(mode, pynative):
    x, g = inputs()
    whole = run(1 << 30, x, g, HEIGHT, WIDTH)
    ms.set_context(mode=mode)
    fused = run(1 << 30, x, g, HEIGHT, WIDTH, kernel=True)
    assert np.abs(whole[0]).max() > 0.1
    # float32 rounding only (sums in another order): the largest difference, in one element of a 64x64 weight
    # gradient, is 2.04e-6 of that gradient's largest value since the spatial reduction became a matrix product
    for a, b in zip(fused, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-6 * np.abs(b).max())
