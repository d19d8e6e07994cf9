"""Semantic FPN against mmsegmentation 1.2 and the official PVT segmentation test protocol.

References, none of them written here:
- test-time preprocessing: the official PVT code (whai362/PVT, segmentation/) tests with
  `MultiScaleFlipAug(img_scale=(2048, 512))` around `AlignResize(keep_ratio=True, size_divisor=32)`, which is
  `mmcv.imrescale(img, scale)` followed by `mmcv.imresize` of that result to both sides rounded up to multiples of 32.
  mmseg 1.2 has no AlignResize, so the reference here is mmcv's own `LoadImageFromFile`, `imrescale` and `imresize`
  composed in that order, then mmseg's `SegDataPreProcessor` (BGR -> RGB, mean/std);
- logits, losses, gradients and masks: mmseg 1.2's `EncoderDecoder` (backbone mmdet 3.3's PyramidVisionTransformer,
  mmseg's FPN neck and FPNHead), BatchNorm in eval mode with random running statistics, saved as an mmseg 1.x
  checkpoint file and loaded into ours with `load_whole_model` (tools/infer_seg.py reads the same file);
- metrics: mmseg 1.2's `IoUMetric`.
"""
import math

import cv2
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from mmlab_reference import require_mmseg
from pvt_dense.data.images import read_image
from pvt_dense.data.transforms import network_input_size, normalize, rescaled_size
from pvt_dense.models.fpn import build_neck
from pvt_dense.models.pvt import PVTBackbone, PVTSpec
from pvt_dense.segmentation.evaluation import Predictor
from pvt_dense.segmentation.metrics import segmentation_metrics
from pvt_dense.segmentation.segmentor import EncoderDecoder, SegmentorInference, SegmentorWithLoss
from pvt_dense.segmentation.semfpn_head import SemanticFPNHead
from pvt_dense.segmentation.transforms import prepare_test_image

torch = pytest.importorskip("torch")

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
NUM_CLASSES, NECK_CHANNELS, HEAD_CHANNELS = 6, 16, 8
# A PVT small enough for a CPU test: one block per stage, 8/16/24/32 channels (mmdet: embed_dims x num_heads).
TINY_SPEC = PVTSpec(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4))
# The protocol at a small scale for the network tests (the real (2048, 512) is checked on the preprocessing alone).
SMALL_SCALE = (160, 64)


@pytest.fixture(scope="module")
def mmseg():
    return require_mmseg()


TINY_BACKBONE = dict(type="mmdet.PyramidVisionTransformer", embed_dims=8, num_heads=[1, 2, 3, 4],
                     num_layers=[1, 1, 1, 1])
# pvt_tiny as mmdet builds it (64/128/320/512 channels, two blocks per stage).
PVT_TINY_BACKBONE = dict(type="mmdet.PyramidVisionTransformer", num_layers=[2, 2, 2, 2])


def reference_config(avg_non_ignore=False, backbone=TINY_BACKBONE, in_channels=TINY_SPEC.embed_dims):
    from mmengine.config import ConfigDict
    return ConfigDict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255),
        backbone=backbone,
        neck=dict(type="FPN", in_channels=list(in_channels), out_channels=NECK_CHANNELS, num_outs=4),
        decode_head=dict(type="FPNHead", in_channels=[NECK_CHANNELS] * 4, in_index=[0, 1, 2, 3],
                         feature_strides=[4, 8, 16, 32], channels=HEAD_CHANNELS, dropout_ratio=0.1,
                         num_classes=NUM_CLASSES, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0,
                                          avg_non_ignore=avg_non_ignore)),
        train_cfg=dict(), test_cfg=dict(mode="whole"))


def randomise_head(reference, seed=0):
    """Random BatchNorm statistics and affine terms, and a classifier large enough that argmax ties are rare (the
    3x3 convs keep their Kaiming init)."""
    generator = torch.Generator().manual_seed(seed)
    head = reference.decode_head
    with torch.no_grad():
        for name, tensor in list(head.named_parameters()) + list(head.named_buffers()):
            if "num_batches_tracked" in name or "conv.weight" in name:
                continue
            if "running_var" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)


