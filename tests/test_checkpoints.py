"""Loading and converting checkpoints of every source into real models, and the errors users get when they don't fit."""
import subprocess
import sys
import warnings
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

import pvt_dense
from pvt_dense.checkpoint import load_pretrained, read_checkpoint, save_native
from pvt_dense.conversion import convert_checkpoint
from pvt_dense.checkpoint.keymaps import from_native, native_to_mindcv
from pvt_dense.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def random_native_state(net, seed=0):
    rng = np.random.default_rng(seed)
    return {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in net.get_parameters()}


@pytest.fixture(scope="module")
def tiny_classifier_state():
    return random_native_state(pvt_dense.create_model("pvt_tiny"), seed=11)


def save_mindspore(state, path):
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], str(path))
    return path


def test_mindcv_checkpoint_round_trips_exactly(tiny_classifier_state, tmp_path):
    mindcv_state = native_to_mindcv(tiny_classifier_state)
    assert mindcv_state["pos_embed1"].dtype == np.float16  # as MindCV stores them
    mindcv_file = save_mindspore(mindcv_state, tmp_path / "pvt_tiny-6abb953d.ckpt")
    native_file = tmp_path / "native.ckpt"
    report = convert_checkpoint(mindcv_file, native_file)
    assert report.source_format == "mindcv" and report.clean
    native = read_checkpoint(native_file)
    assert all(v.dtype == np.float32 for v in native.values())
    back = native_to_mindcv(native)
    assert set(back) == set(mindcv_state)
    for key, value in mindcv_state.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_mindcv_checkpoint_loads_into_model_with_its_weights(tiny_classifier_state, tmp_path):
    mindcv_file = save_mindspore(native_to_mindcv(tiny_classifier_state), tmp_path / "mindcv.ckpt")
    net = pvt_dense.create_model("pvt_tiny", pretrained=str(mindcv_file))
    for p in net.get_parameters():
        expected = tiny_classifier_state[p.name]
        if "pos_embed" in p.name:
            expected = expected.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(p.asnumpy(), expected, err_msg=p.name)


@pytest.mark.parametrize("wrapper", ["plain", "model", "state_dict_backbone"])
def test_official_pytorch_checkpoint_loads(tiny_classifier_state, tmp_path, wrapper):
    torch = pytest.importorskip("torch")
    official = {k: torch.from_numpy(v) for k, v in from_native(tiny_classifier_state, "official").items()}
    if wrapper == "model":
        container = {"model": official, "epoch": 300}
    elif wrapper == "state_dict_backbone":
        # mmdetection-style: the backbone's weights under a 'backbone.' prefix beside a neck and a head.
        container = {"state_dict": {**{f"backbone.{k}": v for k, v in official.items()
                                       if not k.startswith(("head.", "norm.", "cls_token"))},
                                    "neck.lateral.weight": torch.zeros(2, 2)}}
    else:
        container = official
    path = tmp_path / "pvt_tiny.pth"
    torch.save(container, path)
    net = pvt_dense.create_backbone("pvt_tiny", pretrained=str(path), strict=wrapper != "state_dict_backbone")
    for p in net.get_parameters():
        expected = tiny_classifier_state[p.name]
        if p.name == "stages.3.pos_embed":
            expected = expected[:, 1:]  # the classifier's cls slot is dropped
        np.testing.assert_array_equal(p.asnumpy(), expected, err_msg=p.name)


def test_classifier_checkpoint_into_backbone_reports_what_it_drops(tiny_classifier_state, tmp_path, capsys):
    path = save_mindspore(tiny_classifier_state, tmp_path / "cls.ckpt")
    net = pvt_dense.create_backbone("pvt_tiny")
    report = load_pretrained(net, str(path))
    assert report.clean and report.loaded == len(list(net.get_parameters()))
    text = capsys.readouterr().out
    assert "cls_token" in text and "head" in text and "norm" in text and "cls slot" in text


def test_head_of_another_class_count_is_dropped_for_fine_tuning(tiny_classifier_state, tmp_path):
    path = save_mindspore(tiny_classifier_state, tmp_path / "cls.ckpt")
    net = pvt_dense.create_model("pvt_tiny", num_classes=10, strict=False)
    head_before = net.head.weight.asnumpy().copy()
    report = load_pretrained(net, str(path), strict=False, verbose=False)
    assert any("head.weight" in note and "fine-tuning" in note for note in report.notes)
    assert report.missing == ["head.weight", "head.bias"]
    np.testing.assert_array_equal(net.head.weight.asnumpy(), head_before)
    np.testing.assert_array_equal(net.norm.gamma.asnumpy(), tiny_classifier_state["norm.gamma"])


@pytest.mark.bad_input("checkpoint (any format)",
                       "a pvt_small .ckpt loaded into pvt_tiny, and a pvt_tiny one into pvt_small",
                       "CheckpointError: does not fit pvt_tiny (another PVT size?), listing the unexpected or missing "
                       "keys; no weight changes")
def test_checkpoint_of_another_size_is_a_clear_error_and_loads_nothing(tmp_path):
    small = random_native_state(pvt_dense.create_backbone("pvt_small"))
    path = save_mindspore(small, tmp_path / "small.ckpt")
    net = pvt_dense.create_backbone("pvt_tiny")
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    with pytest.raises(CheckpointError, match="does not fit pvt_tiny.*\n.*unexpected: stages.0.blocks.2"):
        load_pretrained(net, str(path))
    for p in net.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), before[p.name])
    tiny = random_native_state(pvt_dense.create_backbone("pvt_tiny"))
    with pytest.raises(CheckpointError, match="another PVT size.*\n.*missing: stages.0.blocks.2"):
        pvt_dense.create_backbone("pvt_small", pretrained=str(save_mindspore(tiny, tmp_path / "tiny.ckpt")))


