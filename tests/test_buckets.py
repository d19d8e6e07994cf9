"""Size buckets (`pvt_dense.models.buckets`, `BucketedForward`): a valid region run inside a larger zero-padded
bucket gives the results of the region run alone, for PVT v1 and v2, landscape and portrait, through the backbone,
whole RetinaNet detections and whole Semantic FPN masks; the plan groups sizes sensibly; compiled graphs are
released beyond `max_graphs`.

The reference side of every comparison is the same model called on the image at its own size, as before buckets
existed (that path is itself held against mmdetection / mmsegmentation / the official code by the parity tests),
run eagerly where it would otherwise compile a graph per size: PyNative gives the graph's numbers exactly
(test_shapes.py), at a fraction of the test's time."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from pvt_dense import create_backbone
from pvt_dense.detection.evaluation import DetectorForward
from pvt_dense.detection.postprocess import InferenceSettings
from pvt_dense.detection.infer import detect_file
from pvt_dense.detection.build import build_retinanet
from pvt_dense.detection.config import load_detection_config
from pvt_dense.engine.shapes import BucketedForward, ShapeFlexibleForward, execution_mode
from pvt_dense.models.buckets import check_bucket, key_bias, level_grids, plan_buckets
from pvt_dense.segmentation.evaluation import Predictor
from pvt_dense.segmentation.build import build_segmentor
from pvt_dense.segmentation.config import load_segmentation_config
from pvt_dense.segmentation.segmentor import SegmentorInference

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
BUCKET = (160, 224)
# valid regions (multiples of 32) of both orientations inside BUCKET, and one equal to it
VALID_SIZES = ((96, 128), (160, 64), (128, 224), (160, 224))


def nontrivial(net, seed):
    """Random weights large enough that every layer matters (the default inits make heads nearly constant)."""
    rng = np.random.default_rng(seed)
    for param in net.get_parameters():
        shape = param.shape
        if "moving_variance" in param.name or (len(shape) == 1 and ("gamma" in param.name or "norm" in param.name)):
            values = 0.5 + np.abs(rng.standard_normal(shape))
        else:
            values = rng.standard_normal(shape) * (0.05 if len(shape) > 1 else 0.3)
        param.set_data(ms.Tensor(values.astype(np.float32)))
    return net


def tensors(arrays):
    return tuple(tensors(a) for a in arrays) if isinstance(arrays, tuple) else ms.Tensor(arrays)


@pytest.mark.parametrize("model", ["pvt_tiny", "pvt_v2_b0"])
def test_backbone_maps_in_a_bucket_equal_the_maps_at_the_valid_size(model, graph_mode):
    net = create_backbone(model)
    net.set_train(False)
    rng = np.random.default_rng(0)
    for valid in VALID_SIZES:
        image = rng.standard_normal((1, 3) + valid).astype(np.float32)
        with execution_mode(ms.PYNATIVE_MODE):
            alone = [m.asnumpy() for m in net(ms.Tensor(image))]
        padded = np.zeros((1, 3) + BUCKET, np.float32)
        padded[:, :, :valid[0], :valid[1]] = image
        valid_inputs = ms.mutable(tensors(net.bucket_inputs(valid, BUCKET)))
        bucketed = [m.asnumpy() for m in net(ms.Tensor(padded), valid_inputs)]
        assert len(bucketed) == len(alone) == 4
        for got, want in zip(bucketed, alone, strict=True):
            crop = got[:, :, :want.shape[2], :want.shape[3]]
            np.testing.assert_allclose(crop, want, rtol=0, atol=1e-4 * np.abs(want).max())
            # the padding really is there and is not zero: masking, not luck, gives the equality
            if crop.shape != got.shape:
                assert np.abs(got).max() > 0
    assert len(net.compile_cache) == 1  # one graph for the four valid sizes

def test_bucket_attention_ignores_padded_keys_in_the_mindspore_ops_path(graph_mode, monkeypatch):
    """Without the fused kernels (PVT_DENSE_FAST_OPS=0 or another device) the key bias goes through MindSpore's
    softmax instead, with the same result."""
    net = create_backbone("pvt_tiny")
    net.set_train(False)
    for cell in net.cells_and_names():
        if hasattr(cell[1], "use_kernel") and hasattr(cell[1], "attention_bias_kernel"):
            cell[1].use_kernel = False
    rng = np.random.default_rng(1)
    valid = (96, 128)
    image = rng.standard_normal((1, 3) + valid).astype(np.float32)
    alone = [m.asnumpy() for m in net(ms.Tensor(image))]
    padded = np.zeros((1, 3) + BUCKET, np.float32)
    padded[:, :, :valid[0], :valid[1]] = image
    bucketed = [m.asnumpy() for m in net(ms.Tensor(padded), tensors(net.bucket_inputs(valid, BUCKET)))]
    for got, want in zip(bucketed, alone, strict=True):
        np.testing.assert_allclose(got[:, :, :want.shape[2], :want.shape[3]], want, rtol=0,
                                   atol=1e-4 * np.abs(want).max())


def _photo(rng, height, width):
    """A smooth image with edges (not noise), so detections and masks vary over it."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 7.0 + c) * np.cos(y / 5.0 - c) for c in range(3)], -1)
    return np.clip(127 + 100 * base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


# odd image sizes, landscape and portrait: the test protocol resizes and pads them to multiples of 32
ODD_IMAGES = ((61, 83), (83, 47), (50, 50), (75, 101))


@pytest.mark.parametrize("model", ["pvt_tiny", "pvt_v2_b0"])
def test_detections_through_buckets_equal_those_per_size(model, graph_mode):
    cfg = load_detection_config(None, ["--backbone", model, "--pretrained", "", "--num_classes", "3",
                                       "--neck_channels", "32", "--head_channels", "32",
                                       "--head_stacked_convs", "2"])
    detector = build_retinanet(cfg, 3)
    nontrivial(detector, 2)
    detector.set_train(False)
    img_scale, settings = (160, 96), InferenceSettings(score_thr=0.3)
    bucketed, per_size = DetectorForward(detector), DetectorForward(detector, buckets=False, policy="eager")
    rng = np.random.default_rng(3)
    images = [_photo(rng, h, w) for h, w in ODD_IMAGES]
    from pvt_dense.data.transforms import network_input_size
    bucketed.expect_sizes(network_input_size(h, w, img_scale) for h, w in ODD_IMAGES)
    total = 0
    for image in images:
        boxes, scores, labels = detect_file(detector, image, settings, img_scale, 32, MEAN, STD, bucketed)
        ref_boxes, ref_scores, ref_labels = detect_file(detector, image, settings, img_scale, 32, MEAN, STD,
                                                        per_size)
        assert len(boxes) == len(ref_boxes)
        np.testing.assert_array_equal(labels, ref_labels)
        np.testing.assert_allclose(boxes, ref_boxes, rtol=0, atol=1e-3)
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
        total += len(boxes)
    assert total > 10  # detections to compare, not empty lists
    # three padded sizes (landscape, portrait, square), one bucket graph: small images cost less than compiling
    padded = {network_input_size(h, w, img_scale) for h, w in ODD_IMAGES}
    assert len(padded) == len(bucketed.shapes) == 3
    assert bucketed.stats.compilations == 1 and per_size.stats.eager_calls == len(ODD_IMAGES)
    assert len(detector.compile_cache) == 1  # MindSpore's own count: the valid regions are inputs, not constants


@pytest.mark.parametrize("model", ["pvt_tiny", "pvt_v2_b0"])
def test_segmentation_masks_through_buckets_equal_those_per_size(model, graph_mode):
    cfg = load_segmentation_config(None, ["--backbone", model, "--pretrained", "", "--num_classes", "5",
                                          "--neck_channels", "32", "--head_channels", "16"])
    network = SegmentorInference(nontrivial(build_segmentor(cfg), 4))
    network.set_train(False)
    scale = (256, 64)
    predictor = Predictor(network, scale=scale)

    def alone(x):
        with execution_mode(ms.PYNATIVE_MODE):
            return network(ms.Tensor(x[None]))[0].asnumpy()[0]
    plain = Predictor(network, scale=scale, forward=alone)
    assert predictor.bucketed is not None
    rng = np.random.default_rng(5)
    images = [_photo(rng, h, w) for h, w in ODD_IMAGES]
    predictor.expect_images(image.shape[:2] for image in images)
    classes_seen = set()
    for image in images:
        logits, want = predictor.logits(image), plain.logits(image)
        np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
        mask = logits.argmax(0)
        np.testing.assert_array_equal(mask, want.argmax(0))
        classes_seen |= set(np.unique(mask).tolist())
    assert len(classes_seen) > 1
    assert predictor.stats.compilations == 1 and len(network.compile_cache) == 1


def test_linear_attention_backbones_are_not_bucketed(graph_mode):
    assert create_backbone("pvt_v2_b2_li").supports_buckets is False
    assert create_backbone("pvt_v2_b0").supports_buckets is True
    with pytest.raises(ValueError, match="cannot run in size buckets"):
        BucketedForward(create_backbone("pvt_v2_b2_li"), crop=None)


def test_plan_groups_sizes_and_every_size_fits_its_bucket():
    sizes = [(800, 1088)] * 5 + [(800, 1216)] * 4 + [(800, 1344)] * 3 + [(1088, 800)] * 3 + [(1344, 800)] * 2 + [
        (576, 1344)]
    plan = plan_buckets(sizes, compile_pixels=3.0e6, max_buckets=4)
    assert set(plan) == set(sizes)
    for size, bucket in plan.items():
        assert bucket[0] >= size[0] and bucket[1] >= size[1]
    buckets = set(plan.values())
    assert 1 < len(buckets) <= 4
    # a landscape and a portrait image never share a bucket as large as both
    assert plan[(800, 1088)] != plan[(1344, 800)]
    # free compilations: every distinct size keeps its own graph (up to max_buckets)
    assert set(plan_buckets([(64, 64), (64, 96)], 0.0).values()) == {(64, 64), (64, 96)}
    # at most max_buckets, whatever it costs
    many = [(32 * k, 32 * (20 - k)) for k in range(1, 19)]
    assert len(set(plan_buckets(many, 0.0, max_buckets=3).values())) <= 3


def test_bucket_helpers_reject_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="multiples of 32"):
        check_bucket((100, 128), (128, 128))
    with pytest.raises(ValueError, match="does not fit"):
        check_bucket((160, 128), (128, 128))
    bias = key_bias((12, 16), (20, 28), 4)  # stage 2 of 96x128 in 160x224: 3x4 valid cells of 5x7
    assert bias.shape == (1, 35) and (bias == 0).sum() == 12
    assert level_grids((800, 1344), (8, 16, 32, 64, 128)) == ((100, 168), (50, 84), (25, 42), (13, 21), (7, 11))


