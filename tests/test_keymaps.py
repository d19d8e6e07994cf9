"""Key mapping between PVT v1 checkpoint formats and pvt_dense's native names.

The expected names of each format are written out here independently of the tables in keymaps.py, from the
sources: whai362/PVT classification/pvt.py (official), transformers' modeling_pvt.py (HF, checked against a real
model), mindcv/models/pvt.py (MindCV, checked against a real model when MindCV imports).
"""

from __future__ import annotations

import numpy as np
import pytest

from pvt_dense.checkpoint import keymaps
from pvt_dense.checkpoint.keymaps import detect_format, from_native, native_to_mindcv, to_native
from pvt_dense.errors import CheckpointError

# A small PVT that keeps PVT v1's structure: 4 stages, heads 1/2/5/8, sr 8/4/2/1, mlp 8/8/4/4, patches 4/2/2/2.
DIMS = (8, 16, 40, 64)
HEADS = (1, 2, 5, 8)
DEPTHS = (1, 2, 1, 2)
SR = (8, 4, 2, 1)
MLP = (8, 8, 4, 4)
PATCH = (4, 2, 2, 2)
IMG = 64
CLASSES = 7


def native_shapes(classifier: bool = True) -> dict[str, tuple[int, ...]]:
    """Every native key of the small PVT above, with its shape."""
    shapes = {}
    grid, in_ch = IMG, 3
    for s, (c, depth, sr, mlp, patch) in enumerate(zip(DIMS, DEPTHS, SR, MLP, PATCH, strict=True)):
        grid //= patch
        stage = f"stages.{s}."
        shapes[stage + "patch_embed.proj.weight"] = (c, in_ch, patch, patch)
        shapes[stage + "patch_embed.proj.bias"] = (c,)
        shapes[stage + "patch_embed.norm.gamma"] = (c,)
        shapes[stage + "patch_embed.norm.beta"] = (c,)
        shapes[stage + "pos_embed"] = (1, grid * grid + (s == 3 and classifier), c)
        for j in range(depth):
            b = f"{stage}blocks.{j}."
            shapes.update({b + "norm1.gamma": (c,), b + "norm1.beta": (c,)})
            shapes.update({b + "attn.q.weight": (c, c), b + "attn.q.bias": (c,)})
            shapes.update({b + "attn.kv.weight": (2 * c, c), b + "attn.kv.bias": (2 * c,)})
            shapes.update({b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,)})
            if sr > 1:
                shapes.update({b + "attn.sr.weight": (c, c, sr, sr), b + "attn.sr.bias": (c,)})
                shapes.update({b + "attn.norm.gamma": (c,), b + "attn.norm.beta": (c,)})
            shapes.update({b + "norm2.gamma": (c,), b + "norm2.beta": (c,)})
            shapes.update({b + "mlp.fc1.weight": (c * mlp, c), b + "mlp.fc1.bias": (c * mlp,)})
            shapes.update({b + "mlp.fc2.weight": (c, c * mlp), b + "mlp.fc2.bias": (c,)})
        in_ch = c
    if classifier:
        shapes.update({"cls_token": (1, 1, DIMS[3]), "norm.gamma": (DIMS[3],), "norm.beta": (DIMS[3],)})
        shapes.update({"head.weight": (CLASSES, DIMS[3]), "head.bias": (CLASSES,)})
    return shapes


def official_name(native: str) -> str:
    """The whai362/PVT name of a native key, spelled out by hand."""
    parts = native.split(".")
    if parts[0] == "stages":
        i, rest = int(parts[1]) + 1, parts[2:]
        if rest[0] == "pos_embed":
            name = f"pos_embed{i}"
        elif rest[0] == "patch_embed":
            name = f"patch_embed{i}." + ".".join(rest[1:])
        else:  # blocks.{j}.module...
            name = f"block{i}." + ".".join(rest[1:])
    else:
        name = native
    return name.replace(".gamma", ".weight").replace(".beta", ".bias")


def mindcv_name(native: str) -> str:
    """The MindCV 0.3.0 name of a native key, spelled out by hand."""
    parts = native.split(".")
    if parts[0] != "stages":
        return native
    s, rest = int(parts[1]), parts[2:]
    if rest[0] == "pos_embed":
        return f"pos_embed{s + 1}"
    if rest[0] == "patch_embed":
        return f"patch_embed{s + 1}." + ".".join(rest[1:])
    return f"Blocks.{s}." + ".".join(rest[1:])


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in shapes.items()}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert np.array_equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------------- official