@pytest.mark.bad_input("checkpoint (any format)",
                       "a missing .ckpt, an empty .pth, 4 KB of random bytes named .ckpt, a .ckpt cut in half",
                       "CheckpointError naming the file ('not found', 'empty')")
def test_missing_corrupt_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.ckpt"):
        pvt_dense.create_backbone("pvt_tiny", pretrained=str(tmp_path / "nope.ckpt"))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(empty)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="garbage.ckpt"):
        read_checkpoint(garbage)
    good = save_mindspore({"stages.0.pos_embed": np.zeros((1, 3136, 64), np.float32)}, tmp_path / "good.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        read_checkpoint(truncated)


@pytest.mark.bad_input("checkpoint (any format)",
                       "a .ckpt with one NaN in a weight",
                       "loads, with a warning naming the non-finite tensor")
def test_non_finite_weights_warn(tiny_classifier_state, tmp_path):
    state = dict(tiny_classifier_state)
    state["stages.1.blocks.0.mlp.fc1.weight"] = state["stages.1.blocks.0.mlp.fc1.weight"].copy()
    state["stages.1.blocks.0.mlp.fc1.weight"][0, 0] = np.nan
    path = save_mindspore(state, tmp_path / "nan.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained(pvt_dense.create_model("pvt_tiny"), str(path), verbose=False)
    assert any("non-finite" in str(w.message) and "mlp.fc1.weight" in str(w.message) for w in caught)


def test_save_native_is_atomic_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "out" / "model.ckpt"
    save_native({"a": np.ones((2, 2), np.float32)}, str(target))
    assert [p.name for p in target.parent.iterdir()] == ["model.ckpt"]
    np.testing.assert_array_equal(read_checkpoint(target)["a"], np.ones((2, 2)))


@pytest.mark.bad_input("command line",
                       "tools/convert_weights.py on a .pth whose pickle is broken",
                       "exit status 2 with one 'error:' line, no traceback")
def test_convert_weights_tool_reports_and_fails_cleanly(tiny_classifier_state, tmp_path):
    src = save_mindspore(native_to_mindcv(tiny_classifier_state), tmp_path / "mindcv.ckpt")
    dst = tmp_path / "native.ckpt"
    tool = [sys.executable, str(ROOT / "tools" / "convert_weights.py")]
    done = subprocess.run(tool + [str(src), str(dst)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pvt_tiny classifier" in done.stdout and "mindcv format" in done.stdout
    assert dst.exists()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02not really a pickle")
    failed = subprocess.run(tool + [str(bad), str(tmp_path / "x.ckpt")], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error:") and "Traceback" not in failed.stderr


def _little_free_memory(monkeypatch, pages=16):
    """What a machine whose memory is mostly page cache reports as free (SC_AVPHYS_PAGES = MemFree): a few pages."""
    import os
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: pages if name == "SC_AVPHYS_PAGES" else real(name))


def test_mindspore_checkpoints_load_when_free_memory_is_page_cache(tiny_classifier_state, tmp_path, monkeypatch):
    # CI saw MindSpore refuse a 203 MB mindcv checkpoint with 200 MB "free" on a 24 GB machine full of page cache.
    from mindspore.train import serialization
    from pvt_dense.checkpoint import mindspore_ckpt
    path = save_mindspore(tiny_classifier_state, tmp_path / "pvt_tiny.ckpt")
    original = serialization._get_available_memory
    _little_free_memory(monkeypatch)
    with pytest.raises(ValueError, match="exceeds current available memory"):
        ms.load_checkpoint(str(path))  # the premise: MindSpore alone counts only free memory
    assert mindspore_ckpt.mem_available_bytes() > path.stat().st_size
    state = read_checkpoint(path)
    np.testing.assert_array_equal(state["norm.gamma"], tiny_classifier_state["norm.gamma"])
    load_pretrained(pvt_dense.create_model("pvt_tiny"), str(path), verbose=False)
    assert serialization._get_available_memory is original  # put back after each call


@pytest.mark.bad_input("checkpoint (any format)",
                       "a MindSpore .ckpt larger than the memory the kernel says is available (MemAvailable)",
                       "CheckpointError naming the file, its size and the available memory; nothing is read")
def test_checkpoint_larger_than_available_memory_is_a_clear_error(tiny_classifier_state, tmp_path, monkeypatch):
    from mindspore.train import serialization
    from pvt_dense.checkpoint import mindspore_ckpt
    path = save_mindspore(tiny_classifier_state, tmp_path / "pvt_tiny.ckpt")
    original = serialization._get_available_memory
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24105000 kB\nMemFree:           100 kB\nMemAvailable:      200 kB\n")
    assert mindspore_ckpt.mem_available_bytes(str(meminfo)) == 200 * 1024
    real_reader = mindspore_ckpt.mem_available_bytes
    monkeypatch.setattr(mindspore_ckpt, "mem_available_bytes", lambda: real_reader(str(meminfo)))
    with pytest.raises(CheckpointError, match=r"pvt_tiny.ckpt: the file is 5\d.\d MB and only 0.2 MB of memory is "
                                              r"available") as caught:
        read_checkpoint(path)
    assert "\n" not in str(caught.value)
    assert serialization._get_available_memory is original
    assert real_reader(str(tmp_path / "missing")) is None
