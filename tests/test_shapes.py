"""ShapeFlexibleForward: the same outputs as a plain static graph at odd input sizes (backbone, RetinaNet,
Semantic FPN), and at most one graph compilation for many distinct sizes each seen once.

The compile count is read from MindSpore itself (`cell.compile_cache`: one phase per compiled graph of that Cell),
not from timing, which is not robust on a loaded machine.
"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from pvt_dense import create_backbone
from pvt_dense.engine.shapes import ShapeFlexibleForward, execution_mode, tensor_signature

ODD_SIZES = ((97, 131), (160, 211), (224, 320))
SMALL_ODD_SIZES = ((65, 97), (97, 131), (130, 66))  # heads compile the same graph at any size: keep them cheap


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_device("CPU")
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


@pytest.fixture
def inputs_at(images):
    """inputs_at(sizes): one random (1, 3, h, w) tensor per (h, w), each of its own seed."""
    return lambda sizes: [images(h, w, seed=index) for index, (h, w) in enumerate(sizes)]


def flat(outputs):
    """(Nested tuples of) tensors -> a flat list of numpy arrays."""
    if isinstance(outputs, (tuple, list)):
        return [array for item in outputs for array in flat(item)]
    return [outputs.asnumpy()]


def assert_same_as_plain_graph(net, sizes, inputs):
    """Plain graph-mode calls (one compilation per size) on `inputs` (one per size) against the wrapper's eager path
    (its graph path is the plain call itself); every output agrees to 1e-5."""
    plain = [flat(net(x)) for x in inputs]
    forward = ShapeFlexibleForward(net, policy="eager")
    flexible = [flat(forward(x)) for x in inputs]
    assert forward.stats.eager_calls == len(sizes) and forward.stats.compilations == 0
    assert ms.get_context("mode") == ms.GRAPH_MODE
    for size, expected, got in zip(sizes, plain, flexible, strict=True):
        assert [a.shape for a in got] == [a.shape for a in expected], size
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(size))


def test_backbone_outputs_equal_the_static_graph_at_odd_sizes(inputs_at):
    net = create_backbone("pvt_tiny")
    net.set_train(False)
    assert_same_as_plain_graph(net, ODD_SIZES, inputs_at(ODD_SIZES))


def test_retinanet_raw_outputs_equal_the_static_graph_at_odd_sizes(inputs_at):
    from pvt_dense.detection.build import build_retinanet
    from pvt_dense.detection.config import load_detection_config
    cfg = load_detection_config(None, ["--pretrained", "", "--num_classes", "3", "--neck_channels", "16",
                                       "--head_channels", "16", "--head_stacked_convs", "1"])
    detector = build_retinanet(cfg)
    detector.set_train(False)
    assert_same_as_plain_graph(detector, SMALL_ODD_SIZES, inputs_at(SMALL_ODD_SIZES))


def test_segmentor_logits_equal_the_static_graph_at_odd_sizes(inputs_at):
    from pvt_dense.segmentation.build import build_segmentor
    from pvt_dense.segmentation.config import load_segmentation_config
    from pvt_dense.segmentation.segmentor import SegmentorInference
    cfg = load_segmentation_config(None, ["--neck_channels", "8", "--head_channels", "8", "--num_classes", "3"])
    net = SegmentorInference(build_segmentor(cfg))
    net.set_train(False)
    assert_same_as_plain_graph(net, SMALL_ODD_SIZES, inputs_at(SMALL_ODD_SIZES))


def test_many_sizes_seen_once_compile_one_graph(inputs_at):
    net = create_backbone("pvt_tiny")
    net.set_train(False)
    sizes = ((64, 64), (64, 96), (96, 64), (96, 96), (128, 64), (64, 128))
    forward = ShapeFlexibleForward(net)
    outputs = [flat(forward(x)) for x in inputs_at(sizes)]
    # The first size is compiled to measure what a compilation costs; each other size, seen once, runs eagerly
    # (an eager forward at these sizes costs a fraction of a compilation).
    assert forward.stats.compilations == 1 and forward.stats.eager_calls == len(sizes) - 1
    assert len(net.compile_cache) == 1  # MindSpore's own record of the graphs compiled for this Cell
    again = flat(forward(inputs_at(sizes[:1])[0]))
    assert forward.stats.graph_calls == 1 and len(net.compile_cache) == 1
    for a, b in zip(again, outputs[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert [o[0].shape for o in outputs] == [(1, 64, h // 4, w // 4) for h, w in sizes]


class TinyConv(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, pad_mode="pad", padding=1, has_bias=True)

    def construct(self, x):
        return self.conv(x) * 2.0


def test_a_recurring_size_is_compiled_once_its_eager_runs_cost_a_compilation(inputs_at):
    net = TinyConv()
    first, second = inputs_at(((8, 8), (8, 12)))
    # Assumed compilation cost of (almost) nothing: one eager run already pays for it.
    forward = ShapeFlexibleForward(net, compile_seconds=1e-12)
    forward(first)
    assert forward.stats.compilations == 0 and len(net.compile_cache) == 0
    forward(first)
    assert forward.stats.compilations == 1 and len(net.compile_cache) == 1
    forward(first)
    assert forward.stats.compilations == 1 and forward.stats.graph_calls == 1
    # A second wrapper of the same Cell knows that graph (an export run after another one with the same model).
    other = ShapeFlexibleForward(net)
    other(first)
    assert other.stats.graph_calls == 1 and other.stats.compilations == 0 and len(net.compile_cache) == 1
    # A new size with a measured (real) compilation cost: the first sighting runs eagerly.
    other(second)
    assert other.stats.eager_calls == 1 and len(net.compile_cache) == 1


def test_a_size_announced_to_recur_is_compiled_once_the_eager_speed_is_known(inputs_at):
    net = TinyConv()
    recurring, once = inputs_at(((8, 8), (8, 12)))
    forward = ShapeFlexibleForward(net, compile_seconds=1e-12)
    forward.expect(tensor_signature((1, 3, 8, 8)), count=3)
    forward(recurring)  # the eager speed is not known yet: this call measures it
    assert forward.stats.eager_calls == 1 and forward.stats.compilations == 0 and len(net.compile_cache) == 0
    forward(recurring)  # two calls left, each eager run dearer than the (assumed free) compilation: compiled now
    assert forward.stats.compilations == 1 and len(net.compile_cache) == 1
    forward(recurring)
    assert forward.stats.graph_calls == 1 and forward.stats.eager_calls == 1
    forward(once)  # not announced, seen once: eager unless one eager run costs a (measured) compilation
    assert forward.stats.compilations + forward.stats.eager_calls == 3


def test_policies_and_the_global_mode(inputs_at):
    net = TinyConv()
    inputs = inputs_at(((8, 8), (8, 12), (12, 8)))
    graph = ShapeFlexibleForward(net, policy="graph")
    for x in inputs:
        graph(x)
    assert graph.stats.compilations == 3 and len(net.compile_cache) == 3

    eager_net = TinyConv()
    eager = ShapeFlexibleForward(eager_net, policy="eager")
    for x in inputs + inputs:
        eager(x)
    assert eager.stats.eager_calls == 6 and len(eager_net.compile_cache) == 0

    pynative_net = TinyConv()
    with execution_mode(ms.PYNATIVE_MODE):
        auto = ShapeFlexibleForward(pynative_net)
        for x in inputs + inputs:
            auto(x)
        assert ms.get_context("mode") == ms.PYNATIVE_MODE
    assert auto.stats.eager_calls == 6 and len(pynative_net.compile_cache) == 0
    assert ms.get_context("mode") == ms.GRAPH_MODE


@pytest.mark.bad_input("argument", "ShapeFlexibleForward(cell, policy='fast') or compile_seconds=-1",
                       "ValueError naming the valid policies / the bad number")
def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="auto, graph, eager"):
        ShapeFlexibleForward(TinyConv(), policy="fast")
    with pytest.raises(ValueError, match="compile_seconds"):
        ShapeFlexibleForward(TinyConv(), compile_seconds=-1)
