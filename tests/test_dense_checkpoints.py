"""Whole RetinaNet / Semantic FPN checkpoints from OpenMMLab load into our models and compute what mmdetection /
mmsegmentation compute: PVT v1 (PVT-Tiny) first, then PVT v2 (b0, its own section below).

The references are mmdetection 3.3's RetinaNet and mmsegmentation 1.2's EncoderDecoder + FPNHead on mmdetection's
own PyramidVisionTransformer (PVT-Tiny), with random non-trivial weights (every parameter and BatchNorm statistic
perturbed, biases non-zero). Each is saved with torch.save the way the frameworks' runners do:

* mmdetection 3.x / mmsegmentation 1.x: `{"meta": {"dataset_meta": {"classes": ...}}, "state_dict": ...}` with the
  backbone in mmdetection's PVT names;
* the official PVT releases (mmdetection 2.x / mmsegmentation 0.x): `{"meta": {"CLASSES": ...}, "state_dict": ...}`
  with the backbone in the official PVT names. Those names are made by `mmdet_pvt_to_official` (the function under
  test) and checked to give back exactly the mmdetection state through mmdetection's own `pvt_convert`; the stage-4
  position embedding carries the official detection code's cls slot, which `pvt_convert` drops. The official code
  is mmdetection's PVT with LayerNorm eps 1e-5 in the patch-embedding and spatial-reduction norms, so its
  reference is the same mmdetection model with those two eps set so.

A wrong key mapping, a transposed split of the in-projection or a wrong eps would change the outputs, which are
compared with the frameworks' forward passes at 1e-4.
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

from pvt_dense.checkpoint import load_whole_model, read_whole_model_info
from pvt_dense.checkpoint.keymaps_mmdet import mmdet_pvt_to_official
from pvt_dense.checkpoint.whole_model import MMLAB_MMDET_PVT, MMLAB_MMDET_PVT_V2, MMLAB_OFFICIAL_PVT
from pvt_dense.errors import CheckpointError, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
# Padded batches as the pipelines make them: multiples of 32, the second with odd grids at strides 32 to 128.
SHAPES = ((1, 3, 128, 192), (1, 3, 160, 224))
# The official recipes' structure at reduced widths (256-channel FPN and head convs run minutes in PyNative on a
# shared 2-core CPU); every key family of the release files is still there: stacked convs, extra P6/P7 convs, BN.
NECK_CHANNELS, HEAD_CHANNELS, STACKED_CONVS, SEG_HEAD_CHANNELS = 64, 64, 2, 32
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
SEG_CLASSES = 150

torch = pytest.importorskip("torch")


def _retinanet_config(num_classes, backbone=None, in_channels=(64, 128, 320, 512)):
    """mmdetection's RetinaNet dict; by default on mmdet's PVT-Tiny."""
    return dict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_size_divisor=32),
        backbone=backbone or dict(type="PyramidVisionTransformer", num_layers=[2, 2, 2, 2]),
        neck=dict(type="FPN", in_channels=list(in_channels), out_channels=NECK_CHANNELS, start_level=1,
                  add_extra_convs="on_input", num_outs=5),
        bbox_head=dict(type="RetinaHead", num_classes=num_classes, in_channels=NECK_CHANNELS,
                       stacked_convs=STACKED_CONVS, feat_channels=HEAD_CHANNELS,
                       anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                                             ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
                       bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                       loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
                       loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=100))


def _semantic_fpn_config(num_classes):
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=MEAN, std=STD, bgr_to_rgb=True, size_divisor=32),
        backbone=dict(type="mmdet.PyramidVisionTransformer", num_layers=[2, 2, 2, 2]),
        neck=dict(type="FPN", in_channels=[64, 128, 320, 512], out_channels=NECK_CHANNELS, num_outs=4),
        decode_head=dict(type="FPNHead", in_channels=[NECK_CHANNELS] * 4, in_index=[0, 1, 2, 3],
                         feature_strides=[4, 8, 16, 32], channels=SEG_HEAD_CHANNELS, dropout_ratio=0.1,
                         num_classes=num_classes,
                         norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode="whole"))


def _randomise(module, seed):
    """Every parameter and BatchNorm statistic moved off its initial value; biases and norm shifts non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("running_mean"):
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("pos_embed"):
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator))
            elif tensor.ndim == 1 and "norm" in name or ".bn." in name:
                base = 1.0 if name.endswith("weight") else 0.0
                tensor.copy_(base + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            else:
                fan_in = max(1, tensor[0].numel())
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5)
            if ".0.projection." in name or ".attn.sr." in name:
                # Inputs of the patch-embedding and spatial-reduction norms of variance ~1e-5, where LayerNorm eps
                # 1e-5 and 1e-6 give visibly different outputs: the eps convention is tested, not just the keys.
                tensor.mul_(0.003)
    module.eval()
    return module


