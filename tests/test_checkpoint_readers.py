"""The torch-free checkpoint readers: round trips against torch and safetensors, refusal of code-running pickles,
and a clean CheckpointError for every truncated, corrupt or crafted file (including a bounded fuzz test)."""
import argparse
import codecs
import collections
import copy
import copyreg
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvt_dense.checkpoint.safetensors_reader import read_safetensors
from pvt_dense.checkpoint.torch_reader import PickledNamespace, read_torch_checkpoint, read_torch_state_dict
from pvt_dense.errors import CheckpointError, UnsafeCheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]
SAVE_FORMATS = ["zip", "legacy"]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def torch_save(torch, obj, path, save_format):
    torch.save(obj, path, _use_new_zipfile_serialization=(save_format == "zip"))
    return path


def as_reference(torch, tensor):
    """What the reader should return for `tensor`: the same values, with bfloat16 widened to float32."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def assert_matches(array, tensor, torch):
    expected = as_reference(torch, tensor)
    assert isinstance(array, np.ndarray)
    assert array.dtype == expected.dtype
    assert array.shape == expected.shape
    assert array.flags.c_contiguous and array.flags.writeable
    np.testing.assert_array_equal(array, expected)


def varied_state_dict(torch):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=generator)
    state = collections.OrderedDict()
    state["f32"] = torch.randn(3, 4, generator=generator)
    state["f16"] = torch.randn(7, generator=generator).half()
    state["bf16"] = torch.randn(2, 3, generator=generator).bfloat16()
    state["f64"] = torch.randn(2, 2, generator=generator).double()
    state["i64"] = torch.randint(-2 ** 40, 2 ** 40, (5,), generator=generator)
    state["i32"] = torch.randint(-2 ** 30, 2 ** 30, (2, 3), generator=generator, dtype=torch.int32)
    state["i16"] = torch.randint(-2 ** 14, 2 ** 14, (4,), generator=generator, dtype=torch.int16)
    state["i8"] = torch.randint(-128, 128, (9,), generator=generator, dtype=torch.int8)
    state["u8"] = torch.randint(0, 256, (3, 3), generator=generator, dtype=torch.uint8)
    state["bool"] = torch.rand(5, generator=generator) > 0.5
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0, 3)
    state["num_batches_tracked"] = torch.tensor(7)
    state["param"] = torch.nn.Parameter(torch.randn(3, generator=generator))
    # Views of one storage: each must come back as its own contiguous copy.
    state["base"] = base
    state["transposed"] = base.t()
    state["row_slice"] = base[2:5]
    state["column_slice"] = base[1:, 3]
    state["expanded"] = torch.randn(1, 4, generator=generator).expand(3, 4)
    return state


@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_round_trip_of_dtypes_views_and_shared_storages(torch, tmp_path, save_format):
    state = varied_state_dict(torch)
    path = torch_save(torch, state, tmp_path / "weights.pth", save_format)

    loaded = read_torch_checkpoint(path)

    assert isinstance(loaded, collections.OrderedDict)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert_matches(loaded[name], tensor, torch)
    assert loaded["bf16"].dtype == np.float32
    assert not np.shares_memory(loaded["base"], loaded["transposed"])


@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_nested_containers_survive(torch, tmp_path, save_format):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    weight = model[0].weight
    checkpoint = {"model": model.state_dict(), "epoch": 12, "best": 0.75, "arch": "pvt_tiny",
                  "history": [1, 2.5, None, True], "pair": (weight, "label"), "flags": {"ema": False}}
    path = torch_save(torch, checkpoint, tmp_path / "checkpoint.pth", save_format)

    loaded = read_torch_checkpoint(path)

    assert isinstance(loaded["model"], collections.OrderedDict)
    assert list(loaded["model"]) == list(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert_matches(loaded["model"][name], tensor, torch)
    assert (loaded["epoch"], loaded["best"], loaded["arch"]) == (12, 0.75, "pvt_tiny")
    assert loaded["history"] == [1, 2.5, None, True]
    assert loaded["flags"] == {"ema": False}
    assert_matches(loaded["pair"][0], weight, torch)
    assert loaded["pair"][1] == "label"


def test_types_that_torch_pickles_as_untyped_storage(torch, tmp_path):
    state = {"u16": torch.arange(5).to(torch.uint16), "u32": torch.arange(3).to(torch.uint32),
             "c64": torch.randn(3, dtype=torch.complex64)}
    path = torch_save(torch, state, tmp_path / "extra.pth", "zip")

    loaded = read_torch_checkpoint(path)

    for name, tensor in state.items():
        assert_matches(loaded[name], tensor, torch)


def test_big_endian_zip_checkpoint(torch, tmp_path):
    # No big-endian machine at hand: rewrite a little-endian file as one would have written it.
    values = torch.tensor([1.5, -2.0, 3.25])
    path = torch_save(torch, {"w": values}, tmp_path / "little.pth", "zip")
    big_path = tmp_path / "big.pth"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(big_path, "w") as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename.endswith("/byteorder"):
                content = b"big"
            elif "/data/" in info.filename:
                content = np.frombuffer(content, "<f4").astype(">f4").tobytes()
            target.writestr(info.filename, content)

    loaded = read_torch_checkpoint(big_path)

    assert_matches(loaded["w"], values, torch)


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "model_state", "model_state_dict"])
def test_state_dict_is_unwrapped_and_loses_data_parallel_prefix(torch, tmp_path, wrapper):
    linear = torch.nn.Linear(3, 2)
    state = collections.OrderedDict((f"module.{name}", tensor) for name, tensor in linear.state_dict().items())
    checkpoint = state if wrapper is None else {wrapper: state, "epoch": 3, "optimizer": {"lr": 0.1}}
    path = torch_save(torch, checkpoint, tmp_path / "wrapped.pth", "zip")

    loaded = read_torch_state_dict(path)

    assert type(loaded) is dict
    assert list(loaded) == ["weight", "bias"]
    assert_matches(loaded["weight"], linear.weight, torch)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a .pth holding only {'epoch', 'optimizer'}, no weights",
                       "CheckpointError: the file holds no state dict, listing its top-level keys")
def test_state_dict_error_lists_the_top_level_keys(torch, tmp_path):
    path = torch_save(torch, {"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pth", "zip")

    with pytest.raises(CheckpointError, match=r"no state dict.*'epoch', 'optimizer'"):
        read_torch_state_dict(path)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a state dict with both 'weight' and 'module.weight'",
                       "CheckpointError: two tensors named 'weight' once the DataParallel 'module.' prefix is removed")
def test_state_dict_prefix_collision_is_an_error(torch, tmp_path):
    state = {"weight": torch.zeros(1), "module.weight": torch.ones(1)}
    path = torch_save(torch, state, tmp_path / "collide.pth", "zip")

    with pytest.raises(CheckpointError, match="two tensors named 'weight'"):
        read_torch_state_dict(path)


def test_library_never_imports_torch(torch, tmp_path):
    path = torch_save(torch, {"w": torch.ones(2)}, tmp_path / "w.pth", "zip")
    script = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
              "from pvt_dense.checkpoint.torch_reader import read_torch_state_dict\n"
              f"print(read_torch_state_dict({str(path)!r})['w'].tolist())\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("[1.0, 1.0]")


# ------------------------------------------------------------------------------------------ training checkpoints


def deit_style_checkpoint(torch):
    """What the PVT/DeiT training scripts save: weights plus optimizer, scheduler, scaler, args and best accuracy."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "lr_scheduler": scheduler.state_dict(), "epoch": 3,
                  "args": argparse.Namespace(lr=1e-3, model="pvt_tiny", input_size=224),
                  "max_accuracy": np.float64(75.1), "scaler": torch.amp.GradScaler("cpu").state_dict()}
    return checkpoint


