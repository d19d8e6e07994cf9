"""pvt_dense's fused AdamW (pvt_dense/engine/optim.py) against torch.optim.AdamW and mindcv's AdamW: parameter
groups with and without decay, several steps, graph and PyNative (its construct is compiled either way)."""
import mindspore as ms
import numpy as np
import pytest
from mindcv.optim.adamw import AdamW as MindcvAdamW

from pvt_dense.engine.optim import AdamW

torch = pytest.importorskip("torch")

SHAPES = [(3, 4), (7,), (2, 3, 5)]


def trajectories(steps=6, seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
    grads = [[rng.standard_normal(shape).astype(np.float32) for shape in SHAPES] for _ in range(steps)]
    return weights, grads


def run_mindspore(optimizer_class, weights, grads, lr, eps, decay=0.05, groups=True, **kwargs):
    params = [ms.Parameter(ms.Tensor(w), name=f"p{i}") for i, w in enumerate(weights)]
    if groups:  # the last parameter without decay, as the recipes do for norms and biases
        arg = [{"params": params[:-1], "weight_decay": decay}, {"params": params[-1:], "weight_decay": 0.0},
               {"order_params": params}]
        optimizer = optimizer_class(arg, learning_rate=lr, eps=eps, **kwargs)
    else:
        optimizer = optimizer_class(params, learning_rate=lr, eps=eps, weight_decay=decay, **kwargs)
    for step in grads:
        optimizer(tuple(ms.Tensor(g) for g in step))
    return [p.asnumpy() for p in params] + [m.asnumpy() for m in optimizer.moments1] + \
        [v.asnumpy() for v in optimizer.moments2]


def run_torch(weights, grads, lr, eps, decay=0.05, groups=True):
    params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
    if groups:
        arg = [{"params": params[:-1], "weight_decay": decay}, {"params": params[-1:], "weight_decay": 0.0}]
    else:
        arg = [{"params": params, "weight_decay": decay}]
    optimizer = torch.optim.AdamW(arg, lr=lr, eps=eps)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = torch.from_numpy(g)
        optimizer.step()
    state = [optimizer.state[p] for p in params]
    return [p.detach().numpy() for p in params] + [s["exp_avg"].numpy() for s in state] + \
        [s["exp_avg_sq"].numpy() for s in state]


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
@pytest.mark.parametrize("groups", [True, False], ids=["groups", "one_group"])
def test_fused_adamw_matches_torch_adamw(mode, groups, pynative):
    ms.set_context(mode=mode)
    weights, grads = trajectories()
    ours = run_mindspore(AdamW, weights, grads, lr=1e-2, eps=1e-8, groups=groups)
    theirs = run_torch(weights, grads, lr=1e-2, eps=1e-8, groups=groups)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert np.abs(ours[0] - weights[0]).max() > 1e-2  # the weights did move


def test_fused_adamw_equals_mindcv_adamw_with_a_schedule_and_large_eps(pynative):
    # A per-step learning rate and an eps comparable to sqrt(v), where a wrongly corrected eps would show.
    weights, grads = trajectories(seed=1)
    schedule = [1e-2, 5e-3, 2e-3, 1e-3, 1e-3, 5e-4]
    ours = run_mindspore(AdamW, weights, grads, lr=schedule, eps=0.3)
    theirs = run_mindspore(MindcvAdamW, weights, grads, lr=schedule, eps=0.3)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_fused_adamw_keeps_mindcv_state_names():
    params = [ms.Parameter(ms.Tensor(np.ones((2, 2), np.float32)), name="w")]
    ours, theirs = AdamW(params), MindcvAdamW(params)
    assert sorted(p.name for p in ours.get_parameters()) == sorted(p.name for p in theirs.get_parameters())


def test_fused_adamw_with_a_learning_rate_per_group_matches_torch(pynative):
    weights, grads = trajectories(seed=2)
    params = [ms.Parameter(ms.Tensor(w), name=f"p{i}") for i, w in enumerate(weights)]
    optimizer = AdamW([{"params": params[:-1], "weight_decay": 0.05, "lr": 1e-2},
                       {"params": params[-1:], "weight_decay": 0.0, "lr": 3e-3}], eps=1e-8)
    references = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
    torch_optimizer = torch.optim.AdamW([{"params": references[:-1], "weight_decay": 0.05, "lr": 1e-2},
                                         {"params": references[-1:], "weight_decay": 0.0, "lr": 3e-3}], eps=1e-8)
    for step in grads:
        optimizer(tuple(ms.Tensor(g) for g in step))
        for p, g in zip(references, step, strict=True):
            p.grad = torch.from_numpy(g)
        torch_optimizer.step()
    for ours, theirs in zip(params, references, strict=True):
        np.testing.assert_allclose(ours.asnumpy(), theirs.detach().numpy(), rtol=0, atol=1e-6)