def build_reference(config):
    """An mmseg EncoderDecoder with random weights, in eval mode."""
    from mmseg.registry import MODELS
    torch.manual_seed(0)
    reference = MODELS.build(config)
    reference.init_weights()
    randomise_head(reference)
    return reference.eval()


def save_as_mmseg(reference, path):
    """The file an mmseg 1.x run writes: mmengine's checkpoint dict with the class names in its meta."""
    from mmengine.runner.checkpoint import save_checkpoint
    meta = dict(dataset_meta=dict(classes=tuple(f"class{i}" for i in range(NUM_CLASSES))))
    save_checkpoint(dict(meta=meta, state_dict=reference.state_dict()), str(path))
    return path


def build_pair(tmp_dir, avg_non_ignore=False):
    """(mmseg EncoderDecoder, our EncoderDecoder with its weights, loaded from the file mmseg saved), eval mode.
    mmdet's PVT uses LayerNorm eps 1e-6 everywhere, so ours is built with that convention."""
    from pvt_dense.checkpoint import load_whole_model
    reference = build_reference(reference_config(avg_non_ignore))
    backbone = PVTBackbone(TINY_SPEC.with_norm_eps_style("mmdet"))
    neck = build_neck(backbone, out_channels=NECK_CHANNELS, num_outs=4)
    ours = EncoderDecoder(backbone, neck, SemanticFPNHead(neck.out_channels, neck.strides, NUM_CLASSES,
                                                          channels=HEAD_CHANNELS))
    report = load_whole_model(ours, save_as_mmseg(reference, tmp_dir / "semfpn_mmseg.pth"))
    assert sum(report.mapped.values()) == len(list(ours.get_parameters()))
    ours.set_train(False)
    return reference, ours


@pytest.fixture(scope="module")
def models(mmseg, tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("models"))


def sample_photos():
    """Real photos (scikit-image's samples) cut to landscape, portrait, odd and wide shapes, for JPEG and PNG."""
    from skimage import data
    coffee, astronaut, chelsea = data.coffee(), data.astronaut(), data.chelsea()
    return {
        "landscape.jpg": cv2.resize(coffee, (500, 333), interpolation=cv2.INTER_AREA),
        "portrait.png": astronaut[50:451, 130:367],
        "odd.jpg": chelsea[:211, :317],
        "small.png": cv2.resize(astronaut, (131, 97), interpolation=cv2.INTER_AREA),
        "wide.jpg": cv2.resize(coffee[100:220], (400, 120), interpolation=cv2.INTER_AREA),
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory, write_photos):
    return list(write_photos(tmp_path_factory.mktemp("photos"), sample_photos()).values())


def official_test_input(path, scale):
    """The official AlignResize(keep_ratio=True, size_divisor=32) from mmcv's functions, normalised by mmseg's
    SegDataPreProcessor: (original (H, W), (1, 3, h, w) float32 tensor)."""
    import mmcv
    from mmcv.transforms import LoadImageFromFile
    from mmseg.models.data_preprocessor import SegDataPreProcessor
    bgr = LoadImageFromFile()(dict(img_path=str(path)))["img"]
    rescaled = mmcv.imrescale(bgr, scale)
    height, width = rescaled.shape[:2]
    aligned = mmcv.imresize(rescaled, (int(math.ceil(width / 32)) * 32, int(math.ceil(height / 32)) * 32))
    preprocessor = SegDataPreProcessor(mean=MEAN, std=STD, bgr_to_rgb=True)
    batch = preprocessor(dict(inputs=[torch.from_numpy(aligned.transpose(2, 0, 1).copy())]), training=False)
    return bgr.shape[:2], batch["inputs"]