def assert_same_plain_data(loaded, saved, torch):
    """Equal structure and values, with tensors compared as arrays."""
    if isinstance(saved, torch.Tensor):
        assert_matches(loaded, saved, torch)
    elif isinstance(saved, dict):
        assert type(loaded) is type(saved) and list(loaded) == list(saved)
        for key in saved:
            assert_same_plain_data(loaded[key], saved[key], torch)
    elif isinstance(saved, (list, tuple)):
        assert type(loaded) is type(saved) and len(loaded) == len(saved)
        for loaded_item, saved_item in zip(loaded, saved, strict=True):
            assert_same_plain_data(loaded_item, saved_item, torch)
    else:
        assert type(loaded) is type(saved) and loaded == saved


@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_deit_style_training_checkpoint(torch, tmp_path, save_format):
    checkpoint = deit_style_checkpoint(torch)
    path = torch_save(torch, checkpoint, tmp_path / "checkpoint.pth", save_format)

    weights = read_torch_state_dict(path)
    loaded = read_torch_checkpoint(path)

    assert list(weights) == list(checkpoint["model"])
    for name, tensor in checkpoint["model"].items():
        assert_matches(weights[name], tensor, torch)
    assert isinstance(loaded["args"], PickledNamespace)
    assert (loaded["args"].lr, loaded["args"].model, loaded["args"].input_size) == (1e-3, "pvt_tiny", 224)
    assert loaded["args"] == PickledNamespace(lr=1e-3, model="pvt_tiny", input_size=224)
    assert loaded["args"].to_dict() == vars(checkpoint["args"])
    assert isinstance(loaded["max_accuracy"], float) and loaded["max_accuracy"] == 75.1
    assert loaded["epoch"] == 3
    for key in ("optimizer", "lr_scheduler", "scaler"):
        assert_same_plain_data(loaded[key], checkpoint[key], torch)
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (3, 4)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_namespace_in_every_pickle_protocol(tmp_path, protocol):
    # Protocols 0 and 1 go through copyreg._reconstructor, later ones through NEWOBJ and BUILD.
    namespace = argparse.Namespace(lr=0.5, layers=[2, 2], name="pvt", nothing=None)
    path = write_zip_checkpoint(tmp_path / "args.pth", pickle.dumps({"args": namespace}, protocol))

    loaded = read_torch_checkpoint(path)["args"]

    assert loaded == PickledNamespace(lr=0.5, layers=[2, 2], name="pvt", nothing=None)
    assert loaded.layers == [2, 2] and "name" in loaded and "missing" not in loaded
    with pytest.raises(AttributeError, match="missing"):
        loaded.missing
    assert copy.deepcopy(loaded) == loaded
    assert pickle.loads(pickle.dumps(loaded, protocol)) == loaded
    assert argparse.Namespace(**loaded.to_dict()) == namespace


def test_namespace_through_copyreg_newobj(tmp_path):
    path = write_zip_checkpoint(tmp_path / "args.pth",
                                pickle.dumps(CallsGlobal(copyreg.__newobj__, argparse.Namespace), protocol=1))

    assert read_torch_checkpoint(path) == PickledNamespace()


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a pickled argparse.Namespace with attributes named `__deepcopy__`, `__reduce_ex__` and "
                       "`_attributes`",
                       "loaded as plain data; copy and pickle never take the file's values as hooks")
def test_namespace_attributes_never_answer_dunder_lookups(tmp_path):
    # copy and pickle look hooks up by attribute; the file's data must not be able to supply one.
    # (A real Namespace with these attributes cannot even be pickled, so write its pickle ourselves.)
    state = {"__deepcopy__": 1, "__reduce_ex__": 2, "_attributes": 3}
    namespace = Reduces(copyreg.__newobj__, (argparse.Namespace,), state)
    path = write_zip_checkpoint(tmp_path / "args.pth", pickle.dumps(namespace, protocol=1))

    loaded = read_torch_checkpoint(path)

    assert loaded.to_dict() == state
    assert copy.deepcopy(loaded) == loaded
    with pytest.raises(AttributeError):
        loaded.__deepcopy__


