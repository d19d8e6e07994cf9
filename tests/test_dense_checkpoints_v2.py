"""Whole RetinaNet checkpoints with mmdetection's PVT v2 backbone (the layout of mmdetection's published
RetinaNet-PVTv2 files) load into our RetinaNet on `pvt_v2_b0` and compute what mmdetection 3.3 computes; likewise a
Semantic FPN that mmsegmentation 1.2 builds on that backbone.

The reference is mmdetection 3.3's RetinaNet on its `PyramidVisionTransformerV2` (b0: embed_dims 32, two layers per
stage, as mmdetection's configs/pvt/retinanet_pvtv2-b0_fpn_1x_coco.py builds it), FPN and head narrowed as in
test_dense_checkpoints.py, every parameter and BatchNorm statistic perturbed (that file's `_randomise`), saved with
torch.save the way mmdetection 3.x's runner does, and once more in the official v2 release layout (whai362/PVT
branch v2: `patch_embed{i}`, `block{i}.{j}` with `attn.q`/`attn.kv` and `mlp.dwconv.dwconv`, `norm{i}`), whose
names are checked to give back exactly mmdetection's state through mmdetection's own `pvt_convert`. Our model is
built from configs/detection/retinanet_pvt_v2_b0_fpn_1x_coco.yaml with the narrow widths as overrides. mmdetection's PVT v2 uses LayerNorm eps
1e-6 in every norm (`norm_cfg=dict(type='LN', eps=1e-6)`), so its file must select the 'mmdet' eps style; the
official v2 code uses 1e-5 in the patch-embedding and spatial-reduction norms ('official', its reference is
mmdetection's model with those two eps set so). Those norms see inputs where the two eps differ visibly.
"""
import copy
import json
import os
import re
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from test_dense_checkpoints import HEAD_CHANNELS, MEAN, NECK_CHANNELS, SEG_HEAD_CHANNELS, STACKED_CONVS, STD, \
    TOLERANCE, _max_diff, _randomise, _retinanet_config, _save

from pvt_dense.checkpoint import read_whole_model_info
from pvt_dense.checkpoint.whole_model import MMLAB_MMDET_PVT_V2, MMLAB_OFFICIAL_PVT
from pvt_dense.errors import CheckpointError

torch = pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "detection", "retinanet_pvt_v2_b0_fpn_1x_coco.yaml")
SEG_CONFIG = os.path.join(REPO, "configs", "segmentation", "semfpn_pvt_v2_b0_ade20k_40k.yaml")
SEG_CLASSES = 5
B0_CHANNELS = [32, 64, 160, 256]
# A padded size whose grids are odd at strides 32, 64 and 128 (5x7, 3x4, 2x2).
SHAPE = (1, 3, 160, 224)
NARROW = [("neck_channels", NECK_CHANNELS), ("head_channels", HEAD_CHANNELS),
          ("head_stacked_convs", STACKED_CONVS), ("pretrained", "")]


def _retinanet_v2_config(num_classes):
    return _retinanet_config(num_classes, backbone=dict(type="PyramidVisionTransformerV2", embed_dims=32,
                                                        num_layers=[2, 2, 2, 2]), in_channels=B0_CHANNELS)


