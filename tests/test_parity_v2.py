"""PVT v2 against implementations not written here: timm's `pvt_v2_*`, HuggingFace transformers' `PvtV2` and
mmdetection 3.3's `PyramidVisionTransformerV2`, all on torch CPU.

Random weights are made on the torch side and saved in each library's own layout (timm: a state_dict .pth;
HF: `save_pretrained` .safetensors and a .bin pickle; mmdet: a detector checkpoint with the backbone under
`backbone.`); our loader converts and loads them. Compared: logits at 224x224 and the four stage maps at an odd
size. HF and mmdet use one LayerNorm eps (1e-6) everywhere, where the official code (and timm) use PyTorch's
default 1e-5 in the patch-embedding and spatial-reduction norms; those norms are set to the official eps on the
torch side, where it is visible. Costs on 2 CPU cores: pvt_v2_b0 compiles two graphs (~20 s); the rest runs
eagerly; the parameter-count test builds all seven classifiers (~45 s).
"""
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

import pvt_dense
from pvt_dense.checkpoint import load_pretrained
from pvt_dense.errors import CheckpointError
from pvt_dense.models.pvt import parameter_count
from pvt_dense.models.pvt_v2 import PVT_V2_SPECS

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
ODD_SIZE = (97, 131)

# Classifier parameters (1000 classes) in millions, from the table of whai362/PVT's README (branch v2,
# "Image Classification"); the exact counts are timm's models' (built on torch's meta device in the test).
OFFICIAL_PARAMS_M = {"pvt_v2_b0": 3.7, "pvt_v2_b1": 14.0, "pvt_v2_b2": 25.4, "pvt_v2_b2_li": 22.6,
                     "pvt_v2_b3": 45.2, "pvt_v2_b4": 62.6, "pvt_v2_b5": 82.0}
SIZES = sorted(PVT_V2_SPECS)