NUMPY_VALUES = {
    "f64": np.arange(6.0).reshape(2, 3), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "transposed": np.arange(12, dtype=np.int32).reshape(3, 4).T, "big_endian": np.arange(4, dtype=">i4"),
    "f16": np.array([0.5, -2], dtype=np.float16), "c64": np.array([1 + 2j], dtype=np.complex64),
    "u64": np.array([2 ** 63], dtype=np.uint64), "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 3), dtype=np.float32), "zero_dim": np.array(7, dtype=np.int8),
    "f64_scalar": np.float64(75.1), "i64_scalar": np.int64(-3), "f32_scalar": np.float32(0.25),
    "bool_scalar": np.bool_(True), "c128_scalar": np.complex128(1 - 1j), "u8_scalar": np.uint8(200),
}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_scalars_arrays_and_dtypes(tmp_path, protocol):
    values = dict(NUMPY_VALUES, dtype=np.dtype(">f4"), nested=(np.float32(1.5), [np.arange(2)]),
                  args=argparse.Namespace(best=np.float64(2.5), shapes=(np.arange(3),)))
    path = write_zip_checkpoint(tmp_path / "numpy.pth", pickle.dumps(values, protocol))

    loaded = read_torch_checkpoint(path)

    for name, expected in NUMPY_VALUES.items():
        assert type(loaded[name]) is type(expected), name
        assert loaded[name].dtype == expected.dtype.newbyteorder("="), name
        np.testing.assert_array_equal(loaded[name], expected)
        if isinstance(expected, np.ndarray):
            assert loaded[name].shape == expected.shape
            assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable
    assert loaded["dtype"] == np.dtype("float32")
    assert type(loaded["nested"]) is tuple and type(loaded["nested"][0]) is np.float32
    np.testing.assert_array_equal(loaded["nested"][1][0], [0, 1])
    assert loaded["args"].best == 2.5
    np.testing.assert_array_equal(loaded["args"].shapes[0], [0, 1, 2])


def test_numpy_objects_keep_their_sharing(tmp_path):
    shared = np.arange(3.0)
    looped = [np.float64(1.0)]
    looped.append(looped)
    path = write_zip_checkpoint(tmp_path / "numpy.pth", pickle.dumps({"a": shared, "b": (shared,), "loop": looped},
                                                                     protocol=2))

    loaded = read_torch_checkpoint(path)

    assert loaded["a"] is loaded["b"][0]
    assert loaded["loop"][1] is loaded["loop"] and loaded["loop"][0] == 1.0


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a pickle of a tuple that contains itself (through a list), with a numpy array inside",
                       "CheckpointError: a tuple that contains itself")
def test_numpy_in_a_tuple_that_contains_itself(tmp_path):
    inner = []
    looped = (np.arange(2), inner)
    inner.append(looped)
    path = write_zip_checkpoint(tmp_path / "numpy.pth", pickle.dumps(looped, protocol=2))

    with pytest.raises(CheckpointError, match="tuple that contains itself"):
        read_torch_checkpoint(path)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a pickle nesting a numpy dtype 20,000 lists deep",
                       "CheckpointError: nested too deeply (no RecursionError)")
def test_numpy_deep_inside_nested_lists(tmp_path):
    # The unpickler nests without recursion; swapping the stand-ins out afterwards must fail cleanly instead.
    dtype = b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"
    path = write_zip_checkpoint(tmp_path / "deep.pth", b"\x80\x02" + b"(" * 20000 + dtype + b"l" * 20000 + b".")

    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_torch_checkpoint(path)


# ------------------------------------------------------------------------------------------ unsafe pickles


class RunsCommand:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class CallsGlobal:
    """Unpickling this calls `function(*args)`; used to probe which globals the reader refuses."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a torch.save'd .pth (zip and legacy format) whose pickle calls os.system('touch ...')",
                       "UnsafeCheckpointError naming the global (posix.system) and the file; the command never runs")
@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_malicious_torch_checkpoint_is_refused_without_running_it(torch, tmp_path, save_format):
    marker = tmp_path / "pwned"
    checkpoint = {"weight": torch.ones(2), "payload": RunsCommand(f"touch {marker}")}
    path = torch_save(torch, checkpoint, tmp_path / "evil.pth", save_format)

    with pytest.raises(UnsafeCheckpointError) as raised:
        read_torch_checkpoint(path)

    assert f"'{os.system.__module__}.system'" in str(raised.value)
    assert str(path) in str(raised.value)
    assert not marker.exists()


def test_the_malicious_payload_is_live(torch, tmp_path):
    # Proves the test above guards something: a plain unpickler does run the command in data.pkl.
    marker = tmp_path / "pwned"
    path = torch_save(torch, {"payload": RunsCommand(f"touch {marker}")}, tmp_path / "evil.pth", "zip")
    with zipfile.ZipFile(path) as archive:
        data_pickle = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        pickle.loads(archive.read(data_pickle))
    assert marker.exists()


def write_zip_checkpoint(path, data_pickle, records=None, byteorder=b"little"):
    """A zip laid out like torch.save's, around a pickle and storage records of our choosing."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pickle)
        archive.writestr("archive/byteorder", byteorder)
        archive.writestr("archive/version", b"3\n")
        for key, content in (records or {}).items():
            archive.writestr(f"archive/data/{key}", content)
    return path


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "pickles calling eval, exec, getattr, `__import__`, os.system, subprocess.Popen, "
                       "collections.Counter, io.open or print (protocols 2 and 4)",
                       "UnsafeCheckpointError: refused to load global `'<module>.<name>'`")