def _official_v2_state(mm_model):
    """mmdetection's state with the backbone in the official v2 names, checked through mmdet 3.3's `pvt_convert`."""
    from mmdet.models.backbones.pvt import pvt_convert
    state = {k: v.numpy().copy() for k, v in mm_model.state_dict().items()}
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    official = {}
    for key, value in backbone.items():
        stage = int(key.split(".")[1])
        block = re.match(r"^layers\.\d+\.1\.(\d+)\.(.+)$", key)
        if block is None:
            name = re.sub(r"^layers\.\d+\.0\.projection\.", f"patch_embed{stage + 1}.proj.", key)
            name = re.sub(r"^layers\.\d+\.0\.norm\.", f"patch_embed{stage + 1}.norm.", name)
            official[re.sub(r"^layers\.\d+\.2\.", f"norm{stage + 1}.", name)] = value
            continue
        prefix, rest = f"block{stage + 1}.{block.group(1)}.", block.group(2)
        if rest.startswith("attn.attn.in_proj_"):
            leaf, dim = rest.rsplit("_", 1)[1], value.shape[0] // 3
            official[prefix + f"attn.q.{leaf}"], official[prefix + f"attn.kv.{leaf}"] = value[:dim], value[dim:]
            continue
        ffn = {"ffn.layers.0.": "mlp.fc1.", "ffn.layers.1.": "mlp.dwconv.dwconv.", "ffn.layers.4.": "mlp.fc2.",
               "attn.attn.out_proj.": "attn.proj."}
        head = next((k for k in ffn if rest.startswith(k)), None)
        if head is None:
            official[prefix + rest] = value
            continue
        if head != "ffn.layers.1." and rest.endswith("weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> Linear
        official[prefix + ffn[head] + rest[len(head):]] = value
    back = pvt_convert({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in official.items()})
    assert sorted(back) == sorted(backbone)
    for key, value in back.items():
        np.testing.assert_array_equal(value.numpy().reshape(backbone[key].shape), backbone[key], err_msg=key)
    out = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    out.update({"backbone." + k: v for k, v in official.items()})
    return out


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory):
    from mmlab_reference import require_mmdet
    require_mmdet()
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict
    classes = ("ant", "bee", "cow")
    model = _randomise(MODELS.build(ConfigDict(_retinanet_v2_config(len(classes)))), 3)
    folder = tmp_path_factory.mktemp("dense_v2")
    path = _save(folder / "retinanet_pvtv2-b0_fpn_1x_coco.pth", model.state_dict(),
                 {"dataset_meta": {"classes": classes}, "mmengine_version": "0.10.7", "epoch": 12})
    official = _save(folder / "retinanet_pvt_v2_b0_official.pth", _official_v2_state(model),
                     {"CLASSES": classes, "mmdet_version": "2.13.0", "epoch": 12})
    return {"model": model, "path": path, "official": official, "classes": list(classes)}


def _reference(mm_model, x, eps=None):
    model = copy.deepcopy(mm_model)
    if eps is not None:  # the official code's eps in the patch-embedding and spatial-reduction norms
        for stage in model.backbone.layers:
            stage[0].norm.eps = eps
            for layer in stage[1]:
                if hasattr(layer.attn, "norm"):
                    layer.attn.norm.eps = eps
    with torch.no_grad():
        cls_scores, bbox_preds = model(torch.from_numpy(x), mode="tensor")
    return [t.numpy() for t in list(cls_scores) + list(bbox_preds)]


def test_mmdet_pvt_v2_file_is_recognised(v2_file):
    info = read_whole_model_info(v2_file["path"])
    assert (info.source_format, info.task, info.norm_eps_style, info.model_name, info.num_classes) == (
        MMLAB_MMDET_PVT_V2, "detector", "mmdet", "pvt_v2_b0", 3)
    assert info.class_names == v2_file["classes"] and info.framework == "mmdet 3.x"
    official = read_whole_model_info(v2_file["official"])
    assert (official.source_format, official.norm_eps_style, official.model_name) == (
        MMLAB_OFFICIAL_PVT, "official", "pvt_v2_b0")


@pytest.mark.parametrize("layout", ["path", "official"])
def test_retinanet_pvt_v2_checkpoint_matches_mmdet(v2_file, layout):
    from pvt_dense.detection.config import load_detection_config
    from pvt_dense.detection.build import load_detector_with_report
    official = layout == "official"
    cfg = load_detection_config(CONFIG, [("mode", 1), ("num_classes", 3)] + NARROW)
    detector, report = load_detector_with_report(cfg, v2_file[layout])
    assert report.source_format == (MMLAB_OFFICIAL_PVT if official else MMLAB_MMDET_PVT_V2)
    assert report.norm_eps_style == ("official" if official else "mmdet")
    assert report.class_names == v2_file["classes"]
    assert report.mapped["neck"] == 16 and report.mapped["head"] == 12
    x = np.random.default_rng(5).normal(size=SHAPE).astype(np.float32)
    reference = _reference(v2_file["model"], x, eps=1e-5 if official else None)
    assert max(abs(r).max() for r in reference) > 0.1  # the comparison below is not of near-zero maps
    ours = [o.asnumpy() for o in detector(ms.Tensor(x))]
    assert _max_diff(ours, reference) <= TOLERANCE
    other = _reference(v2_file["model"], x, eps=None if official else 1e-5)
    assert _max_diff(ours, other) > 100 * TOLERANCE  # the eps matters