def test_official_mapping_is_a_bijection():
    native = random_state(native_shapes())
    official = {official_name(k): v for k, v in native.items()}
    assert len(official) == len(native)  # the hand-written naming is one-to-one
    assert detect_format(official) == "official"

    converted, notes = to_native(official)
    assert notes[0] == "format: official"
    # every native key produced exactly once, each from the tensor with the corresponding official name
    assert_same_arrays(converted, native)
    # and back: the same official names and tensors
    assert_same_arrays(from_native(converted, "official"), official)


def test_official_detection_backbone_with_mmdet_prefix():
    # mmdetection checkpoint of the PVT detection backbone: no cls_token/norm/head; neck and heads beside it.
    native = random_state(native_shapes(classifier=False), seed=1)
    native["stages.3.pos_embed"] = np.zeros((1, 5, DIMS[3]), np.float32)  # detection keeps the unused cls slot
    ckpt = {"backbone." + official_name(k): v for k, v in native.items()}
    ckpt["neck.lateral_convs.0.conv.weight"] = np.zeros((4, 8, 1, 1), np.float32)
    ckpt["rpn_head.rpn_conv.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    assert detect_format(ckpt) == "official"

    converted, notes = to_native(ckpt)
    assert_same_arrays(converted, native)
    assert any("stripped prefix 'backbone.'" in n and "ignored 2 keys" in n for n in notes)


def test_official_half_precision_is_cast():
    native = random_state(native_shapes())
    official = {official_name(k): v.astype(np.float16) for k, v in native.items()}
    converted, notes = to_native(official)
    assert all(v.dtype == np.float32 for v in converted.values())
    assert any(n.startswith(f"cast {len(native)} float16 tensors to float32") for n in notes)


@pytest.mark.bad_input("checkpoint (any format)",
                       "an official PVT checkpoint with an extra PVT v2 key (block1.0.mlp.dwconv.dwconv.weight)",
                       "CheckpointError naming the key; with strict=False it is ignored with a note")
def test_official_unknown_key_is_an_error_unless_lenient():
    official = {official_name(k): v for k, v in random_state(native_shapes()).items()}
    official["block1.0.mlp.dwconv.dwconv.weight"] = np.zeros((64, 1, 3, 3), np.float32)  # a PVT v2 layer
    with pytest.raises(CheckpointError, match="dwconv"):
        to_native(official)
    converted, notes = to_native(official, strict=False)
    assert sorted(converted) == sorted(native_shapes())
    assert any("ignored 1 unrecognised" in n for n in notes)


@pytest.mark.bad_input("checkpoint (any format)",
                       "an official checkpoint with a key of stage 0 (block0.0.norm1.weight; official stages count "
                       "from 1)",
                       "CheckpointError naming the key")
def test_official_stage_numbers_start_at_one():
    official = {official_name(k): v for k, v in random_state(native_shapes()).items()}
    official["block0.0.norm1.weight"] = np.zeros(8, np.float32)
    with pytest.raises(CheckpointError, match="block0.0.norm1.weight"):
        to_native(official)


# ---------------------------------------------------------------------------------------------------- HuggingFace


@pytest.fixture(scope="module")
def hf_models():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.PvtConfig(
        image_size=IMG,
        hidden_sizes=list(DIMS),
        num_attention_heads=list(HEADS),
        depths=list(DEPTHS),
        sequence_reduction_ratios=list(SR),
        mlp_ratios=list(MLP),
        patch_sizes=list(PATCH),
        strides=list(PATCH),
        num_labels=CLASSES,
    )
    classifier = transformers.PvtForImageClassification(config)
    bare = transformers.PvtModel(config)

    def to_numpy(model):
        return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}

    return to_numpy(classifier), to_numpy(bare)


