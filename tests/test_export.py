"""MINDIR export: the exported graph, loaded with mindspore.load + nn.GraphCell, gives the model's outputs.

The reference is the model as users run it (the default fast-kernel path, loaded from the same checkpoint), while
the export is built with MindSpore's own operators, so the test also checks that the two paths agree.
"""
import json
import os
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import pvt_dense
from pvt_dense.export import EXPORT_TASKS, ExportError, export_model, parse_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFICATION_CONFIG = os.path.join(ROOT, "configs", "classification", "pvt_tiny.yaml")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import export as export_tool  # noqa: E402  (tools/ is not a package)


def randomise_norms(net, seed):
    """LayerNorm gains/biases away from 1/0, so the export is checked with every parameter mattering."""
    rng = np.random.default_rng(seed)
    for param in net.get_parameters():
        if param.name.endswith(("gamma", "beta")):
            param.set_data(ms.Tensor(rng.uniform(0.5, 1.5, param.shape).astype(np.float32)))


def outputs_of(cell, pixels):
    outs = cell(ms.Tensor(pixels))
    return [o.asnumpy() for o in (outs if isinstance(outs, (tuple, list)) else (outs,))]


def test_backbone_mindir_equals_eager_model(tmp_path, pynative):
    net = pvt_dense.create_backbone("pvt_tiny")
    randomise_norms(net, 0)
    ckpt = str(tmp_path / "tiny.ckpt")
    ms.save_checkpoint(net, ckpt)
    # verify=False: the comparison below is the check (export_model's own is the same one, run by the tool).
    info = export_model("pvt_tiny", tmp_path / "tiny_backbone", shape=(1, 3, 64, 96), ckpt_path=ckpt, verify=False)
    path = tmp_path / "tiny_backbone.mindir"
    assert info["path"] == str(path) and info["task"] == "backbone"

    reference = pvt_dense.create_backbone("pvt_tiny", pretrained=ckpt)
    reference.set_train(False)
    graph = nn.GraphCell(ms.load(str(path)))
    pixels = np.random.default_rng(5).standard_normal((1, 3, 64, 96)).astype(np.float32)
    expected, exported = outputs_of(reference, pixels), outputs_of(graph, pixels)
    assert [o.shape for o in exported] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 320, 4, 6), (1, 512, 2, 3)]
    for stage, (a, b) in enumerate(zip(exported, expected, strict=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=f"stage {stage + 1}")

    # The graph must run on machines without this one's compiled kernel library.
    assert b"fast_ops-" not in path.read_bytes()
    sidecar = json.loads((tmp_path / "tiny_backbone.mindir.json").read_text())
    assert sidecar["input"]["shape"] == [1, 3, 64, 96]
    assert [o["shape"] for o in sidecar["outputs"]] == [list(o.shape) for o in expected]
    assert sidecar["verified_max_abs_diff"] is None and sidecar["checkpoint"] == os.path.abspath(ckpt)
    assert [f["stride"] for f in sidecar["feature_info"]] == [4, 8, 16, 32]
    assert sorted(os.listdir(tmp_path)) == ["tiny.ckpt", "tiny_backbone.mindir", "tiny_backbone.mindir.json"]


def test_classifier_from_a_config_file_through_the_tool(tmp_path, pynative, capsys):
    net = pvt_dense.create_model("pvt_tiny", num_classes=7)
    randomise_norms(net, 1)
    ckpt = str(tmp_path / "clf.ckpt")
    ms.save_checkpoint(net, ckpt)
    output = tmp_path / "clf.mindir"
    # --no-verify: this test compares the exported graph itself
    status = export_tool.main(["--config", CLASSIFICATION_CONFIG, "--ckpt_path", ckpt, "--shape", "2x3x64x64",
                               "--output", str(output), "--num_classes", "7", "--no-verify"])
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the tool switches to graph mode
    assert status == 0 and "exported classifier pvt_tiny" in capsys.readouterr().out
    reference = pvt_dense.create_model("pvt_tiny", num_classes=7, pretrained=ckpt)
    reference.set_train(False)
    pixels = np.random.default_rng(6).standard_normal((2, 3, 64, 64)).astype(np.float32)
    (logits,) = outputs_of(nn.GraphCell(ms.load(str(output))), pixels)
    assert logits.shape == (2, 7)
    np.testing.assert_allclose(logits, outputs_of(reference, pixels)[0], rtol=0, atol=1e-4)


def test_backbone_onnx_equals_eager_model_in_onnxruntime(tmp_path, pynative):
    onnxruntime = pytest.importorskip("onnxruntime")
    # Stages 1-2 only: the graph compile dominates this test's time, and the substitutes are the same in every stage.
    net = pvt_dense.create_backbone("pvt_tiny", out_indices=(0, 1))
    randomise_norms(net, 2)
    ckpt = str(tmp_path / "tiny.ckpt")
    ms.save_checkpoint(net, ckpt)
    # 64x96 is not the 224 pretraining grid: every stage's position embedding is resized, which the ONNX graph
    # holds as a constant; GELU is the polynomial substitute.
    # With verify (the tool's default): the exact MindSpore-op model against onnxruntime before the file is kept.
    info = export_model("pvt_tiny", tmp_path / "tiny.onnx", shape=(1, 3, 64, 96), ckpt_path=ckpt,
                        file_format="ONNX", overrides=["--out_indices", "0", "1"])
    assert info["verified_max_abs_diff"] <= 1e-4
    reference = pvt_dense.create_backbone("pvt_tiny", out_indices=(0, 1), pretrained=ckpt)
    reference.set_train(False)
    pixels = 3 * np.random.default_rng(7).standard_normal((1, 3, 64, 96)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: pixels})
    for stage, (a, b) in enumerate(zip(exported, outputs_of(reference, pixels), strict=True)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=f"stage {stage + 1}")