def randomise(model, seed):
    """Weights where every tensor matters: LayerNorm scales around 1, matrices scaled by fan-in, biases non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1 and name.endswith("weight"):  # a LayerNorm scale in all three libraries
                param.copy_(1.0 + 0.2 * noise)
            elif param.dim() >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def assert_close(ours, theirs, what):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, what
    diff = float(np.abs(ours - theirs).max())
    assert diff <= TOLERANCE, f"{what}: max abs diff {diff}"


def run(net, x):
    net.set_train(False)
    out = net(ms.Tensor(x))
    return [o.asnumpy() for o in out] if isinstance(out, tuple) else out.asnumpy()


@pytest.fixture(scope="module")
def timm_b0(tmp_path_factory):
    model = randomise(timm.create_model("pvt_v2_b0", num_classes=1000), seed=0)
    path = tmp_path_factory.mktemp("timm") / "pvt_v2_b0.pth"
    torch.save(model.state_dict(), path)
    return model, path


# --------------------------------------------------------------------------------------------------- parameters


# Official classification/configs/pvt_v2/*.py of whai362/PVT: (drop_path, clip_grad).
OFFICIAL_RECIPES = {"pvt_v2_b0": (0.1, None), "pvt_v2_b1": (0.1, None), "pvt_v2_b2": (0.1, None),
                    "pvt_v2_b2_li": (0.1, None), "pvt_v2_b3": (0.3, 1.0), "pvt_v2_b4": (0.3, 1.0),
                    "pvt_v2_b5": (0.3, 1.0)}


@pytest.mark.parametrize("name", SIZES)
def test_every_recipe_builds_a_model_with_the_official_parameter_count(name, pynative, images):
    from pvt_dense.classification.config import load_classification_config
    cfg = load_classification_config(ROOT / "configs" / "classification" / f"{name}.yaml")
    drop_path, clip = OFFICIAL_RECIPES[name]
    assert cfg.model == name and cfg.drop_path_rate == drop_path
    assert (cfg.clip_grad, cfg.clip_value) == ((True, 1.0) if clip else (False, 1.0))
    # classification/main.py: lr 5e-4 scaled by the global batch over 512, wd 0.05, 300 epochs, 5 warmup epochs
    # from 1e-6, cosine to 1e-5, label smoothing 0.1, mixup 0.8, cutmix 1.0, random erasing 0.25.
    global_batch = cfg.batch_size * 8
    assert cfg.lr == pytest.approx(5e-4 * global_batch / 512) and not cfg.scale_lr_with_batch
    assert (cfg.opt, cfg.weight_decay, cfg.epoch_size, cfg.warmup_epochs, cfg.min_lr) == ("adamw", 0.05, 300, 5, 1e-5)
    assert cfg.lr * cfg.warmup_factor == pytest.approx(1e-6)
    assert (cfg.label_smoothing, cfg.mixup, cfg.cutmix, cfg.re_prob) == (0.1, 0.8, 1.0, 0.25)

    net = pvt_dense.create_model(cfg.model, num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path_rate)
    with torch.device("meta"):
        reference = timm.create_model(name, num_classes=1000)
    expected = sum(p.numel() for p in reference.parameters())
    assert parameter_count(net) == expected
    assert round(expected / 1e6, 1) == OFFICIAL_PARAMS_M[name]
    if name == "pvt_v2_b0":  # the others' forwards are slow eagerly; the parity tests run b0, b2_li and b2_li's maps
        assert run(net, images(64, 64).asnumpy()).shape == (1, 1000)


@pytest.mark.parametrize("name", SIZES)
def test_every_detection_and_segmentation_recipe_builds_on_the_v2_backbone(name, pynative, images):
    """RetinaNet 1x and Semantic FPN configs: the neck and head take their sizes from the backbone, and both run a
    forward on a small image (eagerly: one compile per size would cost more than the forward)."""
    from pvt_dense.detection.build import build_retinanet
    from pvt_dense.detection.config import load_detection_config
    from pvt_dense.segmentation.build import build_segmentor
    from pvt_dense.segmentation.config import load_segmentation_config
    det_cfg = load_detection_config(ROOT / "configs" / "detection" / f"retinanet_{name}_fpn_1x_coco.yaml")
    seg_cfg = load_segmentation_config(ROOT / "configs" / "segmentation" / f"semfpn_{name}_ade20k_40k.yaml",
                                       ["--pretrained", ""])
    assert det_cfg.backbone == seg_cfg.backbone == name
    assert det_cfg.pretrained == f"{name}.pth"
    # whai362/PVT detection/configs/retinanet_pvt_v2_*_fpn_1x_coco.py and detection/pvt_v2.py.
    assert (det_cfg.lr, det_cfg.weight_decay, det_cfg.epochs, det_cfg.drop_path_rate) == (1e-4, 1e-4, 12, 0.1)
    assert (seg_cfg.lr, seg_cfg.total_iters) == (2e-4, 40000)
    detector = build_retinanet(det_cfg, load_pretrained=False)
    spec = PVT_V2_SPECS[name]
    assert detector.backbone.out_channels == spec.embed_dims and detector.backbone.strides == (4, 8, 16, 32)
    # Semantic FPN's backbone options equal RetinaNet's, so the same backbone serves both here.
    assert (seg_cfg.drop_path_rate, seg_cfg.frozen_stages, list(seg_cfg.out_indices)) == (
        det_cfg.drop_path_rate, det_cfg.frozen_stages, list(det_cfg.out_indices))
    segmentor = build_segmentor(seg_cfg, backbone=detector.backbone)
    x = images(64, 96).asnumpy()
    outs = run(detector, x)
    cls_scores, box_deltas = outs[:5], outs[5:]
    assert [c.shape[2:] for c in cls_scores] == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    assert len(box_deltas) == 5
    assert run(segmentor, x).shape == (1, 150, 16, 24)


# --------------------------------------------------------------------------------------------------------- timm


def test_timm_checkpoint_matches_timm_in_graph_mode(timm_b0, graph_mode, images):
    model, path = timm_b0
    x = images(224, 224).asnumpy()
    classifier = pvt_dense.create_model("pvt_v2_b0", pretrained=str(path))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert_close(run(classifier, x), expected, "logits")

    # The classifier checkpoint feeds the backbone (head dropped); stage maps at an odd size.
    backbone = pvt_dense.create_backbone("pvt_v2_b0", pretrained=str(path))
    x = images(*ODD_SIZE, seed=1).asnumpy()
    with torch.no_grad():
        expected = model.forward_intermediates(torch.from_numpy(x), intermediates_only=True)
    ours = run(backbone, x)
    assert [o.shape[2:] for o in ours] == [(25, 33), (13, 17), (7, 9), (4, 5)] == [
        grid for grid in PVT_V2_SPECS["pvt_v2_b0"].stage_grids(*ODD_SIZE)]
    for stage, (mine, theirs) in enumerate(zip(ours, expected, strict=True)):
        assert_close(mine, theirs.numpy(), f"stage {stage}")


def test_convert_weights_tool_writes_a_native_checkpoint_that_loads(timm_b0, tmp_path, pynative):
    model, path = timm_b0
    dst = tmp_path / "pvt_v2_b0.ckpt"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_weights.py"), str(path), str(dst)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pvt_v2_b0 classifier" in done.stdout and "timm (PVT v2) format" in done.stdout
    net = pvt_dense.create_model("pvt_v2_b0", pretrained=str(dst))
    weights = {p.name: p.asnumpy() for p in net.get_parameters()}
    state = model.state_dict()
    np.testing.assert_array_equal(weights["stages.0.patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    np.testing.assert_array_equal(weights["stages.2.patch_embed.norm.gamma"], state["stages.2.downsample.norm.weight"])
    np.testing.assert_array_equal(weights["stages.3.norm.beta"], state["stages.3.norm.bias"])


def test_gradients_match_timm_for_linear_attention(tmp_path, pynative):
    """Every parameter's gradient of a training-mode loss, b2_li (adaptive pooling, depth-wise conv, the fused
    GELU/LayerNorm/Linear kernels all backpropagate), against torch autograd on timm's model."""
    model = randomise(timm.create_model("pvt_v2_b2_li", num_classes=10), seed=6).train()
    path = tmp_path / "pvt_v2_b2_li.pth"
    torch.save(model.state_dict(), path)
    net = pvt_dense.create_model("pvt_v2_b2_li", num_classes=10, pretrained=str(path))
    net.set_train(True)
    x = np.random.default_rng(7).standard_normal((2, 3, 64, 64)).astype(np.float32)
    params = net.trainable_params()
    loss, grads = ms.value_and_grad(lambda pixels: (net(pixels) ** 2).sum(), None, params)(ms.Tensor(x))
    expected_loss = (model(torch.from_numpy(x)) ** 2).sum()
    expected_loss.backward()
    assert float(loss.asnumpy()) == pytest.approx(float(expected_loss.detach()), rel=1e-5)
    from pvt_dense.checkpoint.keymaps import to_native
    expected = to_native({k: p.grad.numpy() for k, p in model.named_parameters()})[0]
    assert sorted(expected) == sorted(p.name for p in params)
    for param, grad in zip(params, grads, strict=True):
        reference = expected[param.name]
        worst = float(np.abs(grad.asnumpy() - reference).max() / (np.abs(reference).max() + 1e-12))
        assert worst <= TOLERANCE, f"{param.name}: relative gradient difference {worst}"


