"""The fused Dense kernel (oneDNN sgemm + bias, pvt_dense/models/fast_ops.py) against float64 numpy and against
MindSpore's MatMul + BiasAdd path it replaces, forward and all three gradients."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from pvt_dense.models import fast_ops

needs_kernel = pytest.mark.skipif(fast_ops.kernels() is None or fast_ops.kernels().dense is None,
                                  reason="no compiled Dense kernel on this machine")


class WeightedSum(nn.Cell):
    """sum(dense(x) * g): its gradient with respect to dense's output is g."""

    def __init__(self, dense):
        super().__init__()
        self.dense = dense

    def construct(self, x, g):
        return (self.dense(x) * g).sum()


def run(dense, x, g):
    grad_fn = ms.value_and_grad(WeightedSum(dense), grad_position=0, weights=dense.trainable_params())
    _, (dx, (dw, db)) = grad_fn(ms.Tensor(x), ms.Tensor(g))
    return dense(ms.Tensor(x)).asnumpy(), dx.asnumpy(), dw.asnumpy(), db.asnumpy()


# Shapes that take each path of the kernel: many rows (split by rows), few rows and many outputs (split by
# outputs), tiny odd sizes, one row.
SHAPES = [((2, 300, 64), 512), ((1, 49, 512), 1024), ((3, 5, 7), 3), ((1, 1, 16), 1)]


@needs_kernel
@pytest.mark.parametrize("shape,out_features", SHAPES)
def test_dense_kernel_matches_float64_reference(shape, out_features, pynative):
    rng = np.random.default_rng(len(shape) + out_features)
    dense = fast_ops.Dense(shape[-1], out_features)
    assert dense.use_kernel
    dense.bias.set_data(ms.Tensor(rng.standard_normal(out_features).astype(np.float32)))
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (out_features,)).astype(np.float32)
    y, dx, dw, db = run(dense, x, g)
    w, b = dense.weight.asnumpy().astype(np.float64), dense.bias.asnumpy().astype(np.float64)
    x64, g64 = x.reshape(-1, shape[-1]).astype(np.float64), g.reshape(-1, out_features).astype(np.float64)
    scale = lambda a: 1e-6 * max(1.0, np.abs(a).max())  # noqa: E731  float32 round-off of sums of ~300 terms
    expected = (x64 @ w.T + b).reshape(y.shape)
    np.testing.assert_allclose(y, expected, rtol=0, atol=scale(expected))
    np.testing.assert_allclose(dx, (g64 @ w).reshape(shape), rtol=0, atol=scale(g64 @ w))
    np.testing.assert_allclose(dw, g64.T @ x64, rtol=0, atol=5 * scale(g64.T @ x64))
    np.testing.assert_allclose(db, g64.sum(0), rtol=0, atol=scale(g64.sum(0)))


@needs_kernel
def test_dense_kernel_equals_the_mindspore_path_in_graph_mode(graph_mode):
    rng = np.random.default_rng(3)
    fast = fast_ops.Dense(64, 128)
    with fast_ops.mindspore_ops_only():
        plain = fast_ops.Dense(64, 128)
    assert fast.use_kernel and not plain.use_kernel
    plain.weight.set_data(fast.weight.data.copy())
    fast.bias.set_data(ms.Tensor(rng.standard_normal(128).astype(np.float32)))
    plain.bias.set_data(fast.bias.data.copy())
    x = rng.standard_normal((2, 97, 64)).astype(np.float32)
    g = rng.standard_normal((2, 97, 128)).astype(np.float32)
    for ours, theirs in zip(run(fast, x, g), run(plain, x, g), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)


def test_dense_has_nn_dense_parameter_names_and_shapes():
    dense, reference = fast_ops.Dense(5, 3), nn.Dense(5, 3)
    assert [(p.name, p.shape) for p in dense.get_parameters()] == \
        [(p.name, p.shape) for p in reference.get_parameters()]


class GeluDense(nn.Cell):
    """sum(fc2(GELU(h)) * g) through the fused kernel (fused=True) or through nn.GELU and MatMul + BiasAdd."""

    def __init__(self, dense, fused):
        super().__init__()
        self.dense, self.fused = dense, fused
        self.kernel = fast_ops.kernels().gelu_dense
        self.gelu = nn.GELU(approximate=False)

    def construct(self, h, g):
        if self.fused:
            y = self.kernel(h, self.dense.weight, self.dense.bias)
        else:
            y = self.dense(self.gelu(h))
        return (y * g).sum()


