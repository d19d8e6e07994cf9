"""PVT v2 inside mindcv and mindyolo, driven through their own factories and loaders (see test_integrations.py for
the v1 sizes, the training runs and the error cases, which the v2 names share)."""
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

import pvt_dense
from pvt_dense.models.pvt_v2 import PVTv2Backbone, PVTv2Classifier

mindcv = pytest.importorskip("mindcv")
from pvt_dense.integrations import mindcv as pvt_mindcv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
YOLO_CONFIG = ROOT / "configs" / "detection" / "yolov8_pvt_tiny_coco.yaml"


@pytest.fixture(scope="module", autouse=True)
def registered():
    pvt_mindcv.register()


def test_mindcv_v2_names_point_at_pvt_dense_with_mindcvs_published_urls():
    from mindcv.models.registry import list_models, model_entrypoint
    for name in ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"):
        assert name in list_models()
        assert model_entrypoint(name) is getattr(pvt_mindcv, name)
    assert pvt_mindcv.default_cfgs["pvt_v2_b0"]["url"].endswith("/pvt_v2_b0-1c4f6683.ckpt")
    assert pvt_mindcv.default_cfgs["pvt_v2_b2_li"]["url"] == ""  # mindcv publishes no b2_li


def test_mindcv_features_only_builds_the_pvt_dense_v2_backbone(pynative, images):
    features = mindcv.models.create_model("pvt_v2_b2", features_only=True, out_indices=[1, 2, 3], drop_path_rate=0.1)
    assert isinstance(features, PVTv2Backbone)
    assert features.out_channels == (128, 320, 512)
    assert [(info["chs"], info["reduction"], info["name"]) for info in features.feature_info] == [
        (128, 8, "stages.1"), (320, 16, "stages.2"), (512, 32, "stages.3")]
    reference = pvt_dense.create_backbone("pvt_v2_b2", out_indices=(1, 2, 3))
    reference_params = reference.parameters_dict()
    assert sorted(reference_params) == sorted(features.parameters_dict())
    for name, param in features.parameters_dict().items():
        reference_params[name].set_data(param.data)
    x = images(61, 95, uniform=True)
    for net in (features, reference):
        net.set_train(False)
    outs = features(x)
    assert [o.shape for o in outs] == [(1, 128, 8, 12), (1, 320, 4, 6), (1, 512, 2, 3)]
    for ours, theirs in zip(outs, reference(x), strict=True):
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


def test_mindyolo_pvt_row_takes_a_v2_size(pynative, images):
    pytest.importorskip("mindyolo")
    from mindyolo.models import create_model
    from mindyolo.models.layers import SPPF
    from mindyolo.utils.config import Config, load_config
    from pvt_dense.integrations import mindyolo as pvt_mindyolo
    pvt_mindyolo.register()
    cfg = Config(load_config(str(YOLO_CONFIG))[0])
    cfg.network.backbone[0][3] = ["pvt_v2_b0", "drop_path_rate=0.0"]
    net = create_model(model_name=cfg.network.model_name, model_cfg=cfg.network, num_classes=2)
    rows = net.model.model
    assert isinstance(rows[0].backbone, PVTv2Backbone) and rows[0].backbone.out_indices == (1, 2, 3)
    assert [(rows[i].stage, rows[i].channels, rows[i].stride) for i in (1, 2, 3)] == [(1, 64, 8), (2, 160, 16),
                                                                                      (3, 256, 32)]
    assert isinstance(rows[4], SPPF) and rows[4].conv1.conv.in_channels == 256
    net.set_train(False)
    predictions, maps = net(images(64, 96, uniform=True))
    assert [m.shape for m in maps] == [(1, 66, 8, 12), (1, 66, 4, 6), (1, 66, 2, 3)]
    assert np.isfinite(predictions.asnumpy()).all()
