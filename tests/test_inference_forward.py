"""Detection and segmentation inference run the network through `ShapeFlexibleForward`: the outputs are those of a
plain call in the current mode, every image is counted once in the stats, and under a global PyNative context
nothing is compiled. (The equivalence with mmdetection / mmsegmentation through these paths is in
test_detection_mmdet.py, test_segmentation_mmseg.py and test_dense_checkpoints.py.)"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from pvt_dense.detection.evaluation import DetectorForward
from pvt_dense.segmentation.evaluation import Predictor

SCALE = (256, 64)  # keep-ratio short side 64: the images below give aligned sizes 64x96, 64x96 and 96x64


class TinyNet(nn.Cell):
    """(1, 3, h, w) -> ((1, 4, h, w), (1, 4, h/2, w/2)): a conv stands for a segmentor, two maps for a detector's
    outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, pad_mode="same", has_bias=True)
        self.pool = nn.AvgPool2d(2, 2)

    def construct(self, x):
        y = self.conv(x)
        return y, self.pool(y)


@pytest.fixture(params=[ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def mode(request):
    ms.set_device("CPU")
    previous = ms.get_context("mode")
    ms.set_context(mode=request.param)
    yield request.param
    ms.set_context(mode=previous)


def _decoded_photos():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size, dtype=np.uint8) for size in ((40, 60, 3), (42, 61, 3), (60, 40, 3))]


def test_segmentation_predictor_runs_whole_images_through_the_flexible_forward(mode):
    net = TinyNet()
    net.set_train(False)
    images = _decoded_photos()
    plain = Predictor(net, scale=SCALE, forward=lambda x: net(ms.Tensor(x[None]))[0].asnumpy()[0])
    predictor = Predictor(net, scale=SCALE)
    predictor.expect_images(image.shape[:2] for image in images)
    for image in images:
        np.testing.assert_allclose(predictor.logits(image), plain.logits(image), rtol=1e-5, atol=1e-5)
    stats = predictor.stats
    assert stats.compilations + stats.graph_calls + stats.eager_calls == len(images)
    if mode == ms.PYNATIVE_MODE:
        assert stats.compilations == 0 and stats.eager_calls == len(images)
    assert ms.get_context("mode") == mode
    assert plain.stats is None and Predictor(net, mode="slide").stats is None  # one window shape: plain calls


def test_detector_forward_returns_the_plain_outputs_and_counts_each_call(mode):
    net = TinyNet()
    net.set_train(False)
    forward = DetectorForward(net)
    sizes = ((64, 96), (64, 96), (96, 64))
    forward.expect_sizes(sizes)
    rng = np.random.default_rng(1)
    for height, width in sizes:
        batch = rng.standard_normal((1, 3, height, width)).astype(np.float32)
        expected = [t.asnumpy() for t in net(ms.Tensor(batch))]
        for got, want in zip(forward(batch), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    stats = forward.stats
    assert stats.compilations + stats.graph_calls + stats.eager_calls == len(sizes)
    assert forward.shapes == {(1, 3, 64, 96), (1, 3, 96, 64)}
    if mode == ms.PYNATIVE_MODE:
        assert stats.compilations == 0
