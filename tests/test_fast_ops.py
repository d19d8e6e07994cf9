"""The fused CPU kernels for exact GELU and LayerNorm against PyTorch (exact erf GELU, F.layer_norm) and float64.

Bounds are the measured worst cases with a margin. GELU over |x| <= 12: forward 4.8e-7 vs torch's float32 GELU and
3.9e-7 vs float64 (torch's own: 3.8e-7), gradient 3.3e-7 vs torch. LayerNorm vs float64, relative to the largest
value: y 1.3e-7 (9.4e-7 with a +30 common offset), dx 1.3e-7, dgamma/dbeta 7e-8 over 25088 rows (torch float32:
3e-6, it sums in float32).
"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from pvt_dense.models import fast_ops

torch = pytest.importorskip("torch")
F = torch.nn.functional

GELU_TOLERANCE = 1e-6
MODES = [pytest.param(ms.GRAPH_MODE, id="graph"), pytest.param(ms.PYNATIVE_MODE, id="pynative")]
EDGES = np.array([-np.inf, np.inf, np.nan, -0.0, 0.0, -1e30, 1e30, -3.4e38, 3.4e38, 1e-40, -1e-40, 1e-45, -88.0,
                  88.0, -5.5, 5.5, -3.9, 3.9], np.float32)


def in_mode(mode, fn):
    ms.set_context(mode=mode)
    try:
        return fn()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


class WeightedSum(nn.Cell):
    """sum(net(x) * w): one scalar whose gradient is w pushed back through net."""

    def __init__(self, net, weight):
        super().__init__()
        self.net = net
        self.weight = ms.Tensor(weight)

    def construct(self, x):
        return (self.net(x) * self.weight).sum()


def gelu_inputs():
    rng = np.random.default_rng(0)
    # 2**17 + 2**16 values: enough for the kernel to split the work over threads.
    return np.concatenate([np.linspace(-12, 12, 2 ** 17), 3 * rng.standard_normal(2 ** 16), EDGES[3:5]]).astype(
        np.float32).reshape(-1, 2)


def test_kernels_are_built_where_a_compiler_exists():
    import shutil
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler: the Cells fall back to MindSpore's operators")
    available, reason = fast_ops.fast_ops_status()
    assert available, reason
    assert fast_ops.GELU().use_kernel and fast_ops.LayerNorm(8).use_kernel


@pytest.mark.parametrize("mode", MODES)
def test_gelu_matches_exact_gelu_and_its_gradient(mode):
    x = gelu_inputs()
    weight = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    net = fast_ops.GELU()

    def run():
        y = net(ms.Tensor(x)).asnumpy()
        dx = ms.grad(WeightedSum(net, weight))(ms.Tensor(x)).asnumpy()
        return y, dx

    y, dx = in_mode(mode, run)
    xt = torch.from_numpy(x).requires_grad_()
    yt = F.gelu(xt)
    (yt * torch.from_numpy(weight)).sum().backward()
    # torch 2.14's float32 GELU is itself up to 1.1e-6 from the float64 values (near |x| = 3.4), so against it the
    # bound is two tolerances; against float64 (below) it is one.
    assert np.abs(y - yt.detach().numpy()).max() <= 2 * GELU_TOLERANCE
    assert np.abs(dx - xt.grad.numpy()).max() <= 2 * GELU_TOLERANCE * np.abs(weight).max()
    x64 = x.astype(np.float64)
    exact = F.gelu(torch.from_numpy(x64)).numpy()  # float64 erf: the reference both float32 versions aim at
    assert np.abs(y - exact).max() <= GELU_TOLERANCE


@pytest.mark.parametrize("mode", MODES)
def test_gelu_edge_values_match_torch(mode):
    net = fast_ops.GELU()
    y = in_mode(mode, lambda: net(ms.Tensor(EDGES)).asnumpy())
    # torch's float64 GELU: its float32 one gives NaN at +inf and overflows to inf at 3.4e38 since torch 2.14.
    expected = F.gelu(torch.from_numpy(EDGES.astype(np.float64))).numpy().astype(np.float32)
    # NaN and inf where torch has them, zeros and identities in the tails.
    np.testing.assert_allclose(y, expected, rtol=0, atol=GELU_TOLERANCE)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(y[~finite], expected[~finite])
    exact = F.gelu(torch.from_numpy(EDGES.astype(np.float64))).numpy()
    # (graph mode may flush denormal inputs such as 1e-40 to zero: MindSpore's threads run with FTZ/DAZ set)
    np.testing.assert_allclose(y[finite], exact[finite].astype(np.float32), rtol=2e-6, atol=1e-37)


def test_gelu_on_a_strided_view_in_pynative(pynative):
    x = np.random.default_rng(2).standard_normal((64, 3, 40)).astype(np.float32)
    y = fast_ops.GELU()(ms.Tensor(x).transpose(2, 0, 1)).asnumpy()
    np.testing.assert_allclose(y, F.gelu(torch.from_numpy(x).permute(2, 0, 1)).numpy(), rtol=0,
                               atol=GELU_TOLERANCE)


LAYER_NORM_CASES = [
    pytest.param((8, 3136, 64), 1e-6, id="stage1-batch8-long-gamma-sums"),
    pytest.param((2, 7, 320), 1e-5, id="odd-rows-offset-mean"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,eps", LAYER_NORM_CASES)
def test_layer_norm_matches_torch_with_gradients(mode, shape, eps):
    rng = np.random.default_rng(3)
    channels = shape[-1]
    # A large common offset checks that the variance is not computed as E[x^2] - E[x]^2.
    x = (2.0 * rng.standard_normal(shape) + 30.0).astype(np.float32)
    gamma = (1.0 + 0.3 * rng.standard_normal(channels)).astype(np.float32)
    beta = (0.3 * rng.standard_normal(channels)).astype(np.float32)
    weight = rng.standard_normal(shape).astype(np.float32)
    net = fast_ops.LayerNorm(channels, eps)
    net.gamma.set_data(ms.Tensor(gamma))
    net.beta.set_data(ms.Tensor(beta))

    def run():
        y = net(ms.Tensor(x)).asnumpy()
        loss = WeightedSum(net, weight)
        dx, (dgamma, dbeta) = ms.grad(loss, grad_position=0, weights=loss.trainable_params())(ms.Tensor(x))
        return y, dx.asnumpy(), dgamma.asnumpy(), dbeta.asnumpy()

    y, dx, dgamma, dbeta = in_mode(mode, run)
    tensors = [torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in (x, gamma, beta)]
    yt = F.layer_norm(tensors[0], (channels,), tensors[1], tensors[2], eps)
    (yt * torch.from_numpy(weight.astype(np.float64))).sum().backward()
    expected = [yt.detach().numpy()] + [t.grad.numpy() for t in tensors]
    for name, ours, ref in zip(("y", "dx", "dgamma", "dbeta"), (y, dx, dgamma, dbeta), expected, strict=True):
        scale = np.abs(ref).max()
        assert np.abs(ours - ref).max() <= 2e-6 * scale, name
    # and against torch's float32 kernel, the parity reference of the model tests
    y32 = F.layer_norm(torch.from_numpy(x), (channels,), torch.from_numpy(gamma), torch.from_numpy(beta), eps)
    assert np.abs(y - y32.numpy()).max() <= 2e-6 * np.abs(y32.numpy()).max()


def test_layer_norm_is_a_drop_in_for_nn_layer_norm(pynative):
    ours, theirs = fast_ops.LayerNorm(48, 1e-5), nn.LayerNorm((48,), epsilon=1e-5)
    assert [(p.name, p.shape, p.dtype) for p in ours.get_parameters()] == [
        (p.name, p.shape, p.dtype) for p in theirs.get_parameters()]
    assert np.array_equal(ours.gamma.asnumpy(), theirs.gamma.asnumpy())
    assert np.array_equal(ours.beta.asnumpy(), theirs.beta.asnumpy())
    x = ms.Tensor(np.random.default_rng(4).standard_normal((3, 5, 48)).astype(np.float32))
    np.testing.assert_allclose(ours(x).asnumpy(), theirs(x).asnumpy(), rtol=0, atol=5e-6)


def test_fallback_paths_give_the_same_numbers(pynative):
    x = ms.Tensor(np.random.default_rng(5).standard_normal((6, 40)).astype(np.float32))
    gelu, norm = fast_ops.GELU(), fast_ops.LayerNorm(40, 1e-6)
    fast = gelu(x).asnumpy(), norm(x).asnumpy()
    gelu.use_kernel = norm.use_kernel = False
    slow = gelu(x).asnumpy(), norm(x).asnumpy()
    np.testing.assert_allclose(fast[0], slow[0], rtol=0, atol=GELU_TOLERANCE)
    np.testing.assert_allclose(fast[1], slow[1], rtol=0, atol=5e-6)
    # float16 takes MindSpore's own operators even where the kernels exist
    half = x.astype(ms.float16)
    assert fast_ops.GELU()(half).dtype == ms.float16 and fast_ops.LayerNorm(40, 1e-6)(half).dtype == ms.float16


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "numpy"])
@pytest.mark.parametrize("shape", [(150, 37, 53), (3, 5000), (1, 7, 9), (2, 0)])
def test_running_argmax_is_numpys_argmax(shape, kernel):
    """The segmentation masks' argmax over class maps given one map at a time: numpy's result on the stacked maps
    (first index on ties, NaN the largest), from the kernel library's loop and from its numpy fallback."""
    assert fast_ops.kernels() is not None
    rng = np.random.default_rng(5)
    maps = rng.integers(-3, 4, size=shape).astype(np.float32)  # small integers: many ties
    if maps.size:
        flat = maps.reshape(shape[0], -1)
        flat[rng.integers(0, shape[0], 40), rng.integers(0, flat.shape[1], 40)] = np.nan
        flat[:, 0] = -np.inf
    running = fast_ops.RunningArgmax(shape[1:])
    if not kernel:
        running.handle = None
    for plane in maps:
        running.add(plane)
    assert running.index.dtype == np.int32
    np.testing.assert_array_equal(running.index, maps.argmax(axis=0))