def test_test_preprocessing_is_the_official_align_resize(mmseg, photos):
    seen_difference = False
    for path in photos:
        image = read_image(str(path))
        original, reference = official_test_input(path, (2048, 512))
        ours = prepare_test_image(image)
        assert image.shape[:2] == original
        assert ours.shape == tuple(reference.shape[1:]) == (3,) + network_input_size(*original, (2048, 512))
        np.testing.assert_array_equal(ours, reference[0].numpy())
        # One resize straight to the aligned size would sample other pixels: the test can tell them apart.
        aligned, rescaled = network_input_size(*original, (2048, 512)), rescaled_size(*original, 512, 2048)[:2]
        if aligned != rescaled:
            straight = normalize(cv2.resize(image, aligned[::-1], interpolation=cv2.INTER_LINEAR)).transpose(2, 0, 1)
            seen_difference |= bool(np.abs(straight - reference[0].numpy()).max() > 0.1)
    assert seen_difference


# Stage sizes of a 97x131 and a 61x97 input: every stage floors, so the head's upsampled maps must be resized.
ODD_FEATURE_SIZES = [[(24, 32), (12, 16), (6, 8), (3, 4)], [(15, 24), (7, 12), (3, 6), (1, 3)]]


@pytest.mark.parametrize("sizes", ODD_FEATURE_SIZES, ids=["97x131", "61x97"])
def test_neck_and_head_logits_match_mmseg_on_the_same_backbone_features(models, sizes, pynative):
    reference, ours = models
    rng = np.random.default_rng(len(sizes[0]))
    features = [rng.normal(size=(2, channels) + size).astype(np.float32)
                for channels, size in zip(TINY_SPEC.embed_dims, sizes, strict=True)]
    with torch.no_grad():
        expected = reference.decode_head(reference.neck([torch.from_numpy(f) for f in features])).numpy()
    got = ours.head(ours.neck(tuple(ms.Tensor(f) for f in features))).asnumpy()
    assert got.shape == expected.shape == (2, NUM_CLASSES) + sizes[0]
    assert np.abs(expected).max() > 1.0  # logits big enough for the tolerance to mean something
    assert np.abs(got - expected).max() <= 1e-4


class PassLogits(nn.Cell):
    """A 'segmentor' whose logits are its input, so the loss cell sees exactly the logits given to mmseg."""

    def construct(self, x):
        return x


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_loss_and_its_gradient_match_mmseg_decode_head(mmseg, avg_non_ignore, pynative):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    reference = build_reference(reference_config(avg_non_ignore))
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(2, NUM_CLASSES, 8, 10)) * 3).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (2, 29, 37))
    labels[rng.random(labels.shape) < 0.3] = 255
    labels[1, :10] = 255  # a block of ignored pixels too
    samples = [SegDataSample(gt_sem_seg=PixelData(data=torch.from_numpy(label[None]))) for label in labels]
    torch_logits = torch.from_numpy(logits).requires_grad_(True)
    expected = reference.decode_head.loss_by_feat(torch_logits, samples)["loss_ce"]
    expected.backward()

    loss_cell = SegmentorWithLoss(PassLogits(), avg_non_ignore=avg_non_ignore)
    ms_labels = ms.Tensor(labels.astype(np.int32))
    loss, grad = ms.value_and_grad(lambda x: loss_cell(x, ms_labels))(ms.Tensor(logits))
    assert float(loss.asnumpy()) == pytest.approx(expected.item(), rel=1e-5)
    reference_grad = torch_logits.grad.numpy()
    # float32 sums over the bilinear backward: agreement to 1e-5 of the largest gradient
    assert np.abs(grad.asnumpy() - reference_grad).max() <= 1e-5 * np.abs(reference_grad).max()