def run_gelu_dense(dense, fused, h, g):
    net = GeluDense(dense, fused)
    _, (dh, (dw, db)) = ms.value_and_grad(net, grad_position=0, weights=dense.trainable_params())(ms.Tensor(h),
                                                                                               ms.Tensor(g))
    y = ms.grad(net, grad_position=1)(ms.Tensor(h), ms.Tensor(g)).asnumpy()  # d loss / d g is the forward
    return y, dh.asnumpy(), dw.asnumpy(), db.asnumpy()


# Many rows (several 256-row blocks per thread, the last one short), odd sizes, one row.
GELU_DENSE_SHAPES = [((2, 700, 48), 24), ((3, 5, 7), 3), ((1, 1, 16), 5)]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape,out_features", GELU_DENSE_SHAPES)
def test_gelu_dense_kernel_matches_float64_and_the_mindspore_path(shape, out_features, threads, pynative):
    import math
    rng = np.random.default_rng(shape[1] + out_features)
    with fast_ops.mindspore_ops_only():
        plain = fast_ops.Dense(shape[-1], out_features)
    plain.bias.set_data(ms.Tensor(rng.standard_normal(out_features).astype(np.float32)))
    h = 2 * rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (out_features,)).astype(np.float32)
    handle = fast_ops.kernels().handle
    before = handle.PvtThreadCount()
    handle.PvtSetThreadCount(threads)
    try:
        fused = run_gelu_dense(plain, True, h, g)
    finally:
        handle.PvtSetThreadCount(before)
    ops_path = run_gelu_dense(plain, False, h, g)
    # float64: a = GELU(h), y = a w^T + b, dh = (g w) GELU'(h), dw = g^T a, db = sum g
    h64, g64 = h.reshape(-1, shape[-1]).astype(np.float64), g.reshape(-1, out_features).astype(np.float64)
    w, b = plain.weight.asnumpy().astype(np.float64), plain.bias.asnumpy().astype(np.float64)
    erf = np.vectorize(math.erf)
    a = 0.5 * h64 * (1 + erf(h64 / math.sqrt(2)))
    slope = 0.5 * (1 + erf(h64 / math.sqrt(2))) + h64 * np.exp(-h64 ** 2 / 2) / math.sqrt(2 * math.pi)
    expected = [(a @ w.T + b).reshape(g.shape), ((g64 @ w) * slope).reshape(shape), g64.T @ a, g64.sum(0)]
    for name, ours, theirs, exact in zip(("y", "dh", "dw", "db"), fused, ops_path, expected, strict=True):
        bound = 2e-6 * max(1.0, np.abs(exact).max())
        np.testing.assert_allclose(ours, exact, rtol=0, atol=bound, err_msg=name)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2 * bound, err_msg=name)


@needs_kernel
@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(2, 301, 24), (1, 1, 16), (3, 5, 7)])
def test_mlp_inference_kernel_equals_the_training_path(shape, threads, mode):
    """In eval mode PVT's Mlp runs fc2(GELU(fc1(x))) as one kernel (blocks of 256 rows, the last one short); its
    output and, when a gradient is taken anyway, its gradients are those of the training path (Dense + GeluDense)
    and of float64."""
    import math

    from pvt_dense.models.layers import Mlp
    ms.set_context(mode=mode)
    handle = fast_ops.kernels().handle
    before = handle.PvtThreadCount()
    handle.PvtSetThreadCount(threads)
    try:
        rng = np.random.default_rng(shape[1])
        mlp = Mlp(shape[-1], 4 * shape[-1])
        assert mlp.mlp_kernel is not None
        for param in mlp.get_parameters():
            param.set_data(ms.Tensor(0.3 * rng.standard_normal(param.shape).astype(np.float32)))
        x = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
        scale = ms.Tensor(rng.standard_normal(shape).astype(np.float32))

        def results(training):
            mlp.set_train(training)
            weights = ms.ParameterTuple(mlp.trainable_params())
            loss = lambda inputs: (mlp(inputs) * scale).sum()  # noqa: E731
            grads = ms.grad(loss, grad_position=0, weights=weights)(x)
            return [mlp(x).asnumpy(), grads[0].asnumpy()] + [g.asnumpy() for g in grads[1]]

        fused, training = results(False), results(True)
        x64 = x.asnumpy().reshape(-1, shape[-1]).astype(np.float64)
        w1, b1, w2, b2 = (p.asnumpy().astype(np.float64) for p in
                          (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias))
        hidden = x64 @ w1.T + b1
        erf = np.vectorize(math.erf)
        exact = (0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))) @ w2.T + b2
        np.testing.assert_allclose(fused[0].reshape(exact.shape), exact, rtol=0, atol=1e-5 * np.abs(exact).max())
        for name, ours, theirs in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), fused, training, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * max(1.0, np.abs(theirs).max()), err_msg=name)
    finally:
        handle.PvtSetThreadCount(before)
        ms.set_context(mode=ms.PYNATIVE_MODE)