# -------------------------------------------------------------------------------------------------- HuggingFace


def hf_model(name, seed):
    transformers = pytest.importorskip("transformers")
    spec = PVT_V2_SPECS[name]
    config = transformers.PvtV2Config(
        hidden_sizes=list(spec.embed_dims), depths=list(spec.depths), num_attention_heads=list(spec.num_heads),
        mlp_ratios=list(spec.mlp_ratios), sr_ratios=list(spec.sr_ratios), patch_sizes=list(spec.patch_sizes),
        strides=list(spec.patch_strides), linear_attention=spec.linear, qkv_bias=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0, layer_norm_eps=1e-6, num_labels=1000)
    model = randomise(transformers.PvtV2ForImageClassification(config), seed)
    for layer in model.pvt_v2.encoder.layers:
        layer.patch_embedding.layer_norm.eps = 1e-5
        for block in layer.blocks:
            if hasattr(block.attention, "layer_norm"):
                block.attention.layer_norm.eps = 1e-5
    return model


@pytest.mark.parametrize("name, saved_as", [("pvt_v2_b2_li", "safetensors"), ("pvt_v2_b0", "bin")])
def test_huggingface_matches_hf_in_pynative(name, saved_as, tmp_path, pynative, images):
    model = hf_model(name, seed=1)
    if saved_as == "safetensors":
        model.save_pretrained(tmp_path, safe_serialization=True)
        path = tmp_path / "model.safetensors"
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(model.state_dict(), path)
    x = images(224, 224, seed=2).asnumpy()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).logits.numpy()
    classifier = pvt_dense.create_model(name, pretrained=str(path))
    assert_close(run(classifier, x), expected, "logits")
    if saved_as == "bin":
        return  # the stage maps once (b2_li) are enough
    x = images(*ODD_SIZE, seed=3).asnumpy()
    with torch.no_grad():
        expected = model.pvt_v2(torch.from_numpy(x), output_hidden_states=True).hidden_states
    backbone = pvt_dense.create_backbone(name, pretrained=str(path))
    for stage, (mine, theirs) in enumerate(zip(run(backbone, x), expected, strict=True)):
        assert_close(mine, theirs.numpy(), f"stage {stage}")


# ------------------------------------------------------------------------------------------------- mmdetection