# upsample=False: the tools' path, logits at the head's stride resized on the host (both of the test protocol's
# resizes); True: the exported graph's, upsampled in the graph.
@pytest.mark.parametrize("upsample", [False, True], ids=["host_resize", "graph_upsample"])
def test_masks_and_logits_match_mmseg_predict_on_real_photos_in_graph_mode(models, photos, graph_mode, upsample):
    from mmseg.structures import SegDataSample
    reference, ours = models
    inference = SegmentorInference(ours, upsample=upsample)
    assert inference.output_stride == (1 if upsample else 4)
    predictor = Predictor(inference, scale=SMALL_SCALE)
    inference.set_train(False)
    input_sizes, tie_pixels, total_pixels = set(), 0, 0
    for path in photos:
        original, inputs = official_test_input(path, SMALL_SCALE)
        sample = SegDataSample(metainfo=dict(img_shape=tuple(inputs.shape[2:]), ori_shape=original))
        with torch.no_grad():
            result = reference.predict(inputs, [sample])[0]
        expected_logits = result.seg_logits.data.numpy()
        expected_mask = result.pred_sem_seg.data[0].numpy()
        image = read_image(str(path))
        logits = predictor.logits(image)
        mask = predictor.predict(image)
        assert logits.shape == expected_logits.shape == (NUM_CLASSES,) + original
        assert np.abs(logits - expected_logits).max() <= 1e-4, path.name
        # Where the two best classes are within 1e-4 of each other, either is a correct argmax.
        top2 = np.sort(expected_logits, axis=0)[-2:]
        tied = (top2[1] - top2[0]) <= 1e-4
        assert np.array_equal(mask[~tied], expected_mask[~tied].astype(np.uint8)), path.name
        tie_pixels, total_pixels = tie_pixels + int(tied.sum()), total_pixels + tied.size
        input_sizes.add(tuple(inputs.shape[2:]))
    assert tie_pixels <= 1e-3 * total_pixels
    # Each size runs through a compiled graph or eagerly (ShapeFlexibleForward), with mmseg's logits either way; a
    # size is compiled at most once (odd.jpg and small.png share one), and every call is counted.
    assert len(input_sizes) < len(photos)
    stats = predictor.stats
    # MindSpore's own count can hold one graph more than ours: in the second variant run in one process, MindSpore
    # compiles one graph of the new wrapper again on its second call (so it did before the eager changes too, and
    # with a segmentor of its own: left alone)
    assert stats.compilations <= len(input_sizes) and len(inference.compile_cache) <= stats.compilations + 1
    assert stats.compilations + stats.graph_calls + stats.eager_calls == 2 * len(photos)  # logits, then predict


@pytest.mark.parametrize("upsample", [False, True], ids=["host_resize", "graph_upsample"])
def test_sliding_window_logits_match_mmseg_slide_inference(models, photos, graph_mode, upsample):
    from mmengine.config import ConfigDict
    from mmseg.structures import SegDataSample
    reference, ours = models
    inference = SegmentorInference(ours, upsample=upsample)
    predictor = Predictor(inference, scale=SMALL_SCALE, mode="slide", crop_size=(48, 64), stride=(32, 43))
    inference.set_train(False)
    saved = reference.test_cfg
    reference.test_cfg = ConfigDict(mode="slide", crop_size=(48, 64), stride=(32, 43))
    try:
        for path in photos[:2] + photos[-1:]:  # landscape, portrait and wide: overlapping windows both ways
            original, inputs = official_test_input(path, SMALL_SCALE)
            sample = SegDataSample(metainfo=dict(img_shape=tuple(inputs.shape[2:]), ori_shape=original))
            with torch.no_grad():
                expected = reference.predict(inputs, [sample])[0].seg_logits.data.numpy()
            got = predictor.logits(read_image(str(path)))
            # Logits reach ~30 here; float32 noise through the small windows stays within 1e-5 of the largest.
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), path.name
    finally:
        reference.test_cfg = saved
    # every window has the crop size: one graph (MindSpore's count can hold one more when both variants of this test
    # run in one process, as in the whole-image test above)
    assert len(inference.compile_cache) <= 2


