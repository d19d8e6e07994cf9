"""MINDIR export of the detector and the segmentor through tools/export.py: the written graph, loaded back with
mindspore.load + nn.GraphCell, gives the outputs of the model as users load it from the same checkpoint (built
with the default fast-kernel path, while the export uses MindSpore's own operators). Tiny inputs, few classes."""
import json
import os
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECTION_CONFIGS = [os.path.join(ROOT, "configs", "detection", f"retinanet_{model}_fpn_1x_coco.yaml")
                     for model in ("pvt_tiny", "pvt_v2_b0")]
SEGMENTATION_CONFIGS = [os.path.join(ROOT, "configs", "segmentation", f"semfpn_{model}_ade20k_40k.yaml")
                        for model in ("pvt_tiny", "pvt_v2_b0")]
sys.path.insert(0, os.path.join(ROOT, "tools"))
import export as export_tool  # noqa: E402  (tools/ is not a package)


def randomise(net, seed):
    """Every float parameter away from its initial value (norm gains/biases, BatchNorm statistics included), so
    that a weight the export dropped or misread shows in the outputs."""
    rng = np.random.default_rng(seed)
    for param in net.get_parameters():
        value = param.asnumpy()
        if param.name.endswith(("gamma", "moving_variance")):
            value = rng.uniform(0.5, 1.5, value.shape)
        else:
            value = value + 0.02 * rng.standard_normal(value.shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))


def exported_and_reference(graph_path, reference, shape, seed):
    pixels = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    graph = nn.GraphCell(ms.load(str(graph_path)))
    outs = [graph(ms.Tensor(pixels)), reference(ms.Tensor(pixels))]
    return [[o.asnumpy() for o in (out if isinstance(out, (tuple, list)) else (out,))] for out in outs]


def run_tool(arguments, capsys):
    status = export_tool.main(arguments)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the tool switches to graph mode
    out = capsys.readouterr().out
    assert status == 0, out
    return out