def test_mmdetection_detector_checkpoint_matches_mmdet_stage_maps(tmp_path, pynative, images):
    from mmlab_reference import require_mmdet
    require_mmdet()
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict
    backbone = MODELS.build(ConfigDict(type="PyramidVisionTransformerV2", embed_dims=32, num_layers=[2, 2, 2, 2],
                                       num_heads=[1, 2, 5, 8], drop_path_rate=0.0))
    randomise(backbone, seed=4)
    for layer in backbone.layers:
        layer[0].norm.eps = 1e-5  # patch embedding
        for block in layer[1]:
            if hasattr(block.attn, "norm"):
                block.attn.norm.eps = 1e-5  # spatial reduction
    # A detector checkpoint as mmdet saves it: weights under 'state_dict', the backbone under 'backbone.'.
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 64, 1, 1)
    path = tmp_path / "retinanet_pvtv2-b0_fpn_1x_coco.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, path)

    x = images(*ODD_SIZE, seed=5).asnumpy()
    with torch.no_grad():
        expected = backbone(torch.from_numpy(x))
    ours = pvt_dense.create_backbone("pvt_v2_b0", pretrained=str(path))
    for stage, (mine, theirs) in enumerate(zip(run(ours, x), expected, strict=True)):
        assert_close(mine, theirs.numpy(), f"stage {stage}")


# -------------------------------------------------------------------------------------------- variant mismatch


@pytest.mark.bad_input("checkpoint (any format)",
                       "a pvt_v2_b1 checkpoint loaded into pvt_v2_b0, a b2_li one into b2, a v1 one into v2",
                       "CheckpointError: does not fit pvt_v2_b0, naming the checkpoint's own size (pvt_v2_b1); no "
                       "weight changes")
def test_checkpoint_of_another_variant_is_refused_naming_it(tmp_path, pynative):
    # A backbone of stage 0 only is enough to see the mismatch (b2's 8x8 reduction conv against b2_li's 1x1), and
    # the error still names the size of the whole checkpoint.
    cases = [("pvt_v2_b1", lambda: pvt_dense.create_model("pvt_v2_b0", num_classes=10), "pvt_v2_b0"),
             ("pvt_v2_b2_li", lambda: pvt_dense.create_backbone("pvt_v2_b2", out_indices=(0,)), "pvt_v2_b2")]
    for source, build, target in cases:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in timm.create_model(source, num_classes=10).state_dict().items()}
        path = tmp_path / f"{source}.pth"
        torch.save({k: torch.full(s, 0.5) for k, s in shapes.items()}, path)
        net = build()
        before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
        with pytest.raises(CheckpointError, match=f"does not fit {target}.*another PVT size: {source}"):
            load_pretrained(net, str(path))
        for p in net.get_parameters():
            np.testing.assert_array_equal(p.asnumpy(), before[p.name])
    v1 = {p.name: p.asnumpy() for p in pvt_dense.create_backbone("pvt_tiny").get_parameters()}
    path = tmp_path / "pvt_tiny.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in v1.items()], str(path))
    with pytest.raises(CheckpointError, match="does not fit pvt_v2_b1.*another PVT size: pvt_tiny"):
        pvt_dense.create_backbone("pvt_v2_b1", pretrained=str(path))


def test_every_variant_is_inferred_from_its_weights():
    from pvt_dense.checkpoint import infer_model_name
    from pvt_dense.checkpoint.keymaps import to_native
    for name in SIZES:
        with torch.device("meta"):
            keys = timm.create_model(name, num_classes=1000).state_dict()
        state = {k: np.zeros(tuple(v.shape), np.float32) for k, v in keys.items()}
        assert infer_model_name(to_native(state)[0]) == name


# ------------------------------------------------------------------------------- writing: ours -> their layouts


@pytest.fixture(scope="module")
def ours_b0_native():
    """Our pvt_v2_b0 classifier with random weights (LayerNorm scales around 1, matrices by fan-in), as native
    arrays."""
    net = pvt_dense.create_model("pvt_v2_b0", num_classes=1000)
    rng = np.random.default_rng(12)
    state = {}
    for param in net.get_parameters():
        noise = rng.standard_normal(param.shape).astype(np.float32)
        if param.name.endswith("gamma"):
            state[param.name] = 1.0 + 0.2 * noise
        elif len(param.shape) >= 2:
            state[param.name] = noise / float(np.prod(param.shape[1:])) ** 0.5
        else:
            state[param.name] = 0.1 * noise
    return state