def test_metrics_match_mmseg_iou_metric(mmseg):
    from mmseg.evaluation import IoUMetric
    rng = np.random.default_rng(2)
    num_classes = 7  # class 5 is never labelled (but predicted), class 6 neither labelled nor predicted
    labels = [rng.integers(0, 5, size).astype(np.uint8) for size in [(13, 17), (20, 11), (9, 9)]]
    predictions = [np.where(rng.random(lab.shape) < 0.6, lab, rng.integers(0, 6, lab.shape)).astype(np.uint8)
                   for lab in labels]
    labels[0][:4] = 255
    labels[2][rng.random((9, 9)) < 0.4] = 255
    labels[1][labels[1] == 3] = 255  # ignored wherever it was labelled in one image
    metric = IoUMetric(iou_metrics=["mIoU"], ignore_index=255)
    metric.dataset_meta = dict(classes=[f"c{i}" for i in range(num_classes)])
    metric.process({}, [dict(pred_sem_seg=dict(data=torch.from_numpy(p[None].astype(np.int64))),
                             gt_sem_seg=dict(data=torch.from_numpy(lab[None].astype(np.int64))))
                        for p, lab in zip(predictions, labels, strict=True)])
    areas = [sum(result[i] for result in metric.results) for i in range(4)]
    per_class = IoUMetric.total_area_to_metrics(*areas, metrics=["mIoU"])
    summary = metric.compute_metrics(metric.results)  # mmseg rounds these to 2 decimals of a percent

    ours = segmentation_metrics(predictions, labels, num_classes)
    # mmseg divides in float32 (its areas are float32 tensors); ours in float64.
    np.testing.assert_allclose(ours["IoU"], np.asarray(per_class["IoU"], np.float64), rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(ours["Acc"], np.asarray(per_class["Acc"], np.float64), rtol=1e-6, equal_nan=True)
    assert ours["aAcc"] == pytest.approx(float(per_class["aAcc"]), rel=1e-6)
    assert np.isnan(ours["IoU"][6]) and ours["IoU"][5] == 0 and np.isnan(ours["Acc"][5])
    for name in ("aAcc", "mIoU", "mAcc"):
        assert round(100 * ours[name], 2) == pytest.approx(summary[name], abs=1e-9), name


def test_infer_seg_writes_the_masks_of_a_segmentor_saved_by_mmseg(mmseg, photos, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from mmseg.structures import SegDataSample
    root = Path(__file__).resolve().parents[1]
    reference = build_reference(reference_config(backbone=PVT_TINY_BACKBONE, in_channels=(64, 128, 320, 512)))
    checkpoint = save_as_mmseg(reference, tmp_path / "semfpn_mmseg.pth")
    command = [sys.executable, str(root / "tools" / "infer_seg.py"), "--backbone", "pvt_tiny",
               "--num_classes", str(NUM_CLASSES), "--neck_channels", str(NECK_CHANNELS),
               "--head_channels", str(HEAD_CHANNELS), "--test_scale", str(SMALL_SCALE[0]), str(SMALL_SCALE[1]),
               "--mode", "1", "--progress_bar", "False", "--ckpt_path", str(checkpoint),
               "--input", str(photos[0].parent), "--output", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{len(photos)} images segmented" in result.stdout
    for path in photos:
        original, inputs = official_test_input(path, SMALL_SCALE)
        sample = SegDataSample(metainfo=dict(img_shape=tuple(inputs.shape[2:]), ori_shape=original))
        with torch.no_grad():
            expected = reference.predict(inputs, [sample])[0]
        logits = expected.seg_logits.data.numpy()
        written = cv2.imread(str(tmp_path / "out" / "masks" / (path.name + ".png")), cv2.IMREAD_UNCHANGED)
        top2 = np.sort(logits, axis=0)[-2:]
        tied = (top2[1] - top2[0]) <= 1e-4
        assert written.shape == original and tied.mean() <= 1e-3
        assert np.array_equal(written[~tied], expected.pred_sem_seg.data[0].numpy()[~tied]), path.name