@pytest.mark.parametrize("config", DETECTION_CONFIGS, ids=lambda path: os.path.basename(path).split("_fpn")[0])
def test_detector_mindir_loads_back_and_equals_the_model(config, tmp_path, pynative, capsys):
    from pvt_dense.detection.build import build_retinanet
    from pvt_dense.detection.config import load_detection_config
    from pvt_dense.detection.build import load_detector
    # Narrow neck and head (the graph compile dominates; every key family is still exported)
    overrides = ["--num_classes", "3", "--pretrained", "", "--mode", "1", "--neck_channels", "32",
                 "--head_channels", "32", "--head_stacked_convs", "2"]
    cfg = load_detection_config(config, overrides)
    detector = build_retinanet(cfg, load_pretrained=False)
    randomise(detector, 0)
    ckpt = str(tmp_path / "detector.ckpt")
    ms.save_checkpoint(detector, ckpt)
    output = tmp_path / "detector.mindir"
    out = run_tool(["--config", config, "--ckpt_path", ckpt, "--shape", "1x3x64x96", "--output",
                    str(output), "--no-verify", *overrides], capsys)
    assert "detector" in out
    reference = load_detector(load_detection_config(config, overrides), ckpt)
    exported, expected = exported_and_reference(output, reference, (1, 3, 64, 96), 1)
    # P3..P7 class logits then box deltas: 9 anchors x 3 classes, 9 anchors x 4
    strides = (8, 16, 32, 64, 128)
    shapes = [(1, 27, -(-64 // s), -(-96 // s)) for s in strides] + [(1, 36, -(-64 // s), -(-96 // s))
                                                                     for s in strides]
    assert [o.shape for o in exported] == [o.shape for o in expected] == shapes
    for level, (a, b) in enumerate(zip(exported, expected, strict=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()), err_msg=f"output {level}")
    assert b"fast_ops-" not in output.read_bytes()
    sidecar = json.loads((tmp_path / "detector.mindir.json").read_text())
    assert "padded to multiples of 32, is 64x96" in sidecar["protocol"]


@pytest.mark.parametrize("config", SEGMENTATION_CONFIGS, ids=lambda path: os.path.basename(path).split("_ade")[0])
def test_segmentor_mindir_loads_back_and_equals_the_model(config, tmp_path, pynative, capsys):
    from pvt_dense.segmentation.build import build_segmentor, load_trained_segmentor
    from pvt_dense.segmentation.config import load_segmentation_config
    overrides = ["--num_classes", "5", "--pretrained", "", "--mode", "1", "--neck_channels", "32",
                 "--head_channels", "32"]
    cfg = load_segmentation_config(config, overrides)
    network = build_segmentor(cfg)
    randomise(network, 2)
    ckpt = str(tmp_path / "segmentor.ckpt")
    ms.save_checkpoint(network, ckpt)
    output = tmp_path / "segmentor.mindir"
    out = run_tool(["--config", config, "--ckpt_path", ckpt, "--shape", "1x3x64x96", "--output",
                    str(output), "--no-verify", *overrides], capsys)
    assert "segmentor" in out
    from pvt_dense.segmentation.segmentor import SegmentorInference
    reference = SegmentorInference(load_trained_segmentor(load_segmentation_config(config, overrides),
                                                          ckpt))
    reference.set_train(False)
    exported, expected = exported_and_reference(output, reference, (1, 3, 64, 96), 3)
    assert [o.shape for o in exported] == [o.shape for o in expected] == [(1, 5, 64, 96)]
    np.testing.assert_allclose(exported[0], expected[0], rtol=0, atol=1e-4 * max(1.0, np.abs(expected[0]).max()))
    assert b"fast_ops-" not in output.read_bytes()


# --- input shapes: explicit, and the test protocol's for detectors and segmentors -----------------------------------

@pytest.mark.bad_input("export --shape", "a detector at 1x3x800x1333 (width not a multiple of size_divisor 32)",
                       "exit status 2 naming size_divisor and the nearest sizes (1312, 1344); no file")
def test_detector_shape_off_the_padding_grid_is_refused(tmp_path, capsys):
    from pvt_dense.cli import run_tool as run_with_errors
    status = run_with_errors(export_tool.main, ["--config", DETECTION_CONFIGS[1], "--shape", "1x3x800x1333",
                                                "--output", str(tmp_path / "det.mindir")])
    error = capsys.readouterr().err
    assert status == 2 and "size_divisor 32" in error and "width 1312, 1344" in error
    assert os.listdir(tmp_path) == []


@pytest.mark.bad_input("export --shape", "no --shape (and no --for_image_sizes)",
                       "exit status 2: a graph has one fixed input shape, give it")
def test_shape_is_required(tmp_path, capsys):
    from pvt_dense.cli import run_tool as run_with_errors
    status = run_with_errors(export_tool.main, ["--config", "pvt_v2_b0", "--output", str(tmp_path / "b0")])
    assert status == 2 and "--shape" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_detector_shapes_for_images_are_what_the_test_pipeline_feeds():
    """Each shape is the padded network input `prepare_image` (the evaluation pipeline) makes of such an image."""
    from pvt_dense.detection.config import load_detection_config
    from pvt_dense.detection.transforms import prepare_image
    from pvt_dense.export import detector_shapes_for_images
    cfg = load_detection_config(DETECTION_CONFIGS[1])
    sizes = [(480, 640), (640, 480), (427, 640), (480, 640), (333, 500), (1, 900)]
    expected = set()
    for height, width in sizes:
        chw, _, _ = prepare_image(np.zeros((height, width, 3), np.uint8), np.zeros((0, 4), np.float32),
                                  tuple(cfg.img_scale), size_divisor=cfg.size_divisor)
        expected.add((1, 3) + chw.shape[1:])
    shapes = detector_shapes_for_images(cfg, sizes)
    assert shapes == sorted(expected) and (1, 3, 800, 1088) in shapes and (1, 3, 1088, 800) in shapes


def test_several_shapes_give_one_graph_each_named_after_its_shape(tmp_path, pynative, capsys):
    out = run_tool(["--config", "pvt_v2_b0", "--shape", "1x3x64x64", "1x3x32x96", "--output",
                    str(tmp_path / "b0.mindir"), "--no-verify", "--out_indices", "0", "1"], capsys)
    assert out.count("exported backbone pvt_v2_b0") == 2
    assert sorted(os.listdir(tmp_path)) == ["b0_1x3x32x96.mindir", "b0_1x3x32x96.mindir.json",
                                            "b0_1x3x64x64.mindir", "b0_1x3x64x64.mindir.json"]
    for shape, grid in (((1, 3, 64, 64), (8, 8)), ((1, 3, 32, 96), (4, 12))):
        graph = nn.GraphCell(ms.load(str(tmp_path / f"b0_{'x'.join(map(str, shape))}.mindir")))
        stage2, stage1 = graph(ms.Tensor(np.zeros(shape, np.float32)))[::-1]
        assert stage2.shape == (1, 64) + grid and stage1.shape == (1, 32, 2 * grid[0], 2 * grid[1])


@pytest.mark.bad_input("export --format", "ONNX for a detector or segmentor (their FPN resizes have no ONNX operator "
                       "in MindSpore 2.10)", "ExportError naming MINDIR, before anything is built or written")
def test_onnx_is_refused_for_detectors_and_segmentors(tmp_path):
    from pvt_dense.export import ExportError, export_model
    for config in (DETECTION_CONFIGS[1], SEGMENTATION_CONFIGS[1]):
        with pytest.raises(ExportError, match="export it as MINDIR"):
            export_model(config, tmp_path / "model", shape=(1, 3, 64, 64), file_format="ONNX")
    assert os.listdir(tmp_path) == []
