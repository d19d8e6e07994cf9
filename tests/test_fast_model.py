"""A whole classifier with the fused CPU kernels (default) against the same weights built with MindSpore's own
operators (`fast_ops.mindspore_ops_only`): logits and the gradient of every parameter of a training loss, for PVT
v1 (every kernel: Dense, LayerNorm, GELU, attention forward and backward) and PVT v2 (overlapping embedding, conv
MLP, linear attention)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from pvt_dense.models import create_model, fast_ops

pytestmark = pytest.mark.skipif(fast_ops.kernels() is None, reason="no compiled kernels on this machine")


def logits_and_grads(net, pixels, labels):
    loss = nn.WithLossCell(net, nn.CrossEntropyLoss())
    params = net.trainable_params()
    _, grads = ms.value_and_grad(loss, grad_position=None, weights=params)(pixels, labels)
    return net(pixels).asnumpy(), {p.name: g.asnumpy() for p, g in zip(params, grads, strict=True)}


def randomized(net, seed):
    """Weights larger than the init (so attention is far from uniform and norms are not the identity)."""
    rng = np.random.default_rng(seed)
    for param in net.trainable_params():
        scale = 0.1 if len(param.shape) <= 1 else 1.0 / np.sqrt(np.prod(param.shape[1:]))
        base = 1.0 if param.name.endswith("gamma") else 0.0
        param.set_data(ms.Tensor((base + scale * rng.standard_normal(param.shape)).astype(np.float32)))
    return net


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b0"])
def test_fused_kernels_give_the_mindspore_operators_model(name, pynative):
    fast = randomized(create_model(name, num_classes=10), seed=1)
    with fast_ops.mindspore_ops_only():
        plain = create_model(name, num_classes=10)
    ms.load_param_into_net(plain, {p.name: ms.Parameter(p.data.copy(), name=p.name)
                                   for p in fast.trainable_params()}, strict_load=True)
    kernel_cells = [c for _, c in fast.cells_and_names() if getattr(c, "use_kernel", False)]
    assert kernel_cells and not any(getattr(c, "use_kernel", False) for _, c in plain.cells_and_names())
    rng = np.random.default_rng(0)
    pixels = ms.Tensor(rng.standard_normal((2, 3, 64, 64)).astype(np.float32))
    labels = ms.Tensor(np.array([3, 7], np.int32))
    fast_logits, fast_grads = logits_and_grads(fast, pixels, labels)
    plain_logits, plain_grads = logits_and_grads(plain, pixels, labels)
    assert np.abs(plain_logits).max() > 0.1
    np.testing.assert_allclose(fast_logits, plain_logits, rtol=0, atol=1e-5 * np.abs(plain_logits).max())
    assert fast_grads.keys() == plain_grads.keys()
    for key, expected in plain_grads.items():
        assert np.abs(expected).max() > 0, key  # every parameter gets a gradient
        np.testing.assert_allclose(fast_grads[key], expected, rtol=0, atol=1e-5 * np.abs(expected).max(),
                                   err_msg=key)
