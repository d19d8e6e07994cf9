"""Attention over query-row chunks (large inputs) equals attention over the whole score matrix, with gradients."""
import mindspore as ms
import numpy as np
from mindspore import nn

from pvt_dense.models.layers import SpatialReductionAttention


class Loss(nn.Cell):
    def __init__(self, attention, height, width):
        super().__init__()
        self.attention, self.height, self.width = attention, height, width

    def construct(self, x, g):
        return (self.attention(x, self.height, self.width) * g).sum()


def run(max_scores, x, g, height, width):
    ms.set_seed(0)
    attention = SpatialReductionAttention(dim=64, num_heads=2, sr_ratio=2)
    attention.max_scores = max_scores
    out = attention(ms.Tensor(x), height, width).asnumpy()
    _, (dx, grads) = ms.value_and_grad(Loss(attention, height, width), grad_position=0,
                                       weights=attention.trainable_params())(ms.Tensor(x), ms.Tensor(g))
    return [out, dx.asnumpy()] + [grad.asnumpy() for grad in grads]


def test_chunked_attention_equals_whole_attention(pynative):
    height, width = 10, 13  # 130 queries, 5x6 = 30 keys, 2 heads, batch 2: 15600 scores
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, height * width, 64)).astype(np.float32)
    g = rng.standard_normal((2, height * width, 64)).astype(np.float32)
    whole = run(1 << 30, x, g, height, width)
    chunked = run(4000, x, g, height, width)  # 4 chunks of 33 rows, the last one shorter
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
