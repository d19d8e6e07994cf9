"""PVT (v1 and v2) inside mindcv and mindyolo, driven through their own factories, loaders, losses and trainer.

Costs on 2 CPU cores: every size is built in both mindcv modes in PyNative (parameter initialisation is most of it,
~7 s per pvt_large model); the features_only models return stages 0-1 and run one small forward. The mindyolo
training test compiles one graph-mode train step (PVT-Tiny, the YOLOv8 neck and head, mindyolo's loss; 45-80 s
depending on load) and reuses it for every step; it is marked slow.
"""
import os
import subprocess
import sys
import threading
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import pvt_dense
from pvt_dense.errors import CheckpointError, ConfigError
from pvt_dense.models.pvt import PVT_SPECS, PVTBackbone, PVTClassifier, parameter_count
from pvt_dense.models.pvt_v2 import PVTv2Backbone, PVTv2Classifier

mindcv = pytest.importorskip("mindcv")
from pvt_dense.integrations import mindcv as pvt_mindcv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
YOLO_CONFIG = ROOT / "configs" / "detection" / "yolov8_pvt_tiny_coco.yaml"
SIZES = sorted(PVT_SPECS)
# Published classifier counts for 1000 classes (see test_backbone.py); a head of k classes has 513 * k parameters.
CLASSIFIER_PARAMS = {"pvt_tiny": 13_229_288, "pvt_small": 24_485_864, "pvt_medium": 44_208_104,
                     "pvt_large": 61_369_320}


@pytest.fixture(scope="module", autouse=True)
def registered():
    pvt_mindcv.register()


# ------------------------------------------------------------------------------------------------------- mindcv


@pytest.mark.parametrize("name", SIZES)
def test_mindcv_create_model_builds_every_size(name, pynative):
    classifier = mindcv.models.create_model(name, num_classes=7, drop_rate=0.0, drop_path_rate=0.1)
    assert isinstance(classifier, PVTClassifier)
    assert parameter_count(classifier) == CLASSIFIER_PARAMS[name] - 513 * (1000 - 7)


# features_only models: (name, out_indices, input (height, width), mindcv's feature info (channels, reduction, name)
# of each map, the maps' shapes). The v1 sizes return stages 0-1 only, so that the large sizes build in a second;
# test_mindcv_checkpoint_path_* runs all stages.
FEATURE_CASES = [(name, [0, 1], (32, 64), [(64, 4, "stages.0"), (128, 8, "stages.1")],
                  [(1, 64, 8, 16), (1, 128, 4, 8)]) for name in SIZES] + [
    ("pvt_v2_b2", [1, 2, 3], (61, 95), [(128, 8, "stages.1"), (320, 16, "stages.2"), (512, 32, "stages.3")],
     [(1, 128, 8, 12), (1, 320, 4, 6), (1, 512, 2, 3)])]


@pytest.mark.parametrize("name,out_indices,size,info,shapes", FEATURE_CASES, ids=[c[0] for c in FEATURE_CASES])
def test_mindcv_features_only_builds_the_pvt_dense_backbone(name, out_indices, size, info, shapes, pynative, images):
    features = mindcv.models.create_model(name, features_only=True, out_indices=out_indices, drop_path_rate=0.1)
    assert isinstance(features, PVTv2Backbone if name.startswith("pvt_v2") else PVTBackbone)
    assert list(features.out_channels) == [channels for channels, _, _ in info]
    # mindcv's feature-info keys and pvt_dense's attributes describe the same maps.
    assert [(item["chs"], item["reduction"], item["name"]) for item in features.feature_info] == info
    assert [(item.stage, item.channels, item.stride) for item in features.feature_info] == [
        (stage, channels, stride) for stage, (channels, stride, _) in zip(out_indices, info, strict=True)]

    reference = pvt_dense.create_backbone(name, out_indices=tuple(out_indices))
    reference_params = reference.parameters_dict()
    assert sorted(reference_params) == sorted(features.parameters_dict())
    for param_name, param in features.parameters_dict().items():
        reference_params[param_name].set_data(param.data)
    x = images(*size, uniform=True)
    for net in (features, reference):
        net.set_train(False)
    outs = features(x)
    assert [o.shape for o in outs] == shapes
    for ours, theirs in zip(outs, reference(x), strict=True):
        np.testing.assert_array_equal(ours.asnumpy(), theirs.asnumpy())