def test_polynomial_gelu_is_exact_gelu(pynative):
    from math import erf, sqrt

    from pvt_dense.export import PolynomialGELU
    x = np.concatenate([np.linspace(-12, 12, 20001), [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0]]).astype(np.float32)
    expected = np.array([0.5 * v * (1.0 + erf(v / sqrt(2.0))) for v in x.astype(np.float64)])
    error = np.abs(PolynomialGELU()(ms.Tensor(x)).asnumpy() - expected)
    assert error.max() < 2e-6


def test_task_table_and_shape_parsing():
    assert set(EXPORT_TASKS) >= {"backbone", "classifier"}
    assert parse_shape("1x3x800x1344") == (1, 3, 800, 1344)
    for bad in ("1x3x800", "1x4x64x64", "1x3x0x64", "axbxcxd"):
        with pytest.raises(ExportError):
            parse_shape(bad)


@pytest.mark.bad_input("export --shape", "1x3x800 (three numbers)", "exit status 2, error naming --shape, no file")
def test_tool_refuses_a_bad_shape(tmp_path, capsys):
    from pvt_dense.cli import run_tool
    status = run_tool(export_tool.main, ["--config", "pvt_tiny", "--shape", "1x3x800", "--output", str(tmp_path / "x")])
    assert status == 2 and "--shape" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.bad_input("export --config", "a YAML file that no export task accepts", "ExportError naming each task")
def test_unexportable_config_is_refused(tmp_path):
    config = tmp_path / "other.yaml"
    config.write_text("learning_rate_typo: 3\n")
    with pytest.raises(ExportError, match="classifier") as err:
        export_model(str(config), tmp_path / "out", shape=(1, 3, 64, 64))
    assert "backbone" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["other.yaml"]


@pytest.mark.bad_input("export image size", "1x3x16x16 (smaller than one stride-32 cell)",
                       "ExportError before anything is written")
def test_too_small_shape_is_refused_before_writing(tmp_path, pynative):
    with pytest.raises(ExportError, match="16x16"):
        export_model("pvt_tiny", tmp_path / "tiny", shape=(1, 3, 16, 16))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("config, task, model", [
    ("configs/detection/retinanet_pvt_large_fpn_1x_coco.yaml", "detector", "pvt_large"),
    ("configs/segmentation/semfpn_pvt_small_ade20k_40k.yaml", "segmentor", "pvt_small"),
    ("configs/classification/pvt_medium.yaml", "classifier", "pvt_medium"),
])
def test_config_files_pick_their_task(config, task, model):
    from pvt_dense.export import resolve_task
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    chosen, loaded = resolve_task(os.path.join(root, config))
    assert chosen == task
    assert (loaded.get("model") or loaded.get("backbone")) == model


# --- PVT v2 ---------------------------------------------------------------------------------------------------------