@pytest.mark.parametrize("function", [eval, exec, getattr, __import__, os.system, subprocess.Popen,
                                      collections.Counter, io.open, print], ids=lambda function: function.__name__)
@pytest.mark.parametrize("protocol", [2, 4])
def test_any_other_global_is_refused(tmp_path, function, protocol):
    path = write_zip_checkpoint(tmp_path / "evil.pth", pickle.dumps({"x": CallsGlobal(function, "1")}, protocol))

    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load global '.*{function.__name__}'"):
        read_torch_checkpoint(path)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a legacy-format .pth whose first pickle (the header) calls os.system",
                       "UnsafeCheckpointError naming system")
def test_refused_global_in_legacy_header_pickle(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(CallsGlobal(os.system, "true"), protocol=2))

    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_torch_checkpoint(path)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "copyreg._reconstructor building subprocess.Popen or os._wrap_close (protocols 0 and 2)",
                       "UnsafeCheckpointError: refused to load global, naming the class")
@pytest.mark.parametrize("dangerous, name", [(subprocess.Popen, "subprocess.Popen"),
                                             (os._wrap_close, "os._wrap_close")])
@pytest.mark.parametrize("protocol", [0, 2])
def test_copyreg_reconstructor_of_a_dangerous_class_is_refused(tmp_path, dangerous, name, protocol):
    payload = CallsGlobal(copyreg._reconstructor, dangerous, object, None)
    path = write_zip_checkpoint(tmp_path / "evil.pth", pickle.dumps({"args": payload}, protocol))

    with pytest.raises(UnsafeCheckpointError, match=f"refused to load global '{name}'"):
        read_torch_checkpoint(path)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "NEWOBJ of subprocess.Popen, os._wrap_close, argparse.ArgumentParser or numpy.memmap",
                       "UnsafeCheckpointError: refused to load global `'<module>.<name>'`")
@pytest.mark.parametrize("module, name", [("subprocess", "Popen"), ("os", "_wrap_close"),
                                          ("argparse", "ArgumentParser"), ("numpy", "memmap")])
def test_newobj_of_any_other_class_is_refused(tmp_path, module, name):
    data_pickle = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")\x81}b."  # GLOBAL, (), NEWOBJ, {}, BUILD

    with pytest.raises(UnsafeCheckpointError, match=f"refused to load global '{module}.{name}'"):
        read_torch_checkpoint(write_zip_checkpoint(tmp_path / "evil.pth", data_pickle))


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "`copyreg._reconstructor` / `copyreg.__newobj__` with allowed globals but building something "
                       "other than a plain argparse.Namespace (an OrderedDict, a set-based or stateful Namespace, "
                       "codecs.encode, extra arguments)",
                       "UnsafeCheckpointError: refused `copyreg.<helper>(<arguments>)`")
@pytest.mark.parametrize("function, args, message", [
    (copyreg._reconstructor, (collections.OrderedDict, object, None),
     r"refused copyreg._reconstructor\(collections.OrderedDict, builtins.object"),
    (copyreg._reconstructor, (argparse.Namespace, set, None), r"_reconstructor\(argparse.Namespace, builtins.set"),
    (copyreg._reconstructor, (argparse.Namespace, object, "state"), r"_reconstructor\(argparse.Namespace, .*'state'"),
    (copyreg._reconstructor, (codecs.encode, object, None), r"_reconstructor\(_codecs.encode"),
    (copyreg.__newobj__, (collections.OrderedDict,), r"refused copyreg.__newobj__\(collections.OrderedDict"),
    (copyreg.__newobj__, (argparse.Namespace, 1), r"refused copyreg.__newobj__\(argparse.Namespace"),
])
def test_copyreg_helpers_build_only_a_namespace(tmp_path, function, args, message):
    # Every global here passes find_class; the copyreg stand-ins themselves must refuse to build from it.
    path = write_zip_checkpoint(tmp_path / "evil.pth", pickle.dumps(CallsGlobal(function, *args), protocol=1))

    with pytest.raises(UnsafeCheckpointError, match=message):
        read_torch_checkpoint(path)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "numpy object arrays (one holding an os.system payload) and dtype('O')",
                       "UnsafeCheckpointError: refused numpy object dtype 'O8', before any item is unpickled; the "
                       "command never runs")
def test_numpy_object_arrays_are_refused_before_their_items(tmp_path):
    marker = tmp_path / "pwned"
    for value in [np.array([1, "a", None], dtype=object), np.array([RunsCommand(f"touch {marker}")]),
                  np.dtype(object)]:
        path = write_zip_checkpoint(tmp_path / "objects.pth", pickle.dumps({"x": value}, protocol=2))
        with pytest.raises(UnsafeCheckpointError, match="refused numpy object dtype 'O8'"):
            read_torch_checkpoint(path)
    assert not marker.exists()


class Reduces:
    """Pickled as function(*args), then BUILD with `state` unless it is None: numpy's own layout, but with our data."""

    def __init__(self, function, args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


NUMPY_RECONSTRUCT = np.arange(1).__reduce__()[0]
NUMPY_SCALAR = np.float64(0).__reduce__()[0]


def array_state(shape, data, dtype=np.dtype("<f8"), fortran=False):
    return Reduces(NUMPY_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, shape, dtype, fortran, data))


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "numpy arrays, scalars and dtypes of non-numeric dtypes (str, longdouble, datetime, "
                       "structured) or with lying shapes, byte counts, memory order or state",
                       "CheckpointError saying what is wrong, e.g. 'shape (3,) and dtype float64 comes with 16 bytes'")