def _use_official_eps(mm_model):
    """mmdetection's PVT with the official code's eps (1e-5) in the patch-embedding and spatial-reduction norms."""
    for stage in mm_model.backbone.layers:
        stage[0].norm.eps = 1e-5
        for layer in stage[1][1:]:
            if hasattr(layer.attn, "norm"):
                layer.attn.norm.eps = 1e-5


def _official_state(mm_model):
    """The state in the official release layout; checked against mmdetection's own `pvt_convert`."""
    from mmdet.models.backbones.pvt import pvt_convert
    state = {k: v.numpy().copy() for k, v in mm_model.state_dict().items()}
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    official = mmdet_pvt_to_official(backbone)
    cls_slot = np.random.default_rng(0).normal(size=(1, 1, official["pos_embed4"].shape[2])).astype(np.float32)
    official["pos_embed4"] = np.concatenate([cls_slot, official["pos_embed4"]], axis=1)  # 1 + 7 * 7
    back = pvt_convert({k: torch.from_numpy(v) for k, v in official.items()})
    assert sorted(back) == sorted(backbone)
    for key, value in back.items():
        np.testing.assert_array_equal(value.numpy(), backbone[key], err_msg=key)
    out = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    out.update({"backbone." + k: v for k, v in official.items()})
    return out