def test_flexible_forward_keeps_at_most_max_graphs_and_recompiles_a_released_one(graph_mode):
    net = nn.SequentialCell([nn.Conv2d(3, 4, 3, pad_mode="pad", padding=1, has_bias=True), nn.ReLU()])
    net.set_train(False)
    forward = ShapeFlexibleForward(net, policy="graph", max_graphs=2)
    rng = np.random.default_rng(6)
    inputs = {size: rng.standard_normal((1, 3) + size).astype(np.float32) for size in ((8, 8), (8, 16), (16, 8))}
    first = {}
    for size in ((8, 8), (8, 16), (16, 8), (8, 8)):
        out = forward(ms.Tensor(inputs[size])).asnumpy()
        assert len(net.compile_cache) <= 2
        if size in first:
            np.testing.assert_array_equal(out, first[size])
        first[size] = out
    # (8, 8) was released when (16, 8) came, and compiled again on its return
    assert forward.stats.compilations == 4 and forward.stats.released == 2


class ShapeRecorder(nn.Cell):
    """A bucketable Cell that records the inputs it is run with: the image's shape and whether a valid region
    came with it."""

    supports_buckets = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def bucket_inputs(self, valid_size, bucket_size):
        return (np.array(valid_size, np.int32),)

    def construct(self, images, valid=None):
        self.seen.append((tuple(images.shape), valid is None))
        return (images * 2.0,)


def test_a_bucket_run_eagerly_runs_each_image_at_its_own_size():
    """Padding pays only in a graph that sizes share: when a bucket's calls run eagerly they run unpadded, and
    under the eager inference settings (synchronous PyNative), restored afterwards."""
    recorder = ShapeRecorder()
    forward = BucketedForward(recorder, crop=lambda outputs, size: [o[:, :, :size[0], :size[1]] for o in outputs],
                              policy="eager")
    forward.expect_sizes([(64, 96), (96, 96)])
    image = np.arange(64 * 96 * 3, dtype=np.float32).reshape(1, 3, 64, 96)
    (out,) = forward(image)
    np.testing.assert_array_equal(out, image * 2.0)
    assert forward.bucket_for((64, 96)) == (96, 96) and recorder.seen == [((1, 3, 64, 96), True)]
    assert forward.stats.eager_calls == 1
    assert ms.get_context("pynative_synchronize") is False and ms.get_context("mode") == ms.PYNATIVE_MODE