@pytest.mark.parametrize("value, message", [
    (np.array(["text"]), "dtype 'U4'; only bool and numeric"),
    (np.zeros(2, dtype=np.longdouble), "dtype 'f16'"),
    (np.zeros(2, dtype="datetime64[s]"), "dtype 'M8'"),
    (np.zeros(2, dtype=[("a", "<f4")]), "dtype 'V4'"),
    (array_state((3,), b"\0" * 16), r"shape \(3,\) and dtype float64 comes with 16 bytes"),
    (array_state((2 ** 40,), b"\0" * 8), "comes with 8 bytes"),
    (array_state((-1,), b""), "not an integer in"),
    (array_state([1], b"\0" * 8), "shape is not a tuple"),
    (array_state((1,) * 33, b"\0" * 8), "33 dimensions"),
    (array_state((1,), "12345678"), "numpy data is '12345678', not bytes"),
    (array_state((1,), b"\0" * 8, fortran=1), "no numpy dtype or no memory order"),
    (array_state((1,), b"\0" * 8, dtype="<f8"), "no numpy dtype"),
    (Reduces(NUMPY_RECONSTRUCT, (collections.OrderedDict, (0,), b"b")), "other than to rebuild a plain ndarray"),
    (Reduces(NUMPY_RECONSTRUCT, (np.ndarray, (0,), b"b")), "data never follows"),
    (Reduces(NUMPY_SCALAR, (np.dtype("f8"), b"\0" * 4)), "comes with 4 bytes"),
    (Reduces(NUMPY_SCALAR, ("f8", b"\0" * 8)), "not a numpy dtype"),
    (Reduces(NUMPY_SCALAR, (np.dtype("f8"), b"\0" * 8), {"x": 1}), "already complete"),
    (Reduces(np.dtype, ("f8", False, True), (3, "<", None, ("x",), None, -1, -1, 0)), "unexpected state"),
    (Reduces(np.dtype, ("f8", False, True), (3, "?", None, None, None, -1, -1, 0)), "unexpected state"),
    (Reduces(np.dtype, (b"f8", False, True)), "other than to rebuild a pickled dtype"),
    (Reduces(NUMPY_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (1,), np.dtype("f8"), False, b"\0" * 8, "extra")),
     "not \\(shape, dtype"),
])
def test_crafted_numpy_data_is_refused(tmp_path, value, message):
    path = write_zip_checkpoint(tmp_path / "crafted.pth", pickle.dumps({"x": value}, protocol=2))

    with pytest.raises(CheckpointError, match=message):
        read_torch_checkpoint(path)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "hand-written pickles that misuse the allowed globals: BUILD on the Namespace class, NEWOBJ on "
                       "object or a dtype stand-in, bytes(1), a state that is not a dict",
                       "CheckpointError naming the file; the shared classes stay unchanged and the next file loads "
                       "normally")
@pytest.mark.parametrize("data_pickle", [
    b"\x80\x02cargparse\nNamespace\n}X\x01\x00\x00\x00aK\x01sb.",  # BUILD on the class, not an instance
    b"\x80\x02cnumpy\nndarray\nN}X\x04\x00\x00\x00nameK\x01s\x86b.",  # slot state aimed at a token
    b"\x80\x02cbuiltins\nobject\n)\x81.",  # NEWOBJ on what only _reconstructor may take
    b"\x80\x02cnumpy\ndtype\n)\x81.",  # NEWOBJ on a function stand-in
    b"\x80\x02cargparse\nNamespace\nK\x01\x85\x81.",  # NEWOBJ with arguments a Namespace never has
    b"\x80\x02cargparse\nNamespace\n)\x81K\x01b.",  # BUILD with a state that is not a dict
    b"\x80\x02cbuiltins\nbytes\nK\x01\x85R.",  # bytes(1): only bytes() rebuilds an empty bytes object
])
def test_handed_out_globals_stay_inert(tmp_path, data_pickle):
    path = write_zip_checkpoint(tmp_path / "crafted.pth", data_pickle)

    with pytest.raises(CheckpointError, match="crafted.pth"):
        read_torch_checkpoint(path)
    # Nothing shared was altered: the class, the tokens and the stand-ins still work for the next file.
    assert not hasattr(PickledNamespace, "a")
    path = write_zip_checkpoint(tmp_path / "ok.pth", pickle.dumps([np.arange(2), argparse.Namespace(a=1)], 2))
    assert read_torch_checkpoint(path)[0].tolist() == [0, 1]
    assert read_torch_checkpoint(path)[1] == PickledNamespace(a=1)


# ------------------------------------------------------------------------------------------ crafted tensors


class StorageRef:
    """Pickled as torch's persistent storage reference, with whatever (possibly lying) size we choose.

    `view` = (view_key, offset, size) makes it a legacy-format view of part of the storage.
    """

    def __init__(self, storage_type, key, numel, view=None):
        self.storage_type, self.key, self.numel, self.view = storage_type, key, numel, view


class CraftingPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if not isinstance(obj, StorageRef):
            return None
        reference = ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return reference + (obj.view,) if obj.view else reference