def _save(path, state, meta):
    torch.save({"meta": meta, "state_dict": {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v
                                             for k, v in state.items()}}, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Both references and their checkpoint files, built once for the module."""
    from mmlab_reference import require_mmdet, require_mmseg
    require_mmdet()
    from mmdet.datasets.coco import CocoDataset
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.config import ConfigDict
    folder = tmp_path_factory.mktemp("dense_ckpts")
    coco = list(CocoDataset.METAINFO["classes"])
    det = _randomise(DET_MODELS.build(ConfigDict(_retinanet_config(len(coco)))), 1)
    require_mmseg()  # mmseg becomes the default registry scope from here on
    from mmseg.registry import MODELS as SEG_MODELS
    seg = _randomise(SEG_MODELS.build(ConfigDict(_semantic_fpn_config(SEG_CLASSES))), 2)
    seg_names = [f"class {i}" for i in range(SEG_CLASSES)]
    out = {"det": det, "seg": seg, "coco": coco, "seg_names": seg_names}
    out["det_mmdet3"] = _save(folder / "retinanet_mmdet3.pth", det.state_dict(),
                              {"dataset_meta": {"classes": tuple(coco)}, "mmengine_version": "0.10.7", "epoch": 12,
                               "iter": 3, "seed": 0, "experiment_name": "retinanet_pvt"})
    out["seg_mmseg1"] = _save(folder / "semfpn_mmseg1.pth", seg.state_dict(), {"mmengine_version": "0.10.7"})
    out["det_official"] = _save(folder / "retinanet_pvt_t_fpn_1x_coco.pth", _official_state(det),
                                {"CLASSES": tuple(coco), "mmdet_version": "2.13.0", "epoch": 12, "iter": 87960,
                                 "config": "model = dict(type='RetinaNet')", "env_info": "sys.platform: linux"})
    out["seg_official"] = _save(folder / "fpn_pvt_t_ade20k.pth", _official_state(seg),
                                {"CLASSES": seg_names, "PALETTE": [[i, i, i] for i in range(SEG_CLASSES)],
                                 "mmseg_version": "0.13.0", "iter": 80000})
    out["folder"] = folder
    return out


def _inputs():
    rng = np.random.default_rng(5)
    return [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]


def _det_reference(mm_model, x, official_eps):
    import copy
    model = copy.deepcopy(mm_model)
    if official_eps:
        _use_official_eps(model)
    with torch.no_grad():
        cls_scores, bbox_preds = model(torch.from_numpy(x), mode="tensor")
    return [t.numpy() for t in list(cls_scores) + list(bbox_preds)]


def _seg_reference(mm_model, x, official_eps):
    import copy
    model = copy.deepcopy(mm_model)
    if official_eps:
        _use_official_eps(model)
    with torch.no_grad():
        return model(torch.from_numpy(x), mode="tensor").numpy()


def _detection_cfg(**overrides):
    from pvt_dense.detection.config import load_detection_config
    widths = [("neck_channels", NECK_CHANNELS), ("head_channels", HEAD_CHANNELS),
              ("head_stacked_convs", STACKED_CONVS)]
    return load_detection_config(None, [("mode", 1), ("pretrained", "")] + widths + list(overrides.items()))


def _segmentation_cfg(**overrides):
    from pvt_dense.segmentation.config import load_segmentation_config
    widths = [("neck_channels", NECK_CHANNELS), ("head_channels", SEG_HEAD_CHANNELS)]
    return load_segmentation_config(None, [("mode", 1), ("pretrained", "")] + widths + list(overrides.items()))


def _max_diff(ours, reference):
    assert len(ours) == len(reference)
    diffs = []
    for a, b in zip(ours, reference, strict=True):
        assert tuple(a.shape) == tuple(b.shape)
        diffs.append(float(np.abs(a - b).max()))
    return max(diffs)


def _run_detector(detector, x):
    return [o.asnumpy() for o in detector(ms.Tensor(x))]


def _retinanet_case(request, model):
    """What the RetinaNet comparison needs for `model`'s files: the reference, its files by layout, the config that
    builds our detector, the report expected of each file, the inputs and the reference's forward(model, x,
    official_eps)."""
    if model == "pvt_tiny":
        files = request.getfixturevalue("files")
        return dict(model=files["det"], files={"mmdet": files["det_mmdet3"], "official": files["det_official"]},
                    mmdet_format=MMLAB_MMDET_PVT, classes=files["coco"], cfg=_detection_cfg(),
                    mapped={"backbone": 156, "neck": 16, "head": 12}, cls_slot=True, inputs=_inputs(),
                    reference=_det_reference)
    from pvt_dense.detection.config import load_detection_config
    v2 = request.getfixturevalue("v2_file")
    return dict(model=v2["model"], files={"mmdet": v2["path"], "official": v2["official"]},
                mmdet_format=MMLAB_MMDET_PVT_V2, classes=v2["classes"],
                cfg=load_detection_config(V2_DET_CONFIG, [("mode", 1), ("num_classes", 3)] + V2_NARROW),
                mapped={"neck": 16, "head": 12}, cls_slot=False,  # PVT v2 has no position embedding
                inputs=[np.random.default_rng(5).normal(size=V2_SHAPE).astype(np.float32)],
                reference=lambda mm_model, x, official: _v2_reference(mm_model, x, eps=1e-5 if official else None))


@pytest.mark.parametrize("layout", ["mmdet", "official"])
@pytest.mark.parametrize("model", ["pvt_tiny", "pvt_v2_b0"])
def test_retinanet_checkpoint_matches_mmdet(request, model, layout):
    from pvt_dense.detection.build import load_detector_with_report
    case = _retinanet_case(request, model)
    official = layout == "official"
    detector, report = load_detector_with_report(case["cfg"], case["files"][layout])
    assert report.source_format == (MMLAB_OFFICIAL_PVT if official else case["mmdet_format"])
    assert report.norm_eps_style == ("official" if official else "mmdet")
    assert report.class_names == case["classes"]
    assert {part: report.mapped[part] for part in case["mapped"]} == case["mapped"]
    if case["mapped"].keys() == {"backbone", "neck", "head"}:
        assert report.mapped == case["mapped"]
    cls_slot_note = any("cls slot of backbone.stages.3.pos_embed" in note for note in report.notes)
    assert cls_slot_note == (official and case["cls_slot"])
    for x in case["inputs"]:
        reference = case["reference"](case["model"], x, official)
        assert max(abs(r).max() for r in reference) > 0.1  # the comparison below is not of near-zero maps
        ours = _run_detector(detector, x)
        assert _max_diff(ours, reference) <= TOLERANCE
        assert _max_diff(ours, case["reference"](case["model"], x, not official)) > 100 * TOLERANCE  # eps matters


def _semantic_fpn_case(request, model, layout):
    """What the Semantic FPN comparison needs for one file: our segmentor's config, the file, the report expected of
    it (attributes, a note it must carry), the inputs, the reference's forward(x, official_eps) and whether the
    other eps is checked to differ."""
    if model == "pvt_tiny":
        from pvt_dense.segmentation.ade20k import ADE20K_CLASSES
        files = request.getfixturevalue("files")
        official = layout == "official"
        return dict(cfg=_segmentation_cfg(), file=files["seg_official" if official else "seg_mmseg1"],
                    report=dict(mapped={"backbone": 156, "neck": 16, "head": 37},
                                # none in the mmseg 1.x file: ADE20K's 150
                                class_names=files["seg_names"] if official else list(ADE20K_CLASSES)),
                    note="num_batches_tracked", inputs=_inputs(), eps_matters=True,
                    reference=lambda x, official_eps: _seg_reference(files["seg"], x, official_eps))
    from pvt_dense.segmentation.config import load_segmentation_config
    v2 = request.getfixturevalue("v2_segmentor_file")

    def reference(x, official_eps):
        assert not official_eps  # mmsegmentation's file only
        with torch.no_grad():
            return v2["model"](torch.from_numpy(x), mode="tensor").numpy()
    cfg = load_segmentation_config(V2_SEG_CONFIG, [("mode", 1), ("pretrained", ""), ("num_classes", V2_SEG_CLASSES),
                                                    ("neck_channels", NECK_CHANNELS),
                                                    ("head_channels", SEG_HEAD_CHANNELS)])
    return dict(cfg=cfg, file=v2["path"],
                report=dict(source_format=MMLAB_MMDET_PVT_V2, norm_eps_style="mmdet", class_names=v2["classes"]),
                note=None, inputs=[np.random.default_rng(7).normal(size=V2_SHAPE).astype(np.float32)],
                eps_matters=False, reference=reference)


@pytest.mark.parametrize("model,layout", [("pvt_tiny", "mmseg1"), ("pvt_tiny", "official"), ("pvt_v2_b0", "mmseg1")])
def test_semantic_fpn_checkpoint_matches_mmseg(request, model, layout):
    from pvt_dense.segmentation.build import load_trained_segmentor_with_report
    case = _semantic_fpn_case(request, model, layout)
    official = layout == "official"
    net, report = load_trained_segmentor_with_report(case["cfg"], case["file"])
    assert {name: getattr(report, name) for name in case["report"]} == case["report"]
    if case["note"]:
        assert any(case["note"] in note for note in report.notes)
    for x in case["inputs"]:
        reference = case["reference"](x, official)
        assert abs(reference).max() > 0.1
        ours = net(ms.Tensor(x)).asnumpy()
        assert _max_diff([ours], [reference]) <= TOLERANCE
        if case["eps_matters"]:
            assert _max_diff([ours], [case["reference"](x, not official)]) > 100 * TOLERANCE


def test_convert_tool_writes_a_native_checkpoint_the_tools_load(files, tmp_path):
    """tools/convert_weights.py on an official Semantic FPN release, then the segmentation loader on its output."""
    from pvt_dense.segmentation.build import load_trained_segmentor_with_report
    dst = tmp_path / "semfpn_pvt_tiny.ckpt"
    config = tmp_path / "semfpn_narrow.yaml"
    config.write_text(f"backbone: pvt_tiny\nnum_classes: {SEG_CLASSES}\nneck_channels: {NECK_CHANNELS}\n"
                      f"head_channels: {SEG_HEAD_CHANNELS}\n")
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weights.py"),
                             files["seg_official"], str(dst), "--config", str(config)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "backbone 156, neck 16, head 37" in result.stdout
    info = read_whole_model_info(dst)
    assert (info.source_format, info.task, info.norm_eps_style) == ("native", "segmentor", "official")
    net, report = load_trained_segmentor_with_report(_segmentation_cfg(), str(dst))
    assert report.class_names == files["seg_names"]
    x = _inputs()[1]
    assert _max_diff([net(ms.Tensor(x)).asnumpy()], [_seg_reference(files["seg"], x, True)]) <= TOLERANCE


# (model, the module fixture holding the file, its key there, what read_whole_model_info must report)
RECOGNISED = [
    ("pvt_tiny", "files", "det_mmdet3", dict(task="detector", norm_eps_style="mmdet", model_name="pvt_tiny",
                                             num_classes=80, framework="mmdet 3.x")),
    ("pvt_tiny", "files", "seg_official", dict(task="segmentor", norm_eps_style="official",
                                               framework="mmseg 0.13.0")),
    ("pvt_v2_b0", "v2_file", "path", dict(source_format=MMLAB_MMDET_PVT_V2, task="detector", norm_eps_style="mmdet",
                                          model_name="pvt_v2_b0", num_classes=3, class_names=["ant", "bee", "cow"],
                                          framework="mmdet 3.x")),
    ("pvt_v2_b0", "v2_file", "official", dict(source_format=MMLAB_OFFICIAL_PVT, norm_eps_style="official",
                                              model_name="pvt_v2_b0")),
]


@pytest.mark.parametrize("model,fixture,key,expected", RECOGNISED,
                         ids=[f"{model}-{key}" for model, _, key, _ in RECOGNISED])
def test_whole_model_files_are_recognised_with_their_eps_style(request, model, fixture, key, expected):
    """mmdetection-PVT files select the 'mmdet' eps, official releases the 'official' one; size, task, classes and
    framework are read from the file."""
    info = read_whole_model_info(request.getfixturevalue(fixture)[key])
    assert {name: getattr(info, name) for name in expected} == expected


def _tampered(files, tmp_path, source, edit):
    from pvt_dense.checkpoint.torch_reader import read_torch_checkpoint
    top = read_torch_checkpoint(files[source])
    state = dict(top["state_dict"])
    edit(state)
    return _save(tmp_path / "tampered.pth", state, top["meta"])


@pytest.mark.bad_input("dense checkpoint", "a RetinaNet file without bbox_head.retina_reg.bias",
                       "CheckpointError naming the missing key; the model keeps its weights")
def test_missing_head_key_is_named(files, tmp_path):
    from pvt_dense.detection.build import build_retinanet
    path = _tampered(files, tmp_path, "det_official", lambda s: s.pop("bbox_head.retina_reg.bias"))
    detector = build_retinanet(_detection_cfg(), load_pretrained=False)
    before = detector.head.retina_cls.weight.asnumpy().copy()
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: head\.retina_reg\.bias"):
        load_whole_model(detector, path)
    np.testing.assert_array_equal(detector.head.retina_cls.weight.asnumpy(), before)


@pytest.mark.bad_input("dense checkpoint", "a Semantic FPN file with an extra key (decode_head.extra.weight)",
                       "CheckpointError naming the key")
def test_unexpected_key_is_named(files, tmp_path):
    from pvt_dense.segmentation.build import load_trained_segmentor
    path = _tampered(files, tmp_path, "seg_mmseg1",
                     lambda s: s.__setitem__("decode_head.extra.weight", np.ones((3,), np.float32)))
    with pytest.raises(CheckpointError, match=r"not in the model: decode_head\.extra\.weight"):
        load_trained_segmentor(_segmentation_cfg(), path)


@pytest.mark.bad_input("dense checkpoint", "an 80-class RetinaNet file with num_classes: 3 in the config",
                       "CheckpointError: the file predicts 80 classes, set num_classes: 80")
def test_wrong_class_count_is_an_error(files):
    from pvt_dense.detection.build import load_detector
    with pytest.raises(CheckpointError, match=r"predicts 80 classes .*bbox_head\.retina_cls\.weight.*num_classes: 80"):
        load_detector(_detection_cfg(num_classes=3), files["det_mmdet3"])


@pytest.mark.bad_input("dense checkpoint", "an mmdetection-PVT file with backbone_norm_eps: official",
                       "ConfigError: the file needs backbone_norm_eps: mmdet")
def test_conflicting_norm_eps_is_an_error(files):
    from pvt_dense.detection.build import load_detector
    with pytest.raises(ConfigError, match="set backbone_norm_eps: mmdet"):
        load_detector(_detection_cfg(backbone_norm_eps="official"), files["det_mmdet3"])


@pytest.mark.bad_input("dense checkpoint", "an mmdetection-PVT file loaded into a backbone built with the official eps",
                       "CheckpointError naming backbone_norm_eps")
def test_model_built_with_the_other_eps_is_refused(files):
    from pvt_dense.detection.build import build_retinanet
    detector = build_retinanet(_detection_cfg(), load_pretrained=False)
    with pytest.raises(CheckpointError, match="backbone_norm_eps: mmdet"):
        load_whole_model(detector, files["det_mmdet3"])


@pytest.mark.bad_input("dense checkpoint", "a segmentor file given to the detector loader",
                       "CheckpointError: a segmentor checkpoint, the model is a detector")
def test_task_mismatch_is_an_error(files):
    from pvt_dense.detection.build import load_detector
    with pytest.raises(CheckpointError, match="is a segmentor checkpoint; the model is a detector"):
        load_detector(_detection_cfg(), files["seg_official"])


@pytest.mark.slow
def test_load_from_starts_training_from_the_whole_model_weights(tmp_path):
    """train_det.py --load_from: the run starts from the file's weights (lr 0 keeps them), at iteration 0, with the
    file's LayerNorm eps convention recorded in the run's config."""
    import json

    from pvt_dense.checkpoint.whole_model import save_whole_model
    from pvt_dense.data.digits_detection import make_digits_detection
    from pvt_dense.detection.build import build_retinanet
    from pvt_dense.detection.config import load_detection_config
    from pvt_dense.detection.build import load_detector
    from pvt_dense.detection.train import train_detector

    data = make_digits_detection(tmp_path / "digits", train_images=4, val_images=1, canvas_size=64,
                                 digit_sizes=(22, 30), min_digits=1, max_digits=2, classes=2, seed=1)
    narrow = ["--num_classes", "2", "--pretrained", "", "--out_indices", "[1, 2]", "--frozen_stages", "3",
              "--drop_path_rate", "0", "--neck_channels", "16", "--head_channels", "16",
              "--head_stacked_convs", "1", "--backbone_norm_eps", "mmdet"]
    source_cfg = load_detection_config(None, narrow)
    source = build_retinanet(source_cfg, load_pretrained=False)
    rng = np.random.default_rng(0)
    for param in source.get_parameters():
        param.set_data(ms.Tensor(rng.normal(size=param.shape).astype(np.float32) * 0.05))
    start = save_whole_model(source, str(tmp_path / "start.ckpt"),
                              {"task": "detector", "class_names": ["a", "b"], "config": dict(source_cfg)})
    cfg = load_detection_config(None, [
        "--data_dir", data["root"], "--train_ann", data["train_ann"], "--train_images", data["train_images"],
        "--val_ann", "", "--ckpt_save_dir", str(tmp_path / "run"), "--resume", "", "--distribute", "False",
        "--mode", "1", "--img_scale", "[64, 64]", "--max_gt", "4", "--batch_size", "4", "--lr", "0", "--max_iters",
        "1", "--progress_bar", "False", "--num_workers", "1", "--load_from", start,
        *[item for item in narrow if item not in ("--backbone_norm_eps", "mmdet")]])
    train_detector(cfg)
    with open(tmp_path / "run" / "latest.json") as handle:
        latest = json.load(handle)
    assert latest["global_step"] == 1  # started at iteration 0, not resumed from the file's step
    trained = load_detector(cfg, str(tmp_path / "run" / latest["checkpoint"]))
    assert trained.backbone.spec.norm_eps_style == "mmdet"
    for (name, ours), (_, theirs) in zip(trained.parameters_and_names(), source.parameters_and_names(), strict=True):
        np.testing.assert_array_equal(ours.asnumpy(), theirs.asnumpy(), err_msg=name)


def test_segmentation_run_starts_from_load_from(files, tmp_path):
    """train_seg.py --load_from with an official Semantic FPN release: the run's segmentor holds the file's
    weights (BatchNorm statistics included) before its first step."""
    import cv2

    from pvt_dense.checkpoint.whole_model import MMLAB_OFFICIAL_PVT, read_whole_model_info
    from pvt_dense.segmentation.build import load_trained_segmentor
    from pvt_dense.segmentation.config import load_segmentation_config
    from pvt_dense.segmentation.train import SegmentationRun
    for split in ("training", "validation"):
        for folder in ("images", "annotations"):
            (tmp_path / folder / split).mkdir(parents=True)
        for index in range(4):
            cv2.imwrite(str(tmp_path / "images" / split / f"{index}.png"), np.full((64, 64, 3), 100, np.uint8))
            cv2.imwrite(str(tmp_path / "annotations" / split / f"{index}.png"), np.ones((64, 64), np.uint8))
    overrides = [("data_dir", str(tmp_path)), ("distribute", False), ("mode", 1), ("pretrained", ""),
                 ("neck_channels", NECK_CHANNELS), ("head_channels", SEG_HEAD_CHANNELS), ("batch_size", 2),
                 ("ckpt_save_dir", str(tmp_path / "run")), ("num_workers", 1), ("crop_size", [64, 64])]
    assert read_whole_model_info(files["seg_official"]).source_format == MMLAB_OFFICIAL_PVT
    run = SegmentationRun(load_segmentation_config(None, overrides + [("load_from", files["seg_official"])]))
    reference = load_trained_segmentor(_segmentation_cfg(), files["seg_official"])
    theirs = dict(reference.parameters_and_names())
    for name, ours in run.net.parameters_and_names():
        np.testing.assert_array_equal(ours.asnumpy(), theirs[name].asnumpy(), err_msg=name)
    assert run.cfg.backbone_norm_eps == "official"


# --- --load_from with another class count: mmdetection's behaviour (load what fits, skip the classifier, warn) -----

CLASSIFIER_NAMES = {"detector": ("head.retina_cls.weight", "head.retina_cls.bias"),
                    "segmentor": ("head.classifier.weight", "head.classifier.bias")}


def _assert_loaded_all_but_the_classifier(model, reference, initial, task):
    theirs = dict(reference.parameters_and_names())
    for name, ours in model.parameters_and_names():
        if name in CLASSIFIER_NAMES[task]:
            if initial is not None:
                np.testing.assert_array_equal(ours.asnumpy(), initial[name], err_msg=f"{name} was overwritten")
        else:
            np.testing.assert_array_equal(ours.asnumpy(), theirs[name].asnumpy(), err_msg=name)


def test_load_from_with_another_class_count_skips_only_the_classifier_with_a_warning(files, capsys):
    """The loader train_det.py --load_from uses, on an official PVT RetinaNet release (80 classes) into a 3-class model:
    every other tensor loads, retina_cls keeps its initialisation, a warning names it; strict loading still
    refuses the file."""
    from pvt_dense.checkpoint.whole_model import print_report
    from pvt_dense.detection.build import build_retinanet
    from pvt_dense.detection.build import load_detector
    detector = build_retinanet(_detection_cfg(num_classes=3), load_pretrained=False)
    initial = {name: p.asnumpy().copy() for name, p in detector.parameters_and_names()}
    with pytest.raises(CheckpointError, match="predicts 80 classes"):
        load_whole_model(detector, files["det_official"])
    report = load_whole_model(detector, files["det_official"], skip_mismatched_classifier=True)
    print_report(report)
    warning = capsys.readouterr().err
    assert "warning:" in warning and "head.retina_cls.weight (file (720, 64, 3, 3), model (27, 64, 3, 3))" in warning
    assert "head.retina_cls.bias" in warning and "head.retina_reg" not in warning
    _assert_loaded_all_but_the_classifier(detector, load_detector(_detection_cfg(), files["det_official"]), initial,
                                          "detector")


def test_load_from_native_file_of_another_class_count(tmp_path, capsys):
    """A native (pvt_dense) detector checkpoint of 2 classes into a 3-class detector, as train_det.py --load_from
    loads it."""
    from pvt_dense.checkpoint.whole_model import print_report, save_whole_model
    from pvt_dense.detection.build import build_retinanet
    narrow = dict(out_indices=[1, 2], neck_channels=16, head_channels=16, head_stacked_convs=1)
    source = build_retinanet(_detection_cfg(num_classes=2, **narrow), load_pretrained=False)
    rng = np.random.default_rng(3)
    for param in source.get_parameters():
        param.set_data(ms.Tensor(rng.normal(size=param.shape).astype(np.float32)))
    path = save_whole_model(source, str(tmp_path / "two_classes.ckpt"),
                             {"task": "detector", "class_names": ["a", "b"]})
    detector = build_retinanet(_detection_cfg(num_classes=3, **narrow), load_pretrained=False)
    initial = {name: p.asnumpy().copy() for name, p in detector.parameters_and_names()}
    with pytest.raises(CheckpointError, match="retina_cls"):
        load_whole_model(detector, path)
    report = load_whole_model(detector, path, skip_mismatched_classifier=True)
    assert report.class_names is None and report.mapped["head"] == len(
        [n for n, _ in detector.parameters_and_names() if n.startswith("head.")]) - 2
    print_report(report)
    assert "head.retina_cls.weight (file (18, 16, 3, 3), model (27, 16, 3, 3))" in capsys.readouterr().err
    _assert_loaded_all_but_the_classifier(detector, source, initial, "detector")


def test_segmentation_run_load_from_another_class_count(files, tmp_path, capsys):
    """train_seg.py --load_from with the official 150-class Semantic FPN into a 5-class run: conv_seg skipped with a
    warning, everything else (BatchNorm statistics included) from the file."""
    import cv2

    from pvt_dense.segmentation.build import load_trained_segmentor
    from pvt_dense.segmentation.config import load_segmentation_config
    from pvt_dense.segmentation.train import SegmentationRun
    for split in ("training", "validation"):
        for folder in ("images", "annotations"):
            (tmp_path / folder / split).mkdir(parents=True)
        for index in range(2):
            cv2.imwrite(str(tmp_path / "images" / split / f"{index}.png"), np.full((64, 64, 3), 100, np.uint8))
            cv2.imwrite(str(tmp_path / "annotations" / split / f"{index}.png"), np.ones((64, 64), np.uint8))
    overrides = [("data_dir", str(tmp_path)), ("distribute", False), ("mode", 1), ("pretrained", ""),
                 ("neck_channels", NECK_CHANNELS), ("head_channels", SEG_HEAD_CHANNELS), ("batch_size", 2),
                 ("ckpt_save_dir", str(tmp_path / "run")), ("num_workers", 1), ("crop_size", [64, 64]),
                 ("num_classes", 5), ("load_from", files["seg_official"])]
    run = SegmentationRun(load_segmentation_config(None, overrides))
    warning = capsys.readouterr().err
    assert "warning:" in warning and "head.classifier.weight (file (150, 32, 1, 1), model (5, 32, 1, 1))" in warning
    _assert_loaded_all_but_the_classifier(run.net, load_trained_segmentor(_segmentation_cfg(), files["seg_official"]),
                                          None, "segmentor")


# ---------------------------------------- PVT v2 (pvt_v2_b0)
#
# Whole RetinaNet checkpoints with mmdetection's PVT v2 backbone (the layout of mmdetection's published
# RetinaNet-PVTv2 files) load into our RetinaNet on `pvt_v2_b0` and compute what mmdetection 3.3 computes; likewise a
# Semantic FPN that mmsegmentation 1.2 builds on that backbone.
#
# The reference is mmdetection 3.3's RetinaNet on its `PyramidVisionTransformerV2` (b0: embed_dims 32, two layers per
# stage, as mmdetection's configs/pvt/retinanet_pvtv2-b0_fpn_1x_coco.py builds it), FPN and head narrowed as
# above, every parameter and BatchNorm statistic perturbed (`_randomise`), saved with
# torch.save the way mmdetection 3.x's runner does, and once more in the official v2 release layout (whai362/PVT
# branch v2: `patch_embed{i}`, `block{i}.{j}` with `attn.q`/`attn.kv` and `mlp.dwconv.dwconv`, `norm{i}`), whose
# names are checked to give back exactly mmdetection's state through mmdetection's own `pvt_convert`. Our model is
# built from configs/detection/retinanet_pvt_v2_b0_fpn_1x_coco.yaml with the narrow widths as overrides.
# mmdetection's PVT v2 uses LayerNorm eps 1e-6 in every norm (`norm_cfg=dict(type='LN', eps=1e-6)`), so its file
# must select the 'mmdet' eps style; the official v2 code uses 1e-5 in the patch-embedding and spatial-reduction
# norms ('official', its reference is mmdetection's model with those two eps set so). Those norms see inputs where
# the two eps differ visibly.

V2_DET_CONFIG = os.path.join(REPO, "configs", "detection", "retinanet_pvt_v2_b0_fpn_1x_coco.yaml")
V2_SEG_CONFIG = os.path.join(REPO, "configs", "segmentation", "semfpn_pvt_v2_b0_ade20k_40k.yaml")
V2_SEG_CLASSES = 5
B0_CHANNELS = [32, 64, 160, 256]
# A padded size whose grids are odd at strides 32, 64 and 128 (5x7, 3x4, 2x2).
V2_SHAPE = (1, 3, 160, 224)
V2_NARROW = [("neck_channels", NECK_CHANNELS), ("head_channels", HEAD_CHANNELS),
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


def _v2_reference(mm_model, x, eps=None):
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
    cfg = load_detection_config(None, [("mode", 1), ("num_classes", 3), ("backbone", "pvt_tiny")] + V2_NARROW)
    with pytest.raises(CheckpointError, match="set backbone: pvt_v2_b0"):
        load_detector_with_report(cfg, v2_file["path"])


def test_convert_tool_writes_a_native_v2_detector(v2_file, tmp_path):
    """tools/convert_weights.py on the mmdetection file (size and class count from the weights, the narrow widths
    from a config), then the detection loader on its output: mmdetection's outputs again."""
    from pvt_dense.detection.config import load_detection_config
    from pvt_dense.detection.build import load_detector_with_report
    dst = tmp_path / "retinanet_pvt_v2_b0.ckpt"
    config = tmp_path / "narrow.yaml"
    config.write_text("".join(f"{key}: {value!r}\n" for key, value in V2_NARROW)
                      + "num_classes: 3\nbackbone: pvt_v2_b0\n")
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weights.py"), v2_file["path"],
                             str(dst), "--config", str(config)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    info = read_whole_model_info(dst)
    assert (info.source_format, info.task, info.norm_eps_style) == ("native", "detector", "mmdet")
    cfg = load_detection_config(None, [("mode", 1), ("num_classes", 3), ("backbone", "pvt_v2_b0")] + V2_NARROW)
    detector, report = load_detector_with_report(cfg, str(dst))
    assert report.class_names == v2_file["classes"]
    x = np.random.default_rng(6).normal(size=V2_SHAPE).astype(np.float32)
    assert _max_diff([o.asnumpy() for o in detector(ms.Tensor(x))], _v2_reference(v2_file["model"], x)) <= TOLERANCE


