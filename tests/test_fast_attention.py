"""The fused attention kernels (forward PvtAttention, backward PvtAttentionGrad in
pvt_dense/models/kernels/fast_ops.cc) against float64 numpy and against MindSpore's BatchMatMul + Softmax formula:
softmax(q k^T) v and its three gradients, on sizes that take every path of the backward (whole groups per thread,
or one group's query blocks split over threads with per-thread dk/dv partials), odd sizes and single rows."""
import contextlib

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from pvt_dense.models import fast_ops

pytestmark = pytest.mark.skipif(fast_ops.kernels() is None or fast_ops.kernels().attention is None,
                                reason="no compiled attention kernel on this machine")


class WeightedAttention(nn.Cell):
    """sum(attention(q, k, v) * g): its gradient with respect to the attention's output is g."""

    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def construct(self, q, k, v, g):
        return (self.attention(q, k, v) * g).sum()


class OpsAttention(nn.Cell):
    """The MindSpore-operator formula the kernels replace."""

    def __init__(self):
        super().__init__()
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.times = ops.BatchMatMul()
        self.softmax = ops.Softmax(axis=-1)

    def construct(self, q, k, v):
        return self.times(self.softmax(self.scores(q, k)), v)


def run(attention, q, k, v, g):
    tensors = [ms.Tensor(a) for a in (q, k, v, g)]
    grad_fn = ms.value_and_grad(WeightedAttention(attention), grad_position=(0, 1, 2))
    _, grads = grad_fn(*tensors)
    return [attention(*tensors[:3]).asnumpy()] + [grad.asnumpy() for grad in grads]


def float64_reference(q, k, v, g):
    q, k, v, g = (a.astype(np.float64) for a in (q, k, v, g))
    scores = q @ np.swapaxes(k, -1, -2)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    dprobs = g @ np.swapaxes(v, -1, -2)
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True))
    return [probs @ v, dscores @ k, np.swapaxes(dscores, -1, -2) @ q, np.swapaxes(probs, -1, -2) @ g]


@contextlib.contextmanager
def kernel_threads(count):
    handle = fast_ops.kernels().handle
    before = handle.PvtThreadCount()
    handle.PvtSetThreadCount(count)
    try:
        yield
    finally:
        handle.PvtSetThreadCount(before)


def inputs(q_shape, kv_rows, seed):
    rng = np.random.default_rng(seed)
    kv_shape = q_shape[:-2] + (kv_rows, q_shape[-1])
    # Scaled so that the softmax is far from uniform (some rows nearly one-hot).
    q = 1.5 * rng.standard_normal(q_shape).astype(np.float32)
    k, v = (rng.standard_normal(kv_shape).astype(np.float32) for _ in range(2))
    g = rng.standard_normal(q_shape).astype(np.float32)
    return q, k, v, g


# (q shape, key rows): many groups (each thread owns whole groups); one group of 4 blocks with the last one short
# (blocks split over threads, dk/dv summed from per-thread partials); odd head size and key count; one query row;
# one key (softmax 1 everywhere).
SHAPES = [((2, 3, 130, 16), 30), ((1, 1, 200, 8), 7), ((3, 2, 67, 5), 13), ((1, 2, 1, 4), 9), ((2, 1, 70, 3), 1)]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("q_shape,kv_rows", SHAPES)
def test_attention_kernels_match_float64(q_shape, kv_rows, threads, pynative):
    q, k, v, g = inputs(q_shape, kv_rows, seed=sum(q_shape) + kv_rows)
    with kernel_threads(threads):
        got = run(fast_ops.kernels().attention, q, k, v, g)
    for name, ours, expected in zip(("out", "dq", "dk", "dv"), got, float64_reference(q, k, v, g)):
        assert ours.shape == expected.shape, name
        np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6 * max(1.0, np.abs(expected).max()),
                                   err_msg=name)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_attention_kernels_equal_the_mindspore_formula(mode, pynative):
    q, k, v, g = inputs((2, 2, 97, 32), 49, seed=5)
    ms.set_context(mode=mode)
    fused = run(fast_ops.kernels().attention, q, k, v, g)
    plain = run(OpsAttention(), q, k, v, g)
    for name, ours, theirs in zip(("out", "dq", "dk", "dv"), fused, plain):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6 * np.abs(theirs).max(), err_msg=name)


def test_attention_backward_refuses_mismatched_shapes(pynative):
    q, k, v, g = inputs((1, 2, 10, 8), 5, seed=0)
    grad = ops.Custom(f"{fast_ops.kernels().library}:PvtAttentionGrad", out_shape=fast_ops._attention_grad_shape,
                      out_dtype=lambda *t: (t[0], t[1], t[2]), func_type="aot")
    with pytest.raises((ValueError, RuntimeError), match="attention backward|dout"):
        grad(*(ms.Tensor(a) for a in (q, k, v, g[:, :, :5])))