def crafted_pickle(obj):
    buffer = io.BytesIO()
    CraftingPickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_legacy_checkpoint(path, obj, storages):
    """A legacy-format file as torch < 1.6 wrote it; `storages` maps each key to its elements, in file order."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, 2), pickle.dumps(1001, 2), pickle.dumps(sys_info, 2),
             crafted_pickle(obj), pickle.dumps(list(storages), 2)]
    for elements in storages.values():
        parts += [struct.pack("<q", elements.size), elements.tobytes()]
    path.write_bytes(b"".join(parts))
    return path


def test_legacy_storage_views_and_the_oldest_rebuild_function(torch, tmp_path):
    # torch < 1.x pickled views of a storage, and tensors through _rebuild_tensor without autograd arguments.
    elements = np.arange(10, dtype="<f8")
    whole = StorageRef(torch.DoubleStorage, "root", 10)
    view = StorageRef(torch.DoubleStorage, "root", 10, view=("view", 4, 5))
    obj = {"whole": CallsGlobal(torch._utils._rebuild_tensor, whole, 0, (2, 5), (5, 1)),
           "view": CallsGlobal(torch._utils._rebuild_tensor, view, 1, (2,), (3,))}
    path = write_legacy_checkpoint(tmp_path / "old.pth", obj, {"root": elements})

    loaded = read_torch_checkpoint(path)

    np.testing.assert_array_equal(loaded["whole"], elements.reshape(2, 5))
    np.testing.assert_array_equal(loaded["view"], [5.0, 8.0])
    assert loaded["view"].dtype == np.float64


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a legacy-format .pth whose storage section disagrees with its pickle (fewer elements than "
                       "declared, a storage missing, an extra unused storage)",
                       "CheckpointError saying which storage and how")
@pytest.mark.parametrize("storages, message", [
    ({"root": np.arange(3, dtype="<f8")}, "stored with 3 elements, declared with 10"),
    ({}, "used by a tensor but not stored"),
    ({"root": np.arange(10, dtype="<f8"), "stray": np.arange(1, dtype="<f8")}, "listed but no tensor uses it"),
])
def test_legacy_storage_section_is_checked(torch, tmp_path, storages, message):
    obj = {"w": CallsGlobal(torch._utils._rebuild_tensor, StorageRef(torch.DoubleStorage, "root", 10), 0, (10,),
                            (1,))}
    path = write_legacy_checkpoint(tmp_path / "old.pth", obj, storages)

    with pytest.raises(CheckpointError, match=message):
        read_torch_checkpoint(path)


def crafted_tensor_checkpoint(torch, path, numel=4, offset=0, size=(4,), stride=(1,), record_elements=4,
                              copies=1):
    rebuild = torch._utils._rebuild_tensor_v2
    storage = StorageRef(torch.FloatStorage, "0", numel)
    tensors = {f"t{index}": CallsGlobal(rebuild, storage, offset, size, stride, False, collections.OrderedDict())
               for index in range(copies)}
    record = np.arange(record_elements, dtype="<f4").tobytes()
    return write_zip_checkpoint(path, crafted_pickle(tensors), {"0": record})


def test_crafting_helper_makes_valid_checkpoints(torch, tmp_path):
    path = crafted_tensor_checkpoint(torch, tmp_path / "ok.pth", numel=5, record_elements=5, offset=1, size=(2, 2),
                                     stride=(1, 2))

    loaded = read_torch_checkpoint(path)

    np.testing.assert_array_equal(loaded["t0"], [[1, 3], [2, 4]])
    np.testing.assert_array_equal(loaded["t0"], torch.load(path, weights_only=True)["t0"].numpy())


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a .pth tensor whose offset, size or stride reach past its storage, with negative, bool or "
                       "`2**60` numbers, mismatched size/stride counts, or views adding up to far more than the file "
                       "holds",
                       "CheckpointError saying what is wrong ('reaches element 4', 'far more than the file holds')")
@pytest.mark.parametrize("crafted, message", [
    (dict(size=(5,)), "reaches element 4"),
    (dict(offset=3, size=(2,)), "reaches element"),
    (dict(size=(2 ** 40,)), "reaches element"),
    (dict(size=(2, 2), stride=(3, 1)), "reaches element"),
    (dict(numel=5), "record has 16 bytes"),
    (dict(numel=2 ** 60), "not an integer in"),
    (dict(numel=-1), "not an integer in"),
    (dict(offset=-1), "not an integer in"),
    (dict(size=(True,)), "not an integer in"),
    (dict(size=[4]), "not a tuple"),
    (dict(size=(4,), stride=(1, 1)), "1 sizes but 2 strides"),
    (dict(size=(2 ** 31,), stride=(0,)), "far more than the file holds"),
    (dict(numel=2 ** 18, record_elements=2 ** 18, size=(2 ** 18,), copies=200), "far more than the file holds"),
])
def test_crafted_tensor_geometry_is_refused(torch, tmp_path, crafted, message):
    path = crafted_tensor_checkpoint(torch, tmp_path / "crafted.pth", **crafted)

    with pytest.raises(CheckpointError, match=message):
        read_torch_checkpoint(path)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a zip .pth without the storage record its tensor points to",
                       "CheckpointError: record 'archive/data/0' is missing")
def test_missing_storage_record(torch, tmp_path):
    path = crafted_tensor_checkpoint(torch, tmp_path / "crafted.pth")
    with zipfile.ZipFile(path) as source:
        data_pickle = source.read("archive/data.pkl")
    write_zip_checkpoint(path, data_pickle, records={})

    with pytest.raises(CheckpointError, match="record 'archive/data/0' is missing"):
        read_torch_checkpoint(path)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "malformed pickles in zip and legacy files: lengths claiming EiB/TiB/PiB, a 4 G memo index, a "
                       "memo entry never stored, unknown opcodes, no STOP, an empty stack, bogus persistent ids, "
                       "OrderedDict(5), a rot13 codec",
                       "CheckpointError naming the file")
@pytest.mark.parametrize("data_pickle", [
    b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 62) + b"abc.",  # BINBYTES8 claiming 4 EiB
    b"\x80\x04\x8d" + struct.pack("<Q", 2 ** 40) + b"abc.",  # BINUNICODE8 claiming 1 TiB
    b"\x80\x02N" + b"r" + struct.pack("<I", 2 ** 32 - 1) + b".",  # LONG_BINPUT at memo index 4 G
    b"\x80\x02" + b"j" + struct.pack("<I", 7) + b".",  # LONG_BINGET of a memo entry never stored
    b"\x80\x04\x95" + struct.pack("<Q", 2 ** 50) + b"N.",  # FRAME claiming 1 PiB
    b"\x80\x02\x8b" + struct.pack("<i", 2 ** 31 - 1) + b"\x00.",  # LONG4 claiming 2 GiB of digits
    b"\x80\x02]q\x00(K\x01K\x02",  # list left open: no STOP
    b"\x80\x02\xff.",  # unknown opcode
    b"\x80\x02\x85.",  # TUPLE1 on an empty stack
    b"\x80\x02}q\x00Q.",  # persistent id that is a dict
    b"\x80\x02(X\x07\x00\x00\x00storageK\x01K\x02K\x03K\x04tQ.",  # storage reference with a bogus type
    b"\x80\x02ccollections\nOrderedDict\nK\x05\x85R.",  # OrderedDict(5)
    b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.",  # codecs beyond latin1
])
def test_malformed_pickles_fail_cleanly(tmp_path, data_pickle):
    zip_path = write_zip_checkpoint(tmp_path / "bad.pth", data_pickle)
    with pytest.raises(CheckpointError, match="bad.pth"):
        read_torch_checkpoint(zip_path)

    legacy_path = tmp_path / "bad_legacy.pth"
    legacy_path.write_bytes(data_pickle)
    with pytest.raises(CheckpointError, match="bad_legacy.pth"):
        read_torch_checkpoint(legacy_path)


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a .pth of plain pickles with the wrong magic number",
                       "CheckpointError: magic number")
def test_legacy_header_is_checked(tmp_path):
    path = tmp_path / "not_torch.pth"
    path.write_bytes(pickle.dumps(42, protocol=2) + pickle.dumps(1001, protocol=2))
    with pytest.raises(CheckpointError, match="magic number"):
        read_torch_checkpoint(path)


# ------------------------------------------------------------------------------------------ broken files


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    """Small valid checkpoints in every format, as bytes, for truncation and fuzzing."""
    torch = pytest.importorskip("torch")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    folder = tmp_path_factory.mktemp("valid")
    state = collections.OrderedDict(
        [("w", torch.arange(6.0).reshape(2, 3)), ("b", torch.tensor([1, -2], dtype=torch.int32)),
         ("h", torch.ones(3, dtype=torch.bfloat16))])
    state["t"] = state["w"].t()
    files = {}
    for save_format in SAVE_FORMATS:
        path = torch_save(torch, {"model": state, "epoch": 1}, folder / f"{save_format}.pth", save_format)
        files[save_format] = path.read_bytes()
    training = dict(deit_style_checkpoint(torch), history=np.arange(4.0), mask=np.array([True, False]))
    files["training"] = torch_save(torch, training, folder / "training.pth", "zip").read_bytes()
    safetensors_path = folder / "model.safetensors"
    safetensors_numpy.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int64([7, 8])},
                                str(safetensors_path), metadata={"format": "np"})
    files["safetensors"] = safetensors_path.read_bytes()
    return files


def read_any(path, kind):
    return read_safetensors(path) if kind == "safetensors" else read_torch_checkpoint(path)


@pytest.mark.bad_input("checkpoint (any format)",
                       "valid .pth (zip, legacy) and .safetensors files cut at 9 points, from 1 byte to 1 byte short",
                       "CheckpointError naming the file")
@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_truncated_files_fail_cleanly(tmp_path, valid_files, kind):
    content = valid_files[kind]
    path = tmp_path / "cut.bin"
    path.write_bytes(content)
    read_any(path, kind)  # the uncut file is fine

    for cut in sorted({1, 7, 8, 12, 50, len(content) // 3, len(content) // 2, len(content) - 30,
                       len(content) - 1}):
        path.write_bytes(content[:cut])
        with pytest.raises(CheckpointError, match="cut.bin"):
            read_any(path, kind)


@pytest.mark.bad_input("checkpoint (any format)",
                       "empty, zero-filled, random, random-after-a-zip-signature, random-after-a-pickle-byte and "
                       "plain-text files, read as .pth and as .safetensors",
                       "CheckpointError naming the file")
@pytest.mark.parametrize("content", [
    b"", b"\x00" * 100, np.random.default_rng(0).bytes(4096), b"PK\x03\x04" + np.random.default_rng(1).bytes(500),
    b"\x80" + np.random.default_rng(2).bytes(500), b"plain text, not a checkpoint\n"])
def test_garbage_files_fail_cleanly(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)

    with pytest.raises(CheckpointError, match="garbage.pth"):
        read_torch_checkpoint(path)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        read_safetensors(path)


@pytest.mark.bad_input("checkpoint (any format)",
                       "a path that does not exist, or a directory, given to the .pth and .safetensors readers",
                       "CheckpointError naming the path")
@pytest.mark.parametrize("reader", [read_torch_checkpoint, read_safetensors])
def test_missing_file_and_directory(tmp_path, reader):
    with pytest.raises(CheckpointError, match="absent.pth"):
        reader(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError):
        reader(tmp_path)


# ------------------------------------------------------------------------------------------ safetensors


def test_safetensors_round_trip_with_numpy_writer(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 4)).astype(np.float32),
               "f16": rng.standard_normal(5).astype(np.float16),
               "f64": rng.standard_normal((2, 1, 2)),
               "i64": rng.integers(-2 ** 40, 2 ** 40, 4),
               "i32": rng.integers(-5, 5, (2, 2)).astype(np.int32),
               "i16": rng.integers(-5, 5, 3).astype(np.int16),
               "i8": rng.integers(-128, 128, 6).astype(np.int8),
               "u8": rng.integers(0, 256, 6).astype(np.uint8),
               "bool": rng.random(4) > 0.5,
               "scalar": np.array(3.0, dtype=np.float32),
               "empty": np.zeros((0, 2), dtype=np.float32)}
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(tensors, str(path))

    loaded = read_safetensors(path)

    assert set(loaded) == set(tensors)
    for name, expected in tensors.items():
        assert loaded[name].dtype == expected.dtype, name
        assert loaded[name].shape == expected.shape, name
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable
        np.testing.assert_array_equal(loaded[name], expected)


def test_safetensors_bfloat16_from_torch_writer(torch, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"bf16": torch.randn(4, 3).bfloat16(), "f32": torch.randn(2)}
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, str(path))

    loaded = read_safetensors(path)

    for name, tensor in tensors.items():
        assert_matches(loaded[name], tensor, torch)


def write_safetensors(path, header, data=b"", header_size=None):
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(header_bytes) if header_size is None else header_size
    path.write_bytes(struct.pack("<Q", size) + header_bytes + data)
    return path


def tensor_entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.bad_input("checkpoint (.safetensors)",
                       "a .safetensors whose header claims more bytes than the file, with offsets past the data, "
                       "reversed or overlapping, a shape that does not fit its bytes, negative/float/huge shapes, "
                       "dtype F8_E4M3, missing keys, a bad `__metadata__`, or JSON that is invalid, not an object, "
                       "has a duplicate key or nests 100,000 deep",
                       "CheckpointError saying what is wrong")
@pytest.mark.parametrize("header, data, header_size, message", [
    ({"a": tensor_entry()}, b"\x00" * 8, 10 ** 6, "header claims 1000000 bytes"),
    ({"a": tensor_entry()}, b"\x00" * 8, 2 ** 64 - 1, "header claims"),
    ({"a": tensor_entry(offsets=(0, 16))}, b"\x00" * 8, None, r"spans bytes \[0, 16\)"),
    ({"a": tensor_entry(offsets=(8, 16))}, b"\x00" * 8, None, "data section holds 8 bytes"),
    ({"a": tensor_entry(offsets=(4, 2))}, b"\x00" * 8, None, "spans bytes"),
    ({"a": tensor_entry(shape=(3,))}, b"\x00" * 8, None, "needs 12 bytes but spans 8"),
    ({"a": tensor_entry(shape=(2 ** 62, 2 ** 62))}, b"\x00" * 8, None, "needs"),
    ({"a": tensor_entry(shape=(-2,))}, b"\x00" * 8, None, "invalid shape"),
    ({"a": tensor_entry(shape=(2.0,))}, b"\x00" * 8, None, "invalid shape"),
    ({"a": tensor_entry(offsets=(0, True))}, b"\x00" * 8, None, "invalid data_offsets"),
    ({"a": tensor_entry(dtype="F8_E4M3", offsets=(0, 2))}, b"\x00" * 8, None, "unsupported dtype 'F8_E4M3'"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\x00" * 8, None, "exactly the keys"),
    ({"a": tensor_entry(), "b": tensor_entry(offsets=(4, 12), shape=(2,))}, b"\x00" * 12, None, "overlap"),
    ({"__metadata__": ["x"]}, b"", None, "__metadata__"),
    ([1, 2], b"", None, "not an object"),
    (b"{not json", b"", None, "not valid JSON"),
    (b'{"a": 1, "a": 2}', b"", None, "duplicate key"),
    (b"\xff\xfe", b"", None, "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, b"", None, "not valid JSON"),
])
def test_broken_safetensors_fail_cleanly(tmp_path, header, data, header_size, message):
    path = write_safetensors(tmp_path / "broken.safetensors", header, data, header_size)

    with pytest.raises(CheckpointError, match=message):
        read_safetensors(path)


def test_safetensors_metadata_and_empty_header(tmp_path):
    path = write_safetensors(tmp_path / "empty.safetensors", {"__metadata__": {"format": "pt"}})
    assert read_safetensors(path) == {}


# ------------------------------------------------------------------------------------------ fuzzing


def rezip_with_pickle(zip_bytes, new_pickle):
    """The same zip with data.pkl replaced, so mutations reach the unpickler instead of failing the CRC check."""
    output = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as source, zipfile.ZipFile(output, "w") as target:
        for info in source.infolist():
            is_pickle = info.filename.endswith("/data.pkl")
            target.writestr(info.filename, new_pickle if is_pickle else source.read(info))
    return output.getvalue()


def data_pickle_of(zip_bytes):
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
        return archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))


def mutate(content, flips, cut):
    mutated = bytearray(content)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    return bytes(mutated[:cut] if cut is not None else mutated)


FUZZ_TARGETS = ["zip", "zip data.pkl", "training data.pkl", "legacy", "safetensors"]
mutations = st.tuples(st.lists(st.tuples(st.integers(0, 2 ** 16), st.integers(0, 255)), min_size=1, max_size=6),
                      st.one_of(st.none(), st.integers(0, 2 ** 12)))


@pytest.mark.bad_input("checkpoint (any format)",
                       "valid .pth (zip, legacy, a training checkpoint's data.pkl) and .safetensors files with up to "
                       "6 bytes overwritten and/or cut (hypothesis, 50 examples each)",
                       "either loads or raises CheckpointError; never another exception")
@pytest.mark.parametrize("target", FUZZ_TARGETS)
@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=mutations)
def test_mutated_files_either_load_or_fail_cleanly(tmp_path, valid_files, target, mutation):
    flips, cut = mutation
    if target.endswith(" data.pkl"):
        original = valid_files[target.split()[0]]
        content = rezip_with_pickle(original, mutate(data_pickle_of(original), flips, cut))
    else:
        content = mutate(valid_files[target], flips, cut)
    path = tmp_path / "fuzzed.bin"
    path.write_bytes(content)

    try:
        read_any(path, "safetensors" if target == "safetensors" else "torch")
    except CheckpointError:
        pass
