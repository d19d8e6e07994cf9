"""Contract of every PVT size, v1 and v2: what the backbone declares is what it returns, for any input size, in both
modes (v2-only behaviour: tests/test_backbone_v2.py)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

import pvt_dense
from pvt_dense.errors import PVTDenseError
from pvt_dense.models.factory import MODEL_SPECS
from pvt_dense.models.pvt import PVT_SPECS, drop_path_schedule, parameter_count
from pvt_dense.models.pvt_v2 import PVT_V2_SPECS, PVTv2Backbone

# From MindCV's PVT page (its parameter table) and the official PVT code (whai362/PVT, classification/pvt.py).
CLASSIFIER_PARAMS = {"pvt_tiny": 13_229_288, "pvt_small": 24_485_864, "pvt_medium": 44_208_104,
                     "pvt_large": 61_369_320}
BACKBONE_PARAMS = {"pvt_tiny": 12_714_240, "pvt_small": 23_970_816, "pvt_medium": 43_693_056,
                   "pvt_large": 60_854_272}


@pytest.mark.parametrize("name", sorted(PVT_SPECS))
def test_parameter_counts_match_the_published_tables_and_are_float32(name):
    classifier = pvt_dense.create_model(name)
    assert parameter_count(classifier) == CLASSIFIER_PARAMS[name]
    assert {p.dtype for p in classifier.get_parameters()} == {ms.float32}
    assert parameter_count(pvt_dense.create_backbone(name)) == BACKBONE_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PVT_SPECS))
def test_stage_maps_have_declared_channels_and_floor_strides(name, pynative, images):
    net = pvt_dense.create_backbone(name)
    net.set_train(False)
    assert net.out_channels == (64, 128, 320, 512)
    assert net.strides == (4, 8, 16, 32)
    for height, width in ((224, 224), (256, 352), (97, 131)):
        outs = net(images(height, width))
        assert isinstance(outs, tuple) and len(outs) == 4
        for out, channels, stride in zip(outs, net.out_channels, net.strides, strict=True):
            # Each stage floors its own input size, as PyTorch's strided convolutions do.
            assert out.shape == (1, channels, height // stride, width // stride), (height, width, stride)
            assert np.isfinite(out.asnumpy()).all()


def test_floor_sizes_compose_per_stage(pynative, images):
    # 97 -> 24 -> 12 -> 6 -> 3 and 131 -> 32 -> 16 -> 8 -> 4: flooring per stage equals flooring by the stride.
    net = pvt_dense.create_backbone("pvt_tiny")
    net.set_train(False)
    assert [o.shape[2:] for o in net(images(97, 131))] == [(24, 32), (12, 16), (6, 8), (3, 4)]


@pytest.mark.parametrize("name, out_indices, size, shapes", [
    # floor divisions (v1): 64x96 -> 16x24 -> 8x12 -> 4x6 -> 2x3
    ("pvt_tiny", (1, 2, 3), (64, 96), [(1, 128, 8, 12), (1, 320, 4, 6), (1, 512, 2, 3)]),
    # ceil divisions (v2): 70x45 -> 18x12 -> 9x6 -> 5x3 -> 3x2
    ("pvt_v2_b0", (1, 3), (70, 45), [(1, 64, 9, 6), (1, 256, 3, 2)]),
])
def test_out_indices_select_stages_and_declare_them(name, out_indices, size, shapes, pynative, images):
    net = pvt_dense.create_backbone(name, out_indices=out_indices)
    net.set_train(False)
    spec = MODEL_SPECS[name]
    strides = (4, 8, 16, 32)
    assert isinstance(net, PVTv2Backbone) == name.startswith("pvt_v2")
    assert len(net.stages) == max(out_indices) + 1
    assert net.out_channels == tuple(spec.embed_dims[i] for i in out_indices)
    assert net.strides == tuple(strides[i] for i in out_indices)
    assert [(i.stage, i.channels, i.stride) for i in net.feature_info] == \
        list(zip(out_indices, net.out_channels, net.strides, strict=True))
    assert [o.shape for o in net(images(*size))] == shapes
    shallow = pvt_dense.create_backbone(name, out_indices=(0, 1))
    # Stages past the last requested one are not built.
    assert len(shallow.stages) == 2
    assert shallow.out_channels == (spec.embed_dims[0], spec.embed_dims[1])


def test_v2_stage_grids_round_up():
    assert PVT_V2_SPECS["pvt_v2_b0"].stage_grids(70, 45) == ((18, 12), (9, 6), (5, 3), (3, 2))


@pytest.mark.parametrize("name, size, batch, grids", [
    ("pvt_tiny", (97, 131), 2, [(24, 32), (12, 16), (6, 8), (3, 4)]),
    ("pvt_v2_b2_li", (65, 79), 1, [(17, 20), (9, 10), (5, 5), (3, 3)]),
])
def test_graph_and_pynative_give_the_same_outputs(name, size, batch, grids, images):
    net = pvt_dense.create_backbone(name, out_indices=(0, 1, 2, 3))
    net.set_train(False)
    x = images(*size, batch=batch, seed=3)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    eager = [o.asnumpy() for o in net(x)]
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = [o.asnumpy() for o in net(x)]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert [g.shape[2:] for g in graph] == grids
    for a, b in zip(eager, graph, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_classifier_graph_and_pynative_agree(images):
    net = pvt_dense.create_model("pvt_tiny", num_classes=7)
    net.set_train(False)
    x = images(224, 224, batch=2, seed=4)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    eager = net(x).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = net(x).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert eager.shape == (2, 7)
    np.testing.assert_allclose(eager, graph, atol=1e-5, rtol=1e-5)


def test_drop_path_rises_linearly_over_all_blocks():
    schedule = drop_path_schedule((3, 4, 6, 3), 0.3)
    flat = [rate for stage in schedule for rate in stage]
    np.testing.assert_allclose(flat, np.linspace(0, 0.3, 16))
    # The second stage starts where the first ended, not at depths[0] blocks of the first stage again.
    assert schedule[1][0] == pytest.approx(0.3 * 3 / 15)
    net = pvt_dense.create_backbone("pvt_small", drop_path_rate=0.3)
    rates = [block.drop_path.drop_prob for stage in net.stages for block in stage.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, 16))


def sum_of_outputs(net):
    def loss_fn(x):
        return sum(out.mean() for out in net(x))
    return loss_fn


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_gradients_reach_every_trainable_parameter(mode, images):
    ms.set_context(mode=mode)
    try:
        # No drop path: a dropped residual branch legitimately gets no gradient for that batch.
        net = pvt_dense.create_backbone("pvt_tiny")
        net.set_train(True)
        params = net.trainable_params()
        grad_fn = ms.value_and_grad(sum_of_outputs(net), None, params)
        loss, grads = grad_fn(images(64, 96, batch=2))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert np.isfinite(loss.asnumpy())
    assert len(grads) == len(params) == len(list(net.get_parameters()))
    dead = [p.name for p, g in zip(params, grads, strict=True) if not np.abs(g.asnumpy()).max() > 0]
    assert not dead, dead


def test_classifier_gradients_reach_every_parameter(pynative, images):
    net = pvt_dense.create_model("pvt_tiny", num_classes=5)
    net.set_train(True)
    params = net.trainable_params()

    def loss_fn(x, y):
        return ops.cross_entropy(net(x), y)

    _, grads = ms.value_and_grad(loss_fn, None, params)(images(224, 224, batch=2), ms.Tensor([1, 3], ms.int32))
    dead = [p.name for p, g in zip(params, grads, strict=True) if not np.abs(g.asnumpy()).max() > 0]
    assert not dead, dead


def test_frozen_stages_do_not_move_under_an_optimizer_step(pynative, images):
    with_drop_path = pvt_dense.create_backbone("pvt_tiny", frozen_stages=2, drop_path_rate=0.2)
    # No stochastic layer in a frozen stage: it computes the same in train mode, even nested in another Cell.
    stages = list(with_drop_path.stages)
    assert all(block.drop_path.drop_prob == 0 for stage in stages[:2] for block in stage.blocks)
    assert stages[3].blocks[1].drop_path.drop_prob == pytest.approx(0.2)
    # Without drop path every trainable weight gets a gradient, so "moved" is exactly "not frozen".
    net = pvt_dense.create_backbone("pvt_tiny", frozen_stages=2)
    net.set_train(True)
    frozen = [p for stage in list(net.stages)[:2] for p in stage.get_parameters()]
    assert frozen and all(not p.requires_grad for p in frozen)
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    optimizer = nn.Adam(net.trainable_params(), learning_rate=1e-2)
    grad_fn = ms.value_and_grad(sum_of_outputs(net), None, optimizer.parameters)
    _, grads = grad_fn(images(64, 64, batch=2))
    optimizer(grads)
    frozen_names = {p.name for p in frozen}
    for p in net.get_parameters():
        moved = not np.array_equal(before[p.name], p.asnumpy())
        assert moved == (p.name not in frozen_names), p.name


def test_recompute_keeps_outputs_and_gradients(images):
    x = images(64, 64, batch=1)
    plain = pvt_dense.create_backbone("pvt_tiny")
    recomputed = pvt_dense.create_backbone("pvt_tiny", recompute_stages=(0, 1))
    ms.load_param_into_net(recomputed, {p.name: ms.Parameter(p.value(), name=p.name) for p in plain.get_parameters()})
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        results = []
        for net in (plain, recomputed):
            net.set_train(True)
            results.append(ms.value_and_grad(sum_of_outputs(net), None, net.trainable_params())(x))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    (loss_a, grads_a), (loss_b, grads_b) = results
    np.testing.assert_allclose(loss_a.asnumpy(), loss_b.asnumpy(), rtol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-6)


@pytest.mark.bad_input("backbone input tensor",
                       "a 3-D tensor, 1 channel, NHWC layout, a 16x64 image",
                       "ValueError: '4-D NCHW', '3 input channels', 'at least 32x32'")
@pytest.mark.parametrize("bad_input, message", [
    (np.zeros((3, 64, 64), np.float32), "4-D NCHW"),
    (np.zeros((1, 1, 64, 64), np.float32), "3 input channels"),
    (np.zeros((1, 64, 64, 3), np.float32), "3 input channels"),
    (np.zeros((1, 3, 16, 64), np.float32), "at least 32x32"),
])
def test_bad_inputs_get_clear_errors(bad_input, message, pynative):
    net = pvt_dense.create_backbone("pvt_tiny")
    with pytest.raises(ValueError, match=message):
        net(ms.Tensor(bad_input))


@pytest.mark.bad_input("config",
                       "create_backbone / create_model with an unknown name (pvt_huge, resnet50), out_indices (2, 1) "
                       "or (4,), frozen_stages=5, drop_path_rate=1.5",
                       "PVTDenseError listing the valid names; ValueError naming the argument")
def test_unknown_names_and_arguments_are_clear_errors():
    with pytest.raises(PVTDenseError, match="pvt_large.*pvt_medium.*pvt_small.*pvt_tiny"):
        pvt_dense.create_backbone("pvt_huge")
    with pytest.raises(PVTDenseError, match="valid names"):
        pvt_dense.create_model("resnet50")
    with pytest.raises(ValueError, match="out_indices"):
        pvt_dense.create_backbone("pvt_tiny", out_indices=(2, 1))
    with pytest.raises(ValueError, match="out_indices"):
        pvt_dense.create_backbone("pvt_tiny", out_indices=(4,))
    with pytest.raises(ValueError, match="frozen_stages"):
        pvt_dense.create_backbone("pvt_tiny", frozen_stages=5)
    with pytest.raises(ValueError, match="drop_path_rate"):
        pvt_dense.create_backbone("pvt_tiny", drop_path_rate=1.5)


def test_drop_path_keeps_or_drops_whole_samples_and_scales_the_kept():
    from pvt_dense.models.layers import DropPath
    drop_path = DropPath(0.5)
    drop_path.set_train(True)
    x = ms.Tensor(np.ones((64, 3, 4), np.float32))
    out = drop_path(x).asnumpy()
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # a sample is kept or dropped whole
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    drop_path.set_train(False)
    np.testing.assert_array_equal(drop_path(x).asnumpy(), x.asnumpy())


DROP_PATH_MEMORY_SCRIPT = """
import numpy as np, mindspore as ms
from mindspore import nn, ops
from pvt_dense.models.layers import DropPath
ms.set_context(mode=ms.GRAPH_MODE)
def resident_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))
class Loss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.drop_path = DropPath(0.1)
    def construct(self, x):
        return ops.relu(self.drop_path(x)).sum()
class Gradient(nn.Cell):
    def __init__(self):
        super().__init__()
        self.loss = Loss()
        self.grad = ops.GradOperation()
    def construct(self, x):
        return self.grad(self.loss)(x)
x = ms.Tensor(np.ones((2, 100000, 64), np.float32))
gradient = Gradient()
gradient.set_train(True)
gradient.compile(x)
before = resident_bytes()
gradient(x).asnumpy()
print(resident_bytes() - before)
"""


def test_drop_path_gradient_needs_no_memory_beyond_its_tensors(tmp_path):
    """x * mask with a (B, 1, 1) mask is a broadcasting Mul, whose CPU kernel keeps 8 bytes per output element
    (MindSpore 2.10), forward and backward, in every block: the first gradient call took ~10x the input (the
    output, its gradient, the numpy copy and ~4x in tables); explicitly broadcast, ~3x. A fresh process, so that
    the resident-size difference is this call's own."""
    import subprocess
    import sys
    script = tmp_path / "drop_path_memory.py"
    script.write_text(DROP_PATH_MEMORY_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) < 5 * 2 * 100000 * 64 * 4