@pytest.mark.bad_input("dense checkpoint", "an OpenMMLab file with an integer weight tensor",
                       "CheckpointError naming the tensor and its dtype")
def test_integer_weights_in_a_dense_file_are_refused(v2_file, tmp_path):
    from pvt_dense.checkpoint.torch_reader import read_torch_checkpoint
    top = read_torch_checkpoint(v2_file["path"])
    state = dict(top["state_dict"])
    state["neck.lateral_convs.0.conv.weight"] = state["neck.lateral_convs.0.conv.weight"].astype(np.int32)
    path = _save(tmp_path / "int_weight.pth", state, top["meta"])
    with pytest.raises(CheckpointError, match=r"neck\.lateral_convs\.0\.conv\.weight.*int32"):
        read_whole_model_info(path)


@pytest.mark.bad_input("dense checkpoint", "a PVT v2 RetinaNet file loaded with a PVT v1 config",
                       "CheckpointError listing the misfit keys and naming the file's size (set backbone: ...)")
def test_a_file_of_another_size_names_its_size(v2_file):
    from pvt_dense.detection.config import load_detection_config
    from pvt_dense.detection.build import load_detector_with_report
    cfg = load_detection_config(None, [("mode", 1), ("num_classes", 3), ("backbone", "pvt_tiny")] + NARROW)
    with pytest.raises(CheckpointError, match="set backbone: pvt_v2_b0"):
        load_detector_with_report(cfg, v2_file["path"])


def test_convert_tool_writes_a_native_v2_detector(v2_file, tmp_path):
    """tools/convert_weights.py on the mmdetection file (size and class count from the weights, the narrow widths
    from a config), then the detection loader on its output: mmdetection's outputs again."""
    from pvt_dense.detection.config import load_detection_config
    from pvt_dense.detection.build import load_detector_with_report
    dst = tmp_path / "retinanet_pvt_v2_b0.ckpt"
    config = tmp_path / "narrow.yaml"
    config.write_text("".join(f"{key}: {value!r}\n" for key, value in NARROW) + "num_classes: 3\nbackbone: pvt_v2_b0\n")
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weights.py"), v2_file["path"],
                             str(dst), "--config", str(config)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    info = read_whole_model_info(dst)
    assert (info.source_format, info.task, info.norm_eps_style) == ("native", "detector", "mmdet")
    cfg = load_detection_config(None, [("mode", 1), ("num_classes", 3), ("backbone", "pvt_v2_b0")] + NARROW)
    detector, report = load_detector_with_report(cfg, str(dst))
    assert report.class_names == v2_file["classes"]
    x = np.random.default_rng(6).normal(size=SHAPE).astype(np.float32)
    assert _max_diff([o.asnumpy() for o in detector(ms.Tensor(x))], _reference(v2_file["model"], x)) <= TOLERANCE


