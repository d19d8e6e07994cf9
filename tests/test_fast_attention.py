"""The fused attention kernels (forward PvtAttention, backward PvtAttentionGrad in
pvt_dense/models/kernels/attention.cc) against float64 numpy and against the MindSpore-operator path they replace
(head transposes, key/value split, scale, BatchMatMul + Softmax): per head softmax(scale q k^T) v on the q (B, N, C)
and kv (B, M, 2C) token layouts, and the gradients of q and kv, on sizes that take every path of the backward
(whole groups per thread, or one group's query blocks split over threads with per-thread dk/dv partials), odd
sizes and single rows."""
import contextlib

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from pvt_dense.models import fast_ops
from pvt_dense.models.layers import SpatialReductionAttention

pytestmark = pytest.mark.skipif(fast_ops.kernels() is None or fast_ops.kernels().attention is None,
                                reason="no compiled attention kernel on this machine")


class WeightedAttention(nn.Cell):
    """sum(attention(q, kv) * g): its gradient with respect to the attention's output is g."""

    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def construct(self, q, kv, g):
        return (self.attention(q, kv) * g).sum()


class KernelAttention(nn.Cell):
    def __init__(self, heads, scale):
        super().__init__()
        self.kernel = fast_ops.kernels().attention
        self.meta = ms.Tensor([heads, scale], ms.float32)

    def construct(self, q, kv):
        return self.kernel(q, kv, self.meta)


class OpsAttention(nn.Cell):
    """The MindSpore-operator path of SpatialReductionAttention (scale head_size ** -0.5)."""

    def __init__(self, heads, head_size):
        super().__init__()
        with fast_ops.mindspore_ops_only():
            self.attention = SpatialReductionAttention(dim=heads * head_size, num_heads=heads, sr_ratio=1)
        assert not self.attention.use_kernel

    def construct(self, q, kv):
        return self.attention.attention_heads(q, kv)


def run(attention, q, kv, g):
    tensors = [ms.Tensor(a) for a in (q, kv, g)]
    grad_fn = ms.value_and_grad(WeightedAttention(attention), grad_position=(0, 1))
    _, grads = grad_fn(*tensors)
    return [attention(*tensors[:2]).asnumpy()] + [grad.asnumpy() for grad in grads]


def float64_reference(q, kv, g, heads, scale):
    """out, dq, dkv from per-head float64 products."""
    batch, n, c = q.shape
    d = c // heads
    heads_of = lambda a: a.astype(np.float64).reshape(batch, -1, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    tokens_of = lambda a: a.transpose(0, 2, 1, 3).reshape(batch, -1, c)  # noqa: E731
    qh, gh = heads_of(q), heads_of(g)
    kh, vh = heads_of(kv[..., :c]), heads_of(kv[..., c:])
    scores = scale * qh @ np.swapaxes(kh, -1, -2)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    dprobs = gh @ np.swapaxes(vh, -1, -2)
    dscores = scale * probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True))
    dk, dv = np.swapaxes(dscores, -1, -2) @ qh, np.swapaxes(probs, -1, -2) @ gh
    return [tokens_of(probs @ vh), tokens_of(dscores @ kh), np.concatenate([tokens_of(dk), tokens_of(dv)], -1)]


@contextlib.contextmanager
def kernel_threads(count):
    handle = fast_ops.kernels().handle
    before = handle.PvtThreadCount()
    handle.PvtSetThreadCount(count)
    try:
        yield
    finally:
        handle.PvtSetThreadCount(before)


def inputs(batch, n, m, heads, d, seed):
    rng = np.random.default_rng(seed)
    # Scaled so that the softmax is far from uniform (some rows nearly one-hot).
    q = 1.5 * rng.standard_normal((batch, n, heads * d)).astype(np.float32)
    kv = rng.standard_normal((batch, m, 2 * heads * d)).astype(np.float32)
    g = rng.standard_normal((batch, n, heads * d)).astype(np.float32)
    return q, kv, g


# (batch, queries, keys, heads, head size): many groups (each thread owns whole groups); one group of 4 blocks with
# the last one short (blocks split over threads, dk/dv summed from per-thread partials); odd head size and key
# count; one query row; one key (softmax 1 everywhere).
SHAPES = [(2, 130, 30, 3, 16), (1, 200, 7, 1, 8), (3, 67, 13, 2, 5), (1, 1, 9, 2, 4), (2, 70, 1, 1, 3)]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_kernels_match_float64(shape, threads, pynative):
    heads, scale = shape[3], shape[4] ** -0.5
    q, kv, g = inputs(*shape, seed=sum(shape))
    with kernel_threads(threads):
        got = run(KernelAttention(heads, scale), q, kv, g)
    for name, ours, expected in zip(("out", "dq", "dkv"), got, float64_reference(q, kv, g, heads, scale), strict=True):
        assert ours.shape == expected.shape, name
        np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6 * max(1.0, np.abs(expected).max()),
                                   err_msg=name)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_attention_kernels_equal_the_mindspore_operators(mode, pynative):
    heads, d = 2, 32
    q, kv, g = inputs(2, 97, 49, heads, d, seed=5)
    ms.set_context(mode=mode)
    fused = run(KernelAttention(heads, d ** -0.5), q, kv, g)
    plain = run(OpsAttention(heads, d), q, kv, g)
    for name, ours, theirs in zip(("out", "dq", "dkv"), fused, plain, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6 * np.abs(theirs).max(), err_msg=name)


def test_attention_kernels_refuse_mismatched_shapes_and_head_counts(pynative):
    q, kv, g = inputs(1, 10, 5, 2, 8, seed=0)
    with pytest.raises((ValueError, RuntimeError), match="kv"):
        KernelAttention(2, 0.5)(ms.Tensor(q), ms.Tensor(kv[..., :-2]))
    with pytest.raises(RuntimeError):
        KernelAttention(3, 0.5)(ms.Tensor(q), ms.Tensor(kv)).asnumpy()  # 16 channels are not 3 heads
    grad = ops.Custom(f"{fast_ops.kernels().library}:PvtAttentionGrad", out_shape=fast_ops._attention_grad_shape,
                      out_dtype=lambda *t: (t[0], t[1]), func_type="aot")
    with pytest.raises((ValueError, RuntimeError), match="dout"):
        grad(*(ms.Tensor(a) for a in (q, kv, np.array([2, 0.5], np.float32), g[:, :5])))