def test_hf_names_are_the_ones_transformers_uses(hf_models):
    hf, bare = hf_models
    # spot checks of the real names (the whole set is checked through the conversion below)
    for key in (
        "pvt.encoder.patch_embeddings.0.projection.weight",
        "pvt.encoder.patch_embeddings.0.layer_norm.weight",
        "pvt.encoder.patch_embeddings.0.position_embeddings",
        "pvt.encoder.patch_embeddings.3.cls_token",
        "pvt.encoder.block.0.0.attention.self.query.weight",
        "pvt.encoder.block.0.0.attention.self.key.weight",
        "pvt.encoder.block.0.0.attention.self.value.bias",
        "pvt.encoder.block.0.0.attention.self.sequence_reduction.weight",
        "pvt.encoder.block.0.0.attention.self.layer_norm.bias",
        "pvt.encoder.block.0.0.attention.output.dense.weight",
        "pvt.encoder.block.1.1.layer_norm_2.weight",
        "pvt.encoder.block.3.1.mlp.dense2.bias",
        "pvt.encoder.layer_norm.weight",
        "classifier.weight",
    ):
        assert key in hf, key
    assert hf["pvt.encoder.patch_embeddings.3.position_embeddings"].shape == (1, 5, DIMS[3])  # cls slot first
    assert "pvt.encoder.block.3.0.attention.self.sequence_reduction.weight" not in hf  # sr == 1 in stage 4
    assert sorted(bare) == sorted(k[len("pvt."):] for k in hf if k.startswith("pvt."))


def test_hf_classifier_converts_to_every_native_key(hf_models):
    hf, _ = hf_models
    assert detect_format(hf) == "huggingface"
    native, notes = to_native(hf)

    expected = native_shapes()
    assert sorted(native) == sorted(expected)
    for key, shape in expected.items():
        assert native[key].shape == shape, key
        assert native[key].dtype == np.float32, key
    assert "merged HF key/value into kv (keys first) for 6 blocks" in notes

    # kv: rows [0:C] are the HF key layer, rows [C:2C] the HF value layer
    for s, depth in enumerate(DEPTHS):
        c = DIMS[s]
        for j in range(depth):
            hf_attn = f"pvt.encoder.block.{s}.{j}.attention.self."
            for leaf in ("weight", "bias"):
                kv = native[f"stages.{s}.blocks.{j}.attn.kv.{leaf}"]
                assert np.array_equal(kv[:c], hf[hf_attn + f"key.{leaf}"])
                assert np.array_equal(kv[c:], hf[hf_attn + f"value.{leaf}"])
                assert np.array_equal(native[f"stages.{s}.blocks.{j}.attn.q.{leaf}"], hf[hf_attn + f"query.{leaf}"])

    # the tensors with no counterpart in the official layout
    assert np.array_equal(native["cls_token"], hf["pvt.encoder.patch_embeddings.3.cls_token"])
    assert np.array_equal(native["head.weight"], hf["classifier.weight"])
    assert np.array_equal(native["norm.gamma"], hf["pvt.encoder.layer_norm.weight"])
    assert np.array_equal(native["stages.3.pos_embed"], hf["pvt.encoder.patch_embeddings.3.position_embeddings"])

    # every HF tensor lands somewhere: converting back reproduces the HF dict exactly
    assert_same_arrays(from_native(native, "huggingface"), hf)


def test_hf_bare_model_without_prefix(hf_models):
    hf, bare = hf_models
    assert detect_format(bare) == "huggingface"
    native, _ = to_native(bare)
    assert sorted(native) == sorted(k for k in native_shapes() if not k.startswith("head."))


@pytest.mark.bad_input("checkpoint (any format)",
                       "a HuggingFace checkpoint missing one attention value weight",
                       "CheckpointError naming the tensor it cannot build (stages.2.blocks.0.attn.kv.weight)")
def test_hf_missing_value_layer_is_an_error(hf_models):
    hf, _ = hf_models
    broken = {k: v for k, v in hf.items() if k != "pvt.encoder.block.2.0.attention.self.value.weight"}
    with pytest.raises(CheckpointError, match="stages.2.blocks.0.attn.kv.weight"):
        to_native(broken)


# ---------------------------------------------------------------------------------------------------------- MindCV


def mindcv_state(seed: int = 2) -> dict[str, np.ndarray]:
    """A MindCV-format dict as MindCV keeps it: pos embeds float16, everything else float32."""
    out = {}
    for key, value in random_state(native_shapes(), seed).items():
        name = mindcv_name(key)
        out[name] = value.astype(np.float16) if name.startswith("pos_embed") else value
    return out