@pytest.mark.slow
def test_infer_det_command_line_on_an_mmdet_pvt_v2_checkpoint(v2_file, tmp_path):
    """tools/infer_det.py with the v2 config and the mmdetection file: the detections of mmdetection's
    `test_step` on the same image (its pipeline and `predict(rescale=True)`), up to detections.json's rounding."""
    import cv2
    from mmengine.dataset import Compose
    rng = np.random.default_rng(11)
    image = cv2.GaussianBlur(rng.integers(0, 256, (150, 230, 3), dtype=np.uint8), (5, 5), 0)
    folder = tmp_path / "images"
    folder.mkdir()
    path = str(folder / "scene.png")
    cv2.imwrite(path, image)
    img_scale = (320, 192)
    pipeline = Compose([dict(type="LoadImageFromFile"), dict(type="Resize", scale=img_scale, keep_ratio=True),
                        dict(type="PackDetInputs")])
    packed = pipeline(dict(img_path=path, img_id=0))
    with torch.no_grad():
        expected = v2_file["model"].test_step({"inputs": [packed["inputs"]],
                                               "data_samples": [packed["data_samples"]]})[0].pred_instances
    out = tmp_path / "drawn"
    command = [sys.executable, os.path.join(REPO, "tools", "infer_det.py"), "--config", CONFIG,
               "--ckpt_path", v2_file["path"], "--input", str(folder), "--output", str(out), "--num_classes", "3",
               "--img_scale", str(list(img_scale)), "--progress_bar", "False"]
    for key, value in NARROW:
        command += [f"--{key}", str(value)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "forward: " in run.stdout
    with open(out / "detections.json") as handle:
        results = json.load(handle)
    ours, names = results["images"]["scene.png"]["detections"], [c["name"] for c in results["classes"]]
    assert 0 < len(ours) == len(expected.scores)
    assert [names[d["label"]] for d in ours] == [v2_file["classes"][k] for k in expected.labels.tolist()]
    np.testing.assert_allclose([d["score"] for d in ours], expected.scores.numpy(), atol=1e-5)
    np.testing.assert_allclose([d["bbox_xyxy"] for d in ours], expected.bboxes.numpy(), atol=6e-3, rtol=1e-5)


@pytest.fixture(scope="module")
def v2_segmentor_file(tmp_path_factory):
    """mmsegmentation 1.2's EncoderDecoder + FPN + FPNHead on mmdetection's PyramidVisionTransformerV2 b0, saved by
    torch.save in mmseg 1.x's layout."""
    from mmlab_reference import require_mmdet, require_mmseg
    require_mmdet()
    require_mmseg()
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS
    model = _randomise(MODELS.build(ConfigDict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=MEAN, std=STD, bgr_to_rgb=True, size_divisor=32),
        backbone=dict(type="mmdet.PyramidVisionTransformerV2", embed_dims=32, num_layers=[2, 2, 2, 2]),
        neck=dict(type="FPN", in_channels=B0_CHANNELS, out_channels=NECK_CHANNELS, num_outs=4),
        decode_head=dict(type="FPNHead", in_channels=[NECK_CHANNELS] * 4, in_index=[0, 1, 2, 3],
                         feature_strides=[4, 8, 16, 32], channels=SEG_HEAD_CHANNELS, dropout_ratio=0.1,
                         num_classes=SEG_CLASSES, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode="whole"))), 4)
    names = [f"class {i}" for i in range(SEG_CLASSES)]
    path = _save(tmp_path_factory.mktemp("dense_v2_seg") / "semfpn_pvtv2_b0.pth", model.state_dict(),
                 {"dataset_meta": {"classes": names}, "mmengine_version": "0.10.7"})
    return {"model": model, "path": path, "classes": names}


def test_semantic_fpn_pvt_v2_checkpoint_matches_mmseg(v2_segmentor_file):
    from pvt_dense.segmentation.build import load_trained_segmentor_with_report
    from pvt_dense.segmentation.config import load_segmentation_config
    cfg = load_segmentation_config(SEG_CONFIG, [("mode", 1), ("pretrained", ""), ("num_classes", SEG_CLASSES),
                                                ("neck_channels", NECK_CHANNELS),
                                                ("head_channels", SEG_HEAD_CHANNELS)])
    net, report = load_trained_segmentor_with_report(cfg, v2_segmentor_file["path"])
    assert report.source_format == MMLAB_MMDET_PVT_V2 and report.norm_eps_style == "mmdet"
    assert report.class_names == v2_segmentor_file["classes"]
    x = np.random.default_rng(7).normal(size=SHAPE).astype(np.float32)
    with torch.no_grad():
        reference = v2_segmentor_file["model"](torch.from_numpy(x), mode="tensor").numpy()
    assert abs(reference).max() > 0.1
    assert _max_diff([net(ms.Tensor(x)).asnumpy()], [reference]) <= TOLERANCE
