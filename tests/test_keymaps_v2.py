"""PVT v2 checkpoint names: every format's real layout in, pvt_dense's native names out.

The layouts come from the libraries themselves wherever one is installed (timm's and HF's state dicts, MindCV's
own MindSpore model); the official names are written out here and checked against timm's converter from official
checkpoints (`timm.models.pvt_v2.checkpoint_filter_fn`), so the table in keymaps_v2.py is never its own reference.
mmdetection's layout is covered end to end in test_parity_v2.py.
"""
import mindspore as ms
import numpy as np
import pytest

import pvt_dense
from pvt_dense.checkpoint.keymaps import detect_family, detect_format, to_native
from pvt_dense.errors import CheckpointError

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def random_state(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator).numpy() for k, v in module.state_dict().items()}


def official_b0_keys():
    """whai362/PVT classification/pvt_v2.py names for pvt_v2_b0 (depths 2, 2, 2, 2; sr_ratio 1 in stage 4)."""
    keys = []
    for i in range(1, 5):
        keys += [f"patch_embed{i}.proj.weight", f"patch_embed{i}.proj.bias", f"patch_embed{i}.norm.weight",
                 f"patch_embed{i}.norm.bias"]
        for j in range(2):
            block = f"block{i}.{j}."
            modules = ["norm1", "attn.q", "attn.kv", "attn.proj", "norm2", "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2"]
            if i < 4:
                modules += ["attn.sr", "attn.norm"]
            keys += [block + m + leaf for m in modules for leaf in (".weight", ".bias")]
        keys += [f"norm{i}.weight", f"norm{i}.bias"]
    return keys + ["head.weight", "head.bias"]


@pytest.fixture(scope="module")
def timm_b0_state():
    return random_state(timm.create_model("pvt_v2_b0", num_classes=1000))


def test_official_names_are_timms_after_timms_own_filter_and_convert_alike(timm_b0_state):
    from timm.models.pvt_v2 import checkpoint_filter_fn
    official = {}
    for key in official_b0_keys():
        (timm_key,) = checkpoint_filter_fn({key: 0}, None)
        official[key] = timm_b0_state[timm_key]
    assert len(official) == len(timm_b0_state)  # every timm tensor has exactly one official name

    assert (detect_format(official), detect_family(official)) == ("official", "v2")
    assert (detect_format(timm_b0_state), detect_family(timm_b0_state)) == ("timm", "v2")
    from_official, notes = to_native(official)
    from_timm, _ = to_native(timm_b0_state)
    assert notes[0] == "format: official (PVT v2)"
    assert sorted(from_official) == sorted(from_timm)
    for key in from_timm:
        np.testing.assert_array_equal(from_official[key], from_timm[key])
    ours = {p.name: tuple(p.shape) for p in pvt_dense.create_model("pvt_v2_b0").get_parameters()}
    assert {k: v.shape for k, v in from_timm.items()} == ours
    np.testing.assert_array_equal(from_official["stages.1.blocks.1.mlp.dwconv.weight"],
                                  official["block2.1.mlp.dwconv.dwconv.weight"])
    np.testing.assert_array_equal(from_official["stages.0.patch_embed.norm.gamma"], official["patch_embed1.norm.weight"])
    np.testing.assert_array_equal(from_official["stages.3.norm.beta"], official["norm4.bias"])


def test_huggingface_bare_model_and_backbone_names_convert_like_the_classifier():
    transformers = pytest.importorskip("transformers")
    config = transformers.PvtV2Config(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_labels=10,
                                      out_features=["stage1", "stage2", "stage3", "stage4"])
    classifier = random_state(transformers.PvtV2ForImageClassification(config))
    native, notes = to_native(classifier)
    assert detect_format(classifier) == "huggingface" and detect_family(classifier) == "v2"
    assert "merged HF key/value into kv (keys first) for 8 blocks" in notes
    key, value = (classifier[f"pvt_v2.encoder.layers.2.blocks.1.attention.{p}.weight"] for p in ("key", "value"))
    np.testing.assert_array_equal(native["stages.2.blocks.1.attn.kv.weight"], np.concatenate([key, value]))
    np.testing.assert_array_equal(native["head.weight"], classifier["classifier.weight"])
    for bare in (transformers.PvtV2Model(config), transformers.PvtV2Backbone(config)):
        state = {k: classifier["pvt_v2." + k] for k in bare.state_dict()}
        converted, _ = to_native(state)
        assert sorted(converted) == sorted(k for k in native if not k.startswith("head."))


def test_mindcv_pvtv2_checkpoint_loads_into_ours(tmp_path, pynative):
    """MindCV 0.3.0's own pvt_v2 model, its parameters saved as mindcv saves them, into our model."""
    mindcv_pvtv2 = pytest.importorskip("mindcv.models.pvtv2")
    name = "pvt_v2_b0"
    theirs = getattr(mindcv_pvtv2, name)(num_classes=1000)
    rng = np.random.default_rng(0)
    for param in theirs.get_parameters():
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    path = tmp_path / f"{name}.ckpt"
    ms.save_checkpoint(theirs, str(path))
    raw = {p.name: p.asnumpy() for p in theirs.get_parameters()}
    assert detect_format(raw) == "mindcv" and detect_family(raw) == "v2"

    ours = pvt_dense.create_model(name, pretrained=str(path))  # strict: every parameter accounted for
    loaded = {p.name: p.asnumpy() for p in ours.get_parameters()}
    np.testing.assert_array_equal(loaded["stages.1.blocks.0.mlp.dwconv.weight"],
                                  raw["block_list.1.0.mlp.dwconv.dwconv.weight"])
    np.testing.assert_array_equal(loaded["stages.2.patch_embed.norm.gamma"], raw["patch_embed_list.2.norm.gamma"])
    np.testing.assert_array_equal(loaded["stages.0.blocks.1.attn.kv.weight"], raw["block_list.0.1.attn.kv.weight"])
    np.testing.assert_array_equal(loaded["stages.3.norm.beta"], raw["norm_list.3.beta"])
    np.testing.assert_array_equal(loaded["head.weight"], raw["head.weight"])