def test_v2_backbone_mindir_equals_eager_model(tmp_path, pynative):
    net = pvt_dense.create_backbone("pvt_v2_b0")
    randomise_norms(net, 3)
    ckpt = str(tmp_path / "b0.ckpt")
    ms.save_checkpoint(net, ckpt)
    # 65x97: v2's overlapping embeddings round every stage up (ceil), unlike v1
    info = export_model("pvt_v2_b0", tmp_path / "b0_backbone", shape=(1, 3, 65, 97), ckpt_path=ckpt, verify=False)
    assert info["task"] == "backbone" and info["model"] == "pvt_v2_b0"
    reference = pvt_dense.create_backbone("pvt_v2_b0", pretrained=ckpt)
    reference.set_train(False)
    pixels = np.random.default_rng(8).standard_normal((1, 3, 65, 97)).astype(np.float32)
    exported = outputs_of(nn.GraphCell(ms.load(info["path"])), pixels)
    assert [o.shape for o in exported] == [(1, 32, 17, 25), (1, 64, 9, 13), (1, 160, 5, 7), (1, 256, 3, 4)]
    for stage, (a, b) in enumerate(zip(exported, outputs_of(reference, pixels), strict=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=f"stage {stage + 1}")
    assert b"fast_ops-" not in open(info["path"], "rb").read()


def test_v2_classifier_from_its_config_file_through_the_tool(tmp_path, pynative, capsys):
    net = pvt_dense.create_model("pvt_v2_b0", num_classes=7)
    randomise_norms(net, 4)
    ckpt = str(tmp_path / "clf.ckpt")
    ms.save_checkpoint(net, ckpt)
    output = tmp_path / "clf.mindir"
    config = os.path.join(ROOT, "configs", "classification", "pvt_v2_b0.yaml")
    status = export_tool.main(["--config", config, "--ckpt_path", ckpt, "--shape", "2x3x64x64", "--output",
                               str(output), "--num_classes", "7", "--no-verify"])
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the tool switches to graph mode
    assert status == 0 and "exported classifier pvt_v2_b0" in capsys.readouterr().out
    reference = pvt_dense.create_model("pvt_v2_b0", num_classes=7, pretrained=ckpt)
    reference.set_train(False)
    pixels = np.random.default_rng(9).standard_normal((2, 3, 64, 64)).astype(np.float32)
    (logits,) = outputs_of(nn.GraphCell(ms.load(str(output))), pixels)
    assert logits.shape == (2, 7)
    np.testing.assert_allclose(logits, outputs_of(reference, pixels)[0], rtol=0, atol=1e-4)


def test_v2_linear_attention_backbone_onnx_equals_eager_model_in_onnxruntime(tmp_path, pynative):
    """b2_li: its 7x7 adaptive pooling (no ONNX operator in MindSpore 2.10) becomes constant matmuls for the
    fixed grid; 64x96 gives 16x24 and 8x12 grids, bins of unequal size."""
    onnxruntime = pytest.importorskip("onnxruntime")
    net = pvt_dense.create_backbone("pvt_v2_b2_li", out_indices=(0, 1))
    randomise_norms(net, 5)
    ckpt = str(tmp_path / "b2_li.ckpt")
    ms.save_checkpoint(net, ckpt)
    info = export_model("pvt_v2_b2_li", tmp_path / "b2_li.onnx", shape=(1, 3, 64, 96), ckpt_path=ckpt,
                        file_format="ONNX", overrides=["--out_indices", "0", "1"])
    assert info["verified_max_abs_diff"] <= 1e-4
    reference = pvt_dense.create_backbone("pvt_v2_b2_li", out_indices=(0, 1), pretrained=ckpt)
    reference.set_train(False)
    pixels = 3 * np.random.default_rng(10).standard_normal((1, 3, 64, 96)).astype(np.float32)
    session = onnxruntime.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: pixels})
    for stage, (a, b) in enumerate(zip(exported, outputs_of(reference, pixels), strict=True)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=f"stage {stage + 1}")


@pytest.mark.parametrize("grid", [(16, 24), (9, 13), (7, 7), (2, 3)])
def test_fixed_grid_pool_is_torchs_adaptive_average_pool(grid, pynative):
    torch = pytest.importorskip("torch")
    from pvt_dense.export import FixedGridAveragePool
    x = np.random.default_rng(11).standard_normal((2, 3, *grid)).astype(np.float32)
    expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), 7).numpy()
    np.testing.assert_allclose(FixedGridAveragePool(grid, 7)(ms.Tensor(x)).asnumpy(), expected, rtol=0, atol=1e-6)