def test_mindcv_v2_names_point_at_pvt_dense_with_mindcvs_published_urls():
    from mindcv.models.registry import list_models, model_entrypoint
    for name in ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"):
        assert name in list_models()
        assert model_entrypoint(name) is getattr(pvt_mindcv, name)
    assert pvt_mindcv.default_cfgs["pvt_v2_b0"]["url"].endswith("/pvt_v2_b0-1c4f6683.ckpt")
    assert pvt_mindcv.default_cfgs["pvt_v2_b2_li"]["url"] == ""  # mindcv publishes no b2_li


def test_mindcv_built_models_run_the_same_in_graph_and_pynative_mode(images):
    classifier = mindcv.models.create_model("pvt_tiny", num_classes=7)
    features = mindcv.models.create_model("pvt_tiny", features_only=True, out_indices=[1, 2, 3])
    x = images(64, 96, uniform=True)
    results = {}
    for mode in (ms.PYNATIVE_MODE, ms.GRAPH_MODE):
        ms.set_context(mode=mode)
        try:
            for net in (classifier, features):
                net.set_train(False)
            results[mode] = [classifier(images(224, 224, uniform=True)).asnumpy()] + [o.asnumpy() for o in features(x)]
        finally:
            ms.set_context(mode=ms.PYNATIVE_MODE)
    assert [r.shape for r in results[ms.GRAPH_MODE]] == [(1, 7), (1, 128, 8, 12), (1, 320, 4, 6), (1, 512, 2, 3)]
    for eager, graph in zip(results[ms.PYNATIVE_MODE], results[ms.GRAPH_MODE], strict=True):
        np.testing.assert_allclose(graph, eager, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def mindcv_format_checkpoint(tmp_path_factory):
    """A pvt_tiny checkpoint written by mindcv's own PVT class: MindCV names and float16 position embeddings, as in
    MindCV's published pvt_tiny-6abb953d.ckpt, with random weights (the published file is not downloadable here)."""
    from mindcv.models.pvt import pvt_tiny as mindcv_pvt_tiny
    net = mindcv_pvt_tiny(num_classes=1000)
    rng = np.random.default_rng(3)
    for param in net.get_parameters():
        base = 1.0 if param.name.endswith("gamma") else 0.0
        value = base + 0.05 * rng.standard_normal(param.shape)
        param.set_data(ms.Tensor(value.astype(ms.dtype_to_nptype(param.dtype))))
    assert net.pos_embed1.dtype == ms.float16
    path = tmp_path_factory.mktemp("mindcv") / "pvt_tiny-6abb953d.ckpt"
    ms.save_checkpoint(net, str(path))
    return path, {p.name: p.asnumpy() for p in net.get_parameters()}


def test_mindcv_checkpoint_path_loads_mindcv_weights_as_pvt_dense_does(mindcv_format_checkpoint, pynative, images):
    path, mindcv_weights = mindcv_format_checkpoint
    through_mindcv = mindcv.models.create_model("pvt_tiny", num_classes=1000, checkpoint_path=str(path))
    through_pvt_dense = pvt_dense.create_model("pvt_tiny", pretrained=str(path))
    loaded = {p.name: p.asnumpy() for p in through_mindcv.get_parameters()}
    np.testing.assert_array_equal(loaded["stages.1.blocks.0.attn.kv.weight"],
                                  mindcv_weights["Blocks.1.0.attn.kv.weight"])
    np.testing.assert_array_equal(loaded["stages.3.pos_embed"], mindcv_weights["pos_embed4"].astype(np.float32))
    x = images(32, 64, uniform=True)
    for net in (through_mindcv, through_pvt_dense):
        net.set_train(False)
    np.testing.assert_array_equal(through_mindcv(x).asnumpy(), through_pvt_dense(x).asnumpy())

    # The classifier checkpoint feeds a features_only model too: cls slot, final norm and head are dropped.
    maps = mindcv.models.create_model("pvt_tiny", features_only=True, out_indices=[1, 2, 3],
                                      checkpoint_path=str(path))
    reference = pvt_dense.create_backbone("pvt_tiny", out_indices=(1, 2, 3), pretrained=str(path))
    for net in (maps, reference):
        net.set_train(False)
    for ours, theirs in zip(maps(x), reference(x), strict=True):
        np.testing.assert_array_equal(ours.asnumpy(), theirs.asnumpy())


def test_mindcv_checkpoint_path_loads_mindcvs_own_pvtv2_weights(tmp_path, pynative):
    from mindcv.models.pvtv2 import pvt_v2_b0 as mindcv_pvt_v2_b0
    theirs = mindcv_pvt_v2_b0(num_classes=1000)
    rng = np.random.default_rng(1)
    for param in theirs.get_parameters():
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    path = tmp_path / "pvt_v2_b0-1c4f6683.ckpt"
    ms.save_checkpoint(theirs, str(path))
    classifier = mindcv.models.create_model("pvt_v2_b0", num_classes=1000, checkpoint_path=str(path))
    assert isinstance(classifier, PVTv2Classifier)
    loaded = {p.name: p.asnumpy() for p in classifier.get_parameters()}
    raw = {p.name: p.asnumpy() for p in theirs.get_parameters()}
    np.testing.assert_array_equal(loaded["stages.2.blocks.1.mlp.fc2.weight"], raw["block_list.2.1.mlp.fc2.weight"])
    np.testing.assert_array_equal(loaded["head.bias"], raw["head.bias"])
    # features_only + the same classifier checkpoint: the head is dropped with a note, the stages load.
    features = mindcv.models.create_model("pvt_v2_b0", features_only=True, checkpoint_path=str(path))
    np.testing.assert_array_equal(features.stages[3].norm.gamma.asnumpy(), raw["norm_list.3.gamma"])


def test_mindcv_checkpoint_saved_by_its_train_step_loads_with_and_without_ema(tmp_path, pynative):
    # What mindcv's train.py saves: its TrainStep cell, i.e. the weights, AdamW moments, step counters and, with
    # --ema, an ema.* copy of the weights.
    from mindcv.optim import create_optimizer
    from mindcv.utils.train_step import TrainStep
    net = mindcv.models.create_model("pvt_tiny", num_classes=4)
    optimizer = create_optimizer(net.trainable_params(), opt="adamw", lr=1e-3)
    train_step = TrainStep(nn.WithLossCell(net, nn.CrossEntropyLoss()), optimizer, scale_sense=ms.Tensor(1.0),
                           ema=True)
    for param in train_step.ema_weight:
        param.set_data(param.data + 0.5)
    path = tmp_path / "pvt_tiny-10_100.ckpt"
    ms.save_checkpoint(train_step, str(path))

    weights = {p.name: p.asnumpy() for p in net.get_parameters()}
    key = "stages.2.blocks.1.mlp.fc1.weight"
    resumed = mindcv.models.create_model("pvt_tiny", num_classes=4, checkpoint_path=str(path))
    np.testing.assert_array_equal(resumed.parameters_dict()[key].asnumpy(), weights[key])
    # create_model(..., ema=True) makes this same call after building the model.
    from mindcv.models import model_factory
    model_factory.load_model_checkpoint(resumed, str(path), True)
    np.testing.assert_allclose(resumed.parameters_dict()[key].asnumpy(), weights[key] + 0.5, rtol=0, atol=1e-6)


def test_mindcv_pretrained_true_reads_mindcv_download_root(mindcv_format_checkpoint, tmp_path, pynative):
    from mindcv.utils import download
    path, mindcv_weights = mindcv_format_checkpoint
    url = pvt_mindcv.default_cfgs["pvt_tiny"]["url"]
    assert url.endswith("/pvt_tiny-6abb953d.ckpt") and mindcv.models.is_model_pretrained("pvt_tiny")
    (tmp_path / "models").mkdir()
    os.symlink(path, tmp_path / "models" / os.path.basename(url))  # mindcv's downloader skips files it has
    previous = download.get_default_download_root()
    download.set_default_download_root(str(tmp_path))
    try:
        net = mindcv.models.create_model("pvt_tiny", pretrained=True, features_only=True, out_indices=[0])
    finally:
        download.set_default_download_root(previous)
    np.testing.assert_array_equal(net.parameters_dict()["stages.0.patch_embed.proj.weight"].asnumpy(),
                                  mindcv_weights["patch_embed1.proj.weight"])


@pytest.mark.bad_input("mindcv/mindyolo config",
                       "mindcv create_model('pvt_tiny', ...) with global_pool='avg', in_channels=1 or a "
                       "checkpoint_path that does not exist; mindcv 0.4.0 installed",
                       "ConfigError naming the argument or asking for 3 channels; CheckpointError 'not found'; "
                       "ConfigError: needs mindcv==0.3.0, found 0.4.0")
def test_mindcv_entry_points_reject_what_they_cannot_build(monkeypatch, tmp_path, pynative):
    with pytest.raises(ConfigError, match="unknown argument.*global_pool"):
        mindcv.models.create_model("pvt_tiny", global_pool="avg")
    with pytest.raises(ConfigError, match="3-channel"):
        mindcv.models.create_model("pvt_tiny", in_channels=1)
    with pytest.raises(CheckpointError, match="not found"):
        mindcv.models.create_model("pvt_tiny", checkpoint_path=str(tmp_path / "missing.ckpt"))
    monkeypatch.setattr(mindcv, "__version__", "0.4.0")
    with pytest.raises(ConfigError, match="mindcv==0.3.0.*found mindcv 0.4.0"):
        pvt_mindcv.check_mindcv_version()


def test_mindcv_checkpoint_loading_of_other_models_is_unchanged(tmp_path, pynative):
    from mindcv.models import model_factory
    source, target = nn.Dense(3, 2), nn.Dense(3, 2)
    path = tmp_path / "dense.ckpt"
    ms.save_checkpoint(source, str(path))
    model_factory.load_model_checkpoint(target, str(path))
    np.testing.assert_array_equal(target.weight.asnumpy(), source.weight.asnumpy())


def test_import_pvt_dense_registers_with_mindcv_but_does_not_import_mindyolo():
    code = ("import sys, pvt_dense\n"
            "assert 'mindyolo' not in sys.modules\n"
            "import mindcv\n"
            "print(mindcv.models.model_entrypoint('pvt_large').__module__)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "pvt_dense.integrations.mindcv"


# ----------------------------------------------------------------------------------------------------- mindyolo


@pytest.fixture(scope="module")
def mindyolo_modules():
    pytest.importorskip("mindyolo")  # mindyolo 0.5.0 also needs pkg_resources (setuptools<81)
    from pvt_dense.integrations import mindyolo as pvt_mindyolo
    assert pvt_mindyolo.register() == ["yolov8_pvt"]
    return pvt_mindyolo


def load_yolo_config(path=YOLO_CONFIG):
    from mindyolo.utils.config import Config, load_config
    cfg, _, _ = load_config(str(path))
    return Config(cfg)


def build_yolo_net(size):
    """The shipped YAML with its PVTBackbone row set to `size`, built by mindyolo's create_model as its train.py does
    (2 classes, no stochastic depth so that the loss curve below is not noise)."""
    from mindyolo.models import create_model
    cfg = load_yolo_config()
    assert cfg.network.backbone[0][3] == ["pvt_tiny", "drop_path_rate=0.1"]
    cfg.network.backbone[0][3] = [size, "drop_path_rate=0.0"]
    return cfg, create_model(model_name=cfg.network.model_name, model_cfg=cfg.network, num_classes=2)


@pytest.fixture(scope="module")
def yolo_net(mindyolo_modules):
    return build_yolo_net("pvt_tiny")


# (PVTBackbone row's size, its backbone class, channels of stages 1, 2 and 3)
YOLO_ROWS = [("pvt_tiny", PVTBackbone, (128, 320, 512)), ("pvt_v2_b0", PVTv2Backbone, (64, 160, 256))]


@pytest.mark.parametrize("size,backbone_class,channels", YOLO_ROWS, ids=[row[0] for row in YOLO_ROWS])
def test_mindyolo_yaml_builds_pvt_rows_with_their_channels(mindyolo_modules, size, backbone_class, channels,
                                                           pynative, images):
    from mindyolo.models.heads.yolov8_head import YOLOv8Head
    from mindyolo.models.layers import SPPF
    from mindyolo.optim import create_group_param
    from pvt_dense.integrations.mindyolo import PVTBackboneRow
    cfg, net = build_yolo_net(size)
    rows = net.model.model
    assert isinstance(rows[0], PVTBackboneRow) and rows[0].backbone.out_indices == (1, 2, 3)
    assert isinstance(rows[0].backbone, backbone_class)
    assert [(rows[i].stage, rows[i].channels, rows[i].stride) for i in (1, 2, 3)] == [
        (1, channels[0], 8), (2, channels[1], 16), (3, channels[2], 32)]
    assert [net.model.layers_param[i][:2] for i in range(5)] == [(0, -1), (1, 0), (2, 0), (3, 0), (4, -1)]
    # mindyolo's own layers were built for PVT's channels: SPPF on stage 3, the P4 concat of the neck.
    assert isinstance(rows[4], SPPF) and rows[4].conv1.conv.in_channels == channels[2]
    assert rows[7].cv1.conv.in_channels == 512 + channels[1]  # upsampled SPPF output (512 in the YAML) + stage 2
    assert isinstance(rows[-1], YOLOv8Head) and rows[-1].nc == 2
    names = [p.name for p in net.get_parameters()]
    assert len(set(names)) == len(names)
    assert "model.model.0.backbone.stages.3.blocks.1.attn.kv.weight" in names

    net.set_train(False)
    predictions, maps = net(images(64, 96, uniform=True))
    assert [m.shape for m in maps] == [(1, 66, 8, 12), (1, 66, 4, 6), (1, 66, 2, 3)]  # 2 classes + 4 x 16 bins
    assert predictions.shape == (1, 8 * 12 + 4 * 6 + 2 * 3, 6) and np.isfinite(predictions.asnumpy()).all()

    # The YAML's optimizer grouping sorts every PVT parameter (LayerNorm beta/gamma, position embeddings) somewhere.
    options = dict(cfg.optimizer, epochs=1, steps_per_epoch=2, total_batch_size=2, accumulate=1)
    groups = create_group_param(params=net.trainable_params(), **options)
    assert sum(len(g["params"]) for g in groups) == len(net.trainable_params())


def write_tiny_detection_set(root, size=128, count=2, boxes=4, seed=0):
    """`count` images with `boxes` coloured rectangles each, in mindyolo's layout: images/, labels/ (YOLO txt)."""
    import cv2
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    files = []
    for i in range(count):
        img = np.full((size, size, 3), 40, np.uint8)
        lines = []
        for k in range(boxes):
            x0, y0 = rng.integers(0, size // 2, 2)
            w, h = rng.integers(size // 4, size // 2, 2)
            img[y0:y0 + h, x0:x0 + w] = (30, 200, 220) if k % 2 else (220, 60, 30)
            lines.append(f"{k % 2} {(x0 + w / 2) / size} {(y0 + h / 2) / size} {w / size} {h / size}")
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), img)
        (root / "labels" / f"{i}.txt").write_text("\n".join(lines) + "\n")
        files.append(str(root / "images" / f"{i}.jpg"))
    (root / "train.txt").write_text("\n".join(files) + "\n")
    return root / "train.txt"


@pytest.mark.slow
def test_mindyolo_trains_pvt_yolov8_in_graph_mode_with_its_loss_data_and_trainer(yolo_net, tmp_path, graph_mode):
    from mindyolo.data import COCODataset, create_loader
    from mindyolo.models import create_loss, create_model
    from mindyolo.optim import create_optimizer
    from mindyolo.utils.callback import BaseCallback
    from mindyolo.utils.train_step_factory import create_train_step_fn, get_gradreducer, get_loss_scaler
    from mindyolo.utils.trainer_factory import create_trainer
    cfg, net = yolo_net
    size, steps = 128, 5
    dataset = COCODataset(dataset_path=str(write_tiny_detection_set(tmp_path / "data", size=size)), img_size=size,
                          transforms_dict=[
                              {"func_name": "letterbox", "scaleup": True},
                              {"func_name": "label_norm", "xyxy2xywh_": True},
                              {"func_name": "label_pad", "padding_size": 8, "padding_value": -1},
                              {"func_name": "image_norm", "scale": 255.0},
                              {"func_name": "image_transpose", "bgr2rgb": True, "hwc2chw": True}],
                          is_training=True, augment=False, batch_size=2, stride=32)
    loader = create_loader(dataset=dataset, batch_collate_fn=dataset.train_collate_fn,
                           column_names_getitem=dataset.column_names_getitem,
                           column_names_collate=dataset.column_names_collate, batch_size=2, epoch_size=steps,
                           shuffle=False, drop_remainder=True, num_parallel_workers=1)
    loss_fn = create_loss(**cfg.loss, anchors=1, stride=cfg.network.stride, nc=2)
    # One parameter group at a fixed lr: the YAML's three groups with per-step lr lists add ~60 s of compile.
    optimizer = create_optimizer(params=net.trainable_params(), optimizer="momentum", lr=0.01, momentum=0.9)
    scaler = get_loss_scaler("none")
    step_fn = create_train_step_fn(task="detect", network=net, loss_fn=loss_fn, optimizer=optimizer, loss_ratio=1,
                                   scaler=scaler, reducer=get_gradreducer(False, optimizer.parameters), ema=None,
                                   overflow_still_update=False, ms_jit=True)

    class Record(BaseCallback):
        def __init__(self):
            super().__init__()
            self.losses = []

        def on_train_step_end(self, run_context):
            self.losses.append(float(run_context.loss[0].asnumpy()))

    record = Record()

    trainer = create_trainer(model_name="yolov8_pvt_tiny", train_step_fn=step_fn, scaler=scaler, network=net,
                             loss_fn=loss_fn, ema=None, optimizer=optimizer, dataloader=loader,
                             steps_per_epoch=steps, callback=[record], reducer=get_gradreducer(False, None),
                             data_sink=False, profiler=False)
    net.set_train(True)
    trainer.train(epochs=1, main_device=True, keep_checkpoint_max=1, log_interval=steps,
                  loss_item_name=loss_fn.loss_item_name, save_dir=str(tmp_path / "run"), ms_jit=True, rank_size=1)
    losses = record.losses
    assert len(losses) == steps and np.isfinite(losses).all(), losses
    assert losses[-1] < 0.9 * losses[0], losses

    # The checkpoint mindyolo's trainer saved loads back through mindyolo's own create_model(checkpoint_path=).
    for thread in threading.enumerate():
        if thread.name == "asyn_save_ckpt":
            thread.join()
    saved = tmp_path / "run" / "weights" / f"yolov8_pvt_tiny-1_{steps}.ckpt"
    reloaded = create_model(model_name=cfg.network.model_name, model_cfg=cfg.network, num_classes=2,
                            checkpoint_path=str(saved))
    key = "model.model.0.backbone.stages.2.blocks.0.attn.q.weight"
    np.testing.assert_array_equal(reloaded.parameters_dict()[key].asnumpy(), net.parameters_dict()[key].asnumpy())


BAD_ROWS = [
    ([[-1, 1, "ConvNormAct", [64, 3, 2]], [-1, 1, "PVTBackbone", ["pvt_tiny"]]], "exactly one PVTBackbone row"),
    ([[-1, 1, "PVTBackbone", ["pvt_tiny", "out_indices=[1, 2]"]], [0, 1, "PVTFeature", [1]]], "takes no out_indices"),
    ([[-1, 1, "PVTBackbone", ["pvt_tiny", "drop_rate=0.1"]], [0, 1, "PVTFeature", [1]]], "unknown PVTBackbone option"),
    ([[-1, 1, "PVTBackbone", ["pvt_huge"]], [0, 1, "PVTFeature", [1]]], "unknown model name"),
    ([[-1, 1, "PVTBackbone", ["pvt_tiny"]], [0, 1, "PVTFeature", [4]]], "stage 4 does not exist"),
    ([[-1, 1, "PVTBackbone", ["pvt_tiny"]], [0, 1, "PVTFeature", [2]], [0, 1, "PVTFeature", [1]]], "increasing"),
    ([[-1, 1, "PVTBackbone", ["pvt_tiny"]], [-1, 1, "ConvNormAct", [64, 3, 2]]], "reads the PVTBackbone row"),
    ([[-1, 1, "PVTBackbone", ["pvt_tiny"]], [0, 1, "PVTFeature", [3]], [[-1, 0], 1, "Concat", [1]]],
     "reads the PVTBackbone row"),
]


@pytest.mark.bad_input("mindcv/mindyolo config",
                       "mindyolo YAML backbones with the PVTBackbone row not first, out_indices or an unknown option "
                       "on it, an unknown model, PVTFeature stage 4 or stages not increasing, a layer reading the "
                       "PVTBackbone row directly",
                       "ConfigError saying which row and why")
@pytest.mark.parametrize("backbone,message", BAD_ROWS)
def test_mindyolo_bad_pvt_rows_are_config_errors(mindyolo_modules, backbone, message):
    cfg = load_yolo_config()
    cfg.network.backbone = backbone
    cfg.network.head = [[-1, 1, "YOLOv8Head", ["nc", "reg_max", "stride"]]]
    with pytest.raises(ConfigError, match=message):
        mindyolo_modules.build_model("yolov8", cfg.network, num_classes=2)


@pytest.mark.bad_input("mindcv/mindyolo config",
                       "a YAML with PVT rows but network.model_name: yolov8",
                       "ConfigError: set network.model_name to yolov8_pvt")
def test_mindyolo_stock_model_name_with_pvt_rows_says_what_to_change(mindyolo_modules):
    from mindyolo.models import create_model
    cfg = load_yolo_config()
    cfg.network.model_name = "yolov8"
    with pytest.raises(ConfigError, match="set network.model_name to yolov8_pvt"):
        create_model(model_name=cfg.network.model_name, model_cfg=cfg.network, num_classes=2)


@pytest.mark.bad_input("mindcv/mindyolo config",
                       "mindyolo 0.4.1 installed",
                       "ConfigError: needs mindyolo==0.5.0, found 0.4.1")
def test_mindyolo_other_versions_are_refused(mindyolo_modules, monkeypatch):
    import mindyolo
    monkeypatch.setattr(mindyolo, "__version__", "0.4.1")
    with pytest.raises(ConfigError, match="mindyolo==0.5.0.*found mindyolo 0.4.1"):
        mindyolo_modules.register()


def test_launcher_registers_before_running_an_unchanged_mindyolo_script(mindyolo_modules, tmp_path):
    # Stands in for mindyolo's train.py: it looks the model up in mindyolo's registry from the YAML's model_name.
    script = tmp_path / "train.py"
    script.write_text("import sys\n"
                      "from mindyolo.models.registry import is_model\n"
                      "from mindyolo.utils.config import load_config\n"
                      "cfg, _, _ = load_config(sys.argv[sys.argv.index('--config') + 1])\n"
                      "assert is_model(cfg['network']['model_name']), 'not registered'\n"
                      "print('ok', cfg['network']['model_name'], sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")
    result = subprocess.run([sys.executable, "-W", "ignore", "-m", "pvt_dense.integrations.mindyolo", str(script),
                             "--config", str(YOLO_CONFIG), "--device_target", "CPU"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ok yolov8_pvt ['--config', '{YOLO_CONFIG}', '--device_target', 'CPU']" in result.stdout