def test_native_v2_state_is_recognised_and_kept(pynative):
    net = pvt_dense.create_backbone("pvt_v2_b0")
    state = {p.name: p.asnumpy() for p in net.get_parameters()}
    assert (detect_format(state), detect_family(state)) == ("native", "v2")
    converted, notes = to_native(state)
    assert notes == ["format: native (PVT v2)"] and sorted(converted) == sorted(state)


def test_v1_checkpoints_are_still_v1():
    v1 = {"block1.0.norm1.weight": np.ones(64), "pos_embed1": np.zeros((1, 3136, 64)),
          "patch_embed1.proj.weight": np.zeros((64, 3, 4, 4)), "cls_token": np.zeros((1, 1, 512))}
    assert (detect_format(v1), detect_family(v1)) == ("official", "v1")


@pytest.mark.bad_input("checkpoint (any format)",
                       "a timm pvt_v2 state dict with an extra key that is no PVT v2 parameter",
                       "CheckpointError naming the key (not PVT v2 parameters); with strict=False dropped with a note")
def test_unknown_key_in_a_v2_checkpoint_is_named(timm_b0_state):
    state = dict(timm_b0_state)
    state["stages.0.blocks.0.attn.rel_pos.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match="not PVT v2 parameters: 'stages.0.blocks.0.attn.rel_pos.weight'"):
        to_native(state)
    converted, notes = to_native(state, strict=False)
    assert "stages.0.blocks.0.attn.rel_pos.weight" not in converted
    assert any("ignored 1 unrecognised keys" in note for note in notes)


# --- writing: native -> each v2 format ------------------------------------------------------------------------------

def native_state(net, seed):
    rng = np.random.default_rng(seed)
    return {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in net.get_parameters()}


@pytest.fixture(scope="module")
def native_v2_states():
    """A b0 classifier and a b2_li backbone (linear attention), random weights in native names."""
    return [native_state(pvt_dense.create_model("pvt_v2_b0", num_classes=5), 0),
            native_state(pvt_dense.create_backbone("pvt_v2_b2_li"), 1)]


@pytest.mark.parametrize("fmt", ["official", "timm", "huggingface", "mmdetection", "mindcv"])
def test_v2_native_round_trips_through_every_writable_format(fmt, native_v2_states):
    from pvt_dense.checkpoint.keymaps import from_native, writable_formats
    assert set(writable_formats("v2")) == {"official", "timm", "huggingface", "mmdetection", "mindcv"}
    for state in native_v2_states:
        if fmt == "mmdetection" and "head.weight" in state:  # a backbone-only layout: the head has no name there
            with pytest.raises(CheckpointError, match="head.weight"):
                from_native(state, fmt)
            without_head = {k: v for k, v in state.items() if not k.startswith("head.")}
            assert sorted(from_native(state, fmt, strict=False)) == sorted(from_native(without_head, fmt))
            state = without_head
        written = from_native(state, fmt)
        assert (detect_format(written), detect_family(written)) == (fmt, "v2")
        back, _ = to_native(written)
        assert sorted(back) == sorted(state)
        for key in state:
            np.testing.assert_array_equal(back[key], state[key], err_msg=key)


def test_v2_written_names_are_the_libraries_own(pynative):
    """Key sets against the libraries' own models (timm, HF) and the official names, for the b0 classifier."""
    from pvt_dense.checkpoint.keymaps import from_native
    state = native_state(pvt_dense.create_model("pvt_v2_b0"), 1)
    with torch.device("meta"):
        assert sorted(from_native(state, "timm")) == sorted(timm.create_model("pvt_v2_b0").state_dict())
    assert sorted(from_native(state, "official")) == sorted(official_b0_keys())
    transformers = pytest.importorskip("transformers")
    config = transformers.PvtV2Config(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_labels=1000)
    with torch.device("meta"):
        assert sorted(from_native(state, "huggingface")) == sorted(
            transformers.PvtV2ForImageClassification(config).state_dict())


@pytest.mark.bad_input("checkpoint writing", "a PVT v1 state dict to 'timm' (a v2-only format)",
                       "CheckpointError naming the formats v1 can write")
def test_v1_state_cannot_be_written_in_a_v2_only_format(pynative):
    from pvt_dense.checkpoint.keymaps import from_native
    state = {p.name: p.asnumpy() for p in pvt_dense.create_backbone("pvt_tiny", out_indices=(0,)).get_parameters()}
    with pytest.raises(CheckpointError, match="'timm' for a PVT v1 state dict; choose one of official, huggingface"):
        from_native(state, "timm")