@pytest.mark.slow
def test_infer_det_command_line_on_an_mmdet_pvt_v2_checkpoint(v2_file, tmp_path):
    """tools/infer_det.py with the v2 config and the mmdetection file: the detections of mmdetection's
    `test_step` on the same image (its pipeline and `predict(rescale=True)`), up to detections.json's rounding."""
    import cv2
    from mmengine.dataset import Compose
    from mmlab_reference import require_mmdet
    require_mmdet()  # mmdetection's registry scope for its pipeline: a Semantic FPN test may have left mmseg's
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
    command = [sys.executable, os.path.join(REPO, "tools", "infer_det.py"), "--config", V2_DET_CONFIG,
               "--ckpt_path", v2_file["path"], "--input", str(folder), "--output", str(out), "--num_classes", "3",
               "--img_scale", str(list(img_scale)), "--progress_bar", "False"]
    for key, value in V2_NARROW:
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
                         num_classes=V2_SEG_CLASSES, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode="whole"))), 4)
    names = [f"class {i}" for i in range(V2_SEG_CLASSES)]
    path = _save(tmp_path_factory.mktemp("dense_v2_seg") / "semfpn_pvtv2_b0.pth", model.state_dict(),
                 {"dataset_meta": {"classes": names}, "mmengine_version": "0.10.7"})
    return {"model": model, "path": path, "classes": names}