def test_mindcv_round_trip_is_exact():
    original = mindcv_state()
    assert detect_format(original) == "mindcv"
    native, notes = to_native(original)
    assert sorted(native) == sorted(native_shapes())
    assert all(v.dtype == np.float32 for v in native.values())
    assert "cast 4 float16 pos embeds to float32" in notes
    assert_same_arrays(native_to_mindcv(native), original)


def test_mindcv_training_state_is_ignored():
    ckpt = mindcv_state()
    ckpt["moments.Blocks.0.0.attn.q.weight"] = np.zeros((8, 8), np.float32)
    ckpt["global_step"] = np.array([100], np.int32)
    ckpt["learning_rate"] = np.array(0.1, np.float32)
    native, notes = to_native(ckpt)
    assert sorted(native) == sorted(native_shapes())
    assert any(n.startswith("ignored 3 training-state entries") for n in notes)


def test_mindcv_names_match_a_real_mindcv_model():
    pvt = pytest.importorskip("mindcv.models.pvt")
    model = pvt.PyramidVisionTransformer(
        img_size=IMG, patch_size=PATCH[0], num_classes=CLASSES, embed_dims=list(DIMS), num_heads=list(HEADS),
        mlp_ratios=list(MLP), qkv_bias=True, depths=list(DEPTHS), sr_ratios=list(SR),
    )
    real = {name: p.asnumpy() for name, p in model.parameters_and_names()}
    assert detect_format(real) == "mindcv"
    native, _ = to_native(real)
    expected = native_shapes()
    assert sorted(native) == sorted(expected)
    assert {k: v.shape for k, v in native.items()} == expected
    assert_same_arrays(native_to_mindcv(native), real)


# ---------------------------------------------------------------------------------------------------------- native


def test_native_returns_early_and_keeps_extra_keys():
    native = random_state(native_shapes(classifier=False))
    native["stages.0.pos_embed"] = native["stages.0.pos_embed"].astype(np.float16)
    native["neck.fpn.0.weight"] = np.ones((2, 2), np.float32)  # a dense head's weight stays untouched
    assert detect_format(native) == "native"
    converted, notes = to_native(native)
    assert sorted(converted) == sorted(native)
    assert converted["stages.0.pos_embed"].dtype == np.float32
    assert notes == ["format: native", "cast 1 float16 pos embeds to float32"]


# ------------------------------------------------------------------------------------------------ detection errors


@pytest.mark.bad_input("checkpoint (any format)",
                       "a checkpoint of another architecture (ResNet keys)",
                       "CheckpointError: not a PVT v1 or v2 checkpoint in any known format, listing its first keys")
def test_unknown_format_lists_keys():
    with pytest.raises(CheckpointError, match="'layer1.0.conv1.weight'"):
        detect_format({"layer1.0.conv1.weight": np.zeros(1), "fc.weight": np.zeros(1)})


@pytest.mark.bad_input("checkpoint (any format)",
                       "a checkpoint holding only head.weight and head.bias",
                       "CheckpointError: its keys fit several formats equally well")
def test_ambiguous_format_is_an_error():
    with pytest.raises(CheckpointError, match="equally"):
        detect_format({"head.weight": np.zeros((2, 2)), "head.bias": np.zeros(2)})


@pytest.mark.bad_input("checkpoint (any format)",
                       "a wrapper {'model': {...}, 'epoch': 3} where a state dict is expected",
                       "CheckpointError naming 'model' as the dict to unwrap")
def test_wrapped_checkpoint_asks_to_unwrap():
    with pytest.raises(CheckpointError, match="'model'"):
        detect_format({"model": {"block1.0.norm1.weight": np.zeros(1)}, "epoch": 3})


@pytest.mark.bad_input("checkpoint (any format)",
                       "an empty state dict",
                       "CheckpointError: the checkpoint holds no tensors")
def test_empty_checkpoint_is_an_error():
    with pytest.raises(CheckpointError):
        to_native({})


@pytest.mark.bad_input("checkpoint (any format)",
                       "conversion to an unknown format name ('timm')",
                       "CheckpointError listing the formats it can write")
def test_from_native_rejects_unknown_format():
    with pytest.raises(CheckpointError):
        from_native({}, "timm")


def test_module_has_no_framework_imports():
    with open(keymaps.__file__) as f:
        source = f.read()
    assert "torch" not in source.replace("no torch", "") and "import mindspore" not in source