def written_and_reloaded(state, fmt, tmp_path):
    """`from_native` into `fmt`, saved with torch.save and read back as the framework's users would."""
    from pvt_dense.checkpoint.keymaps import from_native
    path = tmp_path / f"pvt_v2_b0_{fmt}.pth"
    torch.save({k: torch.from_numpy(v) for k, v in from_native(state, fmt).items()}, path)
    return torch.load(path, weights_only=True)


def ours_from_native(state, x, backbone=False):
    net = pvt_dense.create_backbone("pvt_v2_b0") if backbone else pvt_dense.create_model("pvt_v2_b0")
    for param in net.get_parameters():
        param.set_data(ms.Tensor(state[param.name]))
    return run(net, x)


@pytest.mark.parametrize("fmt", ["timm", "official", "huggingface"])
def test_written_classifier_loads_into_timm_and_hf_with_the_same_logits(fmt, ours_b0_native, tmp_path, pynative,
                                                                        images):
    x = images(64, 96, seed=13).asnumpy()
    expected = ours_from_native(ours_b0_native, x)
    written = written_and_reloaded(ours_b0_native, fmt, tmp_path)
    if fmt == "huggingface":
        model = hf_model("pvt_v2_b0", seed=14)  # random weights, all replaced below
        model.load_state_dict(written, strict=True)
        with torch.no_grad():
            theirs = model(torch.from_numpy(x)).logits.numpy()
    else:
        from timm.models.pvt_v2 import checkpoint_filter_fn
        model = timm.create_model("pvt_v2_b0", num_classes=1000).eval()
        if fmt == "official":  # timm reads official checkpoints through its own filter
            written = checkpoint_filter_fn(written, model)
        model.load_state_dict(written, strict=True)
        with torch.no_grad():
            theirs = model(torch.from_numpy(x)).numpy()
    assert_close(expected, theirs, f"{fmt} logits")


def test_written_backbone_loads_into_mmdetection_with_the_same_stage_maps(ours_b0_native, tmp_path, pynative, images):
    from mmlab_reference import require_mmdet
    require_mmdet()
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict
    without_head = {k: v for k, v in ours_b0_native.items() if not k.startswith("head.")}
    backbone = MODELS.build(ConfigDict(type="PyramidVisionTransformerV2", embed_dims=32, num_layers=[2, 2, 2, 2],
                                       num_heads=[1, 2, 5, 8], drop_path_rate=0.0)).eval()
    for layer in backbone.layers:  # the official eps, as in test_mmdetection_detector_checkpoint_matches_mmdet...
        layer[0].norm.eps = 1e-5
        for block in layer[1]:
            if hasattr(block.attn, "norm"):
                block.attn.norm.eps = 1e-5
    backbone.load_state_dict(written_and_reloaded(without_head, "mmdetection", tmp_path), strict=True)
    x = images(*ODD_SIZE, seed=15).asnumpy()
    with torch.no_grad():
        theirs = backbone(torch.from_numpy(x))
    for stage, (mine, other) in enumerate(zip(ours_from_native(without_head, x, backbone=True), theirs, strict=True)):
        assert_close(mine, other.numpy(), f"stage {stage}")


def test_convert_weights_to_timm_safetensors_and_mmdetection_pth(ours_b0_native, tmp_path, pynative, capsys, images):
    """tools/convert_weights.py --to: our native checkpoint as a timm .safetensors (read by safetensors' own
    loader) and as an mmdetection backbone .pth (the head left out with a note); both load strictly."""
    from safetensors.torch import load_file
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_weights
    src = tmp_path / "ours.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in ours_b0_native.items()], str(src))
    assert convert_weights.main([str(src), str(tmp_path / "b0.safetensors"), "--to", "timm"]) == 0
    model = timm.create_model("pvt_v2_b0", num_classes=1000).eval()
    model.load_state_dict(load_file(str(tmp_path / "b0.safetensors")), strict=True)
    x = images(64, 64, seed=16).asnumpy()
    with torch.no_grad():
        theirs = model(torch.from_numpy(x)).numpy()
    assert_close(ours_from_native(ours_b0_native, x), theirs, "logits")

    assert convert_weights.main([str(src), str(tmp_path / "b0_mmdet.pth"), "--to", "mmdetection"]) == 0
    assert "the classifier head is not written" in capsys.readouterr().out
    written = torch.load(tmp_path / "b0_mmdet.pth", weights_only=True)
    assert written["layers.0.1.0.attn.attn.in_proj_weight"].shape == (96, 32)
    assert written["layers.0.1.0.ffn.layers.0.weight"].shape == (256, 32, 1, 1)
    assert not any(k.startswith("head") for k in written)
