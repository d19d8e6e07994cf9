"""Hostile and clumsy inputs from an adversarial pass: resource bombs refused within 1 GB and 30 s, formats that
cannot be mistaken for one another, one `error:` line from every tool, refused values, and outputs that never mix
or escape their folder."""
import collections
import io
import os
import pickle
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pvt_dense.checkpoint.load import read_checkpoint, sniff_format
from pvt_dense.checkpoint.safetensors_reader import read_safetensors
from pvt_dense.config import Field, load_config, read_yaml
from pvt_dense.errors import CheckpointError, ConfigError, ImageReadError, PVTDenseError
from pvt_dense.output_names import OutputNamer, contained_path, output_names, relative_output_name

ROOT = Path(__file__).resolve().parents[1]
TEMPORARY_MARKS = (".tmp-", ".partial")


def leftovers(folder):
    return [str(path) for path in Path(folder).rglob("*") if any(mark in path.name for mark in TEMPORARY_MARKS)]


def assert_one_error_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    return errors[0]


# --- bombs: built here, refused in a fresh process whose peak memory and time are measured -------------------------

class _StorageRef:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _TensorRef:
    """Pickles as torch's `_rebuild_tensor_v2(storage, 0, (numel,), (1,), False, OrderedDict())`."""

    def __init__(self, key, numel):
        self.storage = _StorageRef(key, numel)

    def __reduce__(self):
        import torch._utils
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, (self.storage.numel,), (1,), False, collections.OrderedDict()))


class _TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            import torch
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def zip_checkpoint(path, pickle_bytes, records, compress=zipfile.ZIP_DEFLATED):
    """A torch-layout zip: <archive>/data.pkl, byteorder and data/<key> records, written in 1 MB chunks (records
    are `key -> size in bytes` of zeros), so building a multi-gigabyte bomb costs no memory."""
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", compression=compress, compresslevel=1) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", b"little")
        for key, size in records.items():
            if size == 0:
                archive.writestr(f"archive/data/{key}", b"")
                continue
            with archive.open(f"archive/data/{key}", "w", force_zip64=True) as handle:
                for start in range(0, size, len(chunk)):
                    handle.write(chunk[:min(len(chunk), size - start)])
    return path


def refusal_cost(read, path):
    """(error message, seconds, peak bytes allocated) of reading `path`, which must be refused. The peak counts what
    Python and numpy allocate (tracemalloc sees both), so it is the bomb's own cost, not the MindSpore import's."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PVTDenseError) as refused:
            read(path)
        return str(refused.value), time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)",
                       "a 450 KB zip .pth whose 12 deflated records (each under the per-record cap) inflate to 96 MB "
                       "(more records of the same kind: gigabytes); "
                       "a 6 KB deflated data.pkl of 1.2 million empty lists; a zip directory of 20 003 records",
                       "CheckpointError ('decompress to more than ... bytes in all' / 'more than 1000000 opcodes' / "
                       "'declares ... records'), "
                       "each under 30 s and 512 MB of allocations (measured: under 2 s, under 150 MB)")
def test_small_zip_checkpoints_cannot_inflate_into_gigabytes(tmp_path):
    numel = 2 * 1024 * 1024  # 8 MB of float32 zeros per record, deflated to ~40 KB
    tensors = {f"layer{i}.weight": _TensorRef(str(i), numel) for i in range(12)}
    buffer = io.BytesIO()
    _TorchLikePickler(buffer, protocol=2).dump(collections.OrderedDict(tensors))
    records_bomb = zip_checkpoint(tmp_path / "records.pth", buffer.getvalue(), {str(i): 4 * numel for i in range(12)})
    assert records_bomb.stat().st_size < 512 * 1024

    containers = b"\x80\x02(" + b"]" * 1_200_000 + b"l."  # MARK, 1.2M EMPTY_LIST, LIST, STOP
    pickle_bomb = zip_checkpoint(tmp_path / "containers.pth", containers, {})
    assert pickle_bomb.stat().st_size < 64 * 1024

    # 20 001 empty records: zipfile alone spends ~0.5 KB per record reading the directory, ~100 times the file.
    directory_bomb = zip_checkpoint(tmp_path / "directory.pth", b"\x80\x02}.",
                                    dict.fromkeys(map(str, range(20_001)), 0), compress=zipfile.ZIP_STORED)

    for path, expected in ((records_bomb, "decompress to more than"), (pickle_bomb, "opcodes"),
                           (directory_bomb, "declares 20003 records")):
        message, seconds, peak = refusal_cost(read_checkpoint, path)
        assert expected in message and seconds < 30 and peak < 512 * 1024 ** 2, (message, seconds, peak)


def radiance_hdr_bytes(height, width):
    return cv2.imencode(".hdr", np.zeros((height, width, 3), np.float32))[1].tobytes()


@pytest.mark.bad_input("image file",
                       "Radiance HDR content named .png (a format PIL cannot read a header of; OpenCV decodes it in "
                       "full)",
                       "ImageReadError 'not a decodable image' before any pixel is decoded (OpenCV's decoder is "
                       "never called)")
def test_images_whose_header_cannot_be_read_are_refused_before_decoding(tmp_path, monkeypatch):
    from pvt_dense.data import images
    path = tmp_path / "photo.png"
    path.write_bytes(radiance_hdr_bytes(64, 64))
    assert cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV would

    def decoding_is_a_failure(*args):
        raise AssertionError("the image was decoded before its size was known")

    monkeypatch.setattr(images.cv2, "imdecode", decoding_is_a_failure)
    with pytest.raises(ImageReadError, match="not a decodable image"):
        images.read_image(path)


def read_yaml_text(folder, text):
    path = folder / "config.yaml"
    path.write_text(text)
    return read_yaml(path)


BILLION_LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))


@pytest.mark.bad_input("config",
                       "300 bytes of YAML aliases (billion laughs) under a real key (mean: *l9); a list override "
                       "--mean '[&a [1,2], ...' that is not valid YAML; duplicate keys (lr twice)",
                       "ConfigError in milliseconds ('aliases expand to more than 100000 values' / 'not valid YAML' "
                       "/ 'duplicate key 'lr''), a message under 400 characters")
def test_yaml_alias_bombs_bad_list_overrides_and_duplicate_keys_are_refused(tmp_path):
    from pvt_dense.classification.config import load_classification_config
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text("l0: &l0 [0.5]\n" + BILLION_LAUGHS + "mean: *l9\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than 100000 values") as refused:
        load_classification_config(bomb)
    assert time.perf_counter() - started < 5 and len(str(refused.value)) < 400
    with pytest.raises(ConfigError, match="mean = .*not valid YAML") as refused:
        load_classification_config(None, ["--mean", "[&a [1,2], 3"])
    assert len(str(refused.value)) < 400
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("lr: 0.1\nepoch_size: 2\nlr: 5.0\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        read_yaml(duplicate)
    # Aliases within the bound still work (YAML anchors are a legitimate way to share a value), and so does
    # overriding a key brought in by a merge key.
    shared = tmp_path / "shared.yaml"
    shared.write_text("mean: &m [1.0, 2.0, 3.0]\nstd: *m\n")
    assert load_classification_config(shared).std == [1.0, 2.0, 3.0]
    assert read_yaml_text(tmp_path, "base: &b {lr: 0.1, wd: 2}\nx:\n  <<: *b\n  lr: 0.2\n")["x"] == {"lr": 0.2,
                                                                                                  "wd": 2}


# --- format sniffing on files written by the real libraries ---------------------------------------------------------

@pytest.mark.bad_input("checkpoint (.safetensors)",
                       "files written by the safetensors library whose 8-byte header length starts with pickle's "
                       "0x80 or zip's 'P' (and 'PK'), over every header length residue",
                       "recognised as safetensors and read, never refused as a corrupt pickle or zip")
def test_safetensors_files_are_never_mistaken_for_pickles_or_zips(tmp_path):
    from safetensors.numpy import save_file
    first_bytes = set()
    for length in range(1, 300):
        path = tmp_path / f"n{length}.safetensors"
        save_file({"w" * length: np.full((2,), length, np.float32)}, str(path))
        first_bytes.add(path.read_bytes()[0])
        assert sniff_format(path) == "safetensors", (length, path.read_bytes()[:8])
        np.testing.assert_array_equal(read_checkpoint(path)["w" * length], [length, length])
    assert {0x80, ord("P")} <= first_bytes
    # A header of exactly 0x4B50 bytes starts the file with 'PK', a zip's first two bytes.
    for length in range(19150, 19300):
        path = tmp_path / "pk.safetensors"
        save_file({"p" * length: np.zeros(1, np.float32)}, str(path))
        if path.read_bytes()[:2] == b"PK":
            break
    assert path.read_bytes()[:2] == b"PK"
    assert sniff_format(path) == "safetensors" and list(read_safetensors(path)) == ["p" * length]


def test_torch_files_are_still_recognised_as_torch(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"a.weight": torch.ones(2, 3)}
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("zip.pth", "legacy.pth"):
        assert sniff_format(tmp_path / name) == "torch"
        np.testing.assert_array_equal(read_checkpoint(tmp_path / name)["a.weight"], np.ones((2, 3)))


# --- one error line from every tool ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A pvt_tiny classifier in HuggingFace names, as a .safetensors file (random weights)."""
    from safetensors.numpy import save_file

    import pvt_dense
    from pvt_dense.checkpoint.keymaps import from_native
    net = pvt_dense.create_model("pvt_tiny")
    rng = np.random.default_rng(3)
    state = {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in net.get_parameters()}
    del net
    hf = from_native(state, "huggingface")
    path = tmp_path_factory.mktemp("hf") / "pvt_tiny.safetensors"
    save_file(hf, str(path))
    return path, hf


@pytest.mark.bad_input("command line",
                       "tools/convert_weights.py SRC OUT.CKPT (MindSpore appends .ckpt to temporaries not ending in "
                       "it); DST an existing folder",
                       "OUT.CKPT written and nothing else left in the folder; one 'error:' line, exit 2, no "
                       "traceback, no temporary for the folder")
def test_convert_weights_command_line_writes_any_name_and_fails_in_one_line(hf_tiny, tmp_path):
    src, _ = hf_tiny
    tool = [sys.executable, str(ROOT / "tools" / "convert_weights.py"), str(src)]
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(tool + [str(out / "OUT.CKPT")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["OUT.CKPT"]
    assert len(read_checkpoint(out / "OUT.CKPT")) == 161
    failed = subprocess.run(tool + [str(out)], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2
    assert "is a directory" in assert_one_error_line(failed.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["OUT.CKPT"]


def _safetensors(path, tensors):
    from safetensors.numpy import save_file
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.bad_input("command line",
                       "tools/convert_weights.py on: a 5000-digit layer index, a HF file whose weight is a 0-d scalar, "
                       "int32 / complex / bool weights, a .ckpt holding only a string, DST below a file",
                       "one 'error:' line naming the entry (index of more than 6 digits / shape mismatch / not a "
                       "floating point weight / holds no parameters / a file is in the way), exit 2, no traceback, "
                       "no temporary left")
def test_convert_weights_refuses_crafted_checkpoints_in_one_line(hf_tiny, tmp_path, capsys, load_tool):
    import mindspore as ms

    from pvt_dense.cli import run_tool
    tool = load_tool("convert_weights")
    _, hf = hf_tiny
    scalar_key = "pvt.encoder.patch_embeddings.0.projection.weight"
    cases = {
        "more than 6 digits": _safetensors(tmp_path / "digits.safetensors",
                                           {f"stages.0.blocks.{'1' * 5000}.attn.q.weight": np.ones(2, np.float32)}),
        "shape mismatch": _safetensors(tmp_path / "scalar.safetensors",
                                       dict(hf, **{scalar_key: np.array(1.0, np.float32)})),
        "has dtype int32": _safetensors(tmp_path / "int.safetensors",
                                        dict(hf, **{scalar_key: hf[scalar_key].astype(np.int32)})),
        "has dtype bool": _safetensors(tmp_path / "bool.safetensors",
                                       dict(hf, **{scalar_key: hf[scalar_key] > 0})),
    }
    torch = pytest.importorskip("torch")
    complex_state = dict(hf, **{scalar_key: hf[scalar_key].astype(np.complex64)})
    torch.save({k: torch.from_numpy(v) for k, v in complex_state.items()}, tmp_path / "complex.pth")
    cases["has dtype complex64"] = str(tmp_path / "complex.pth")
    ms.save_checkpoint([], str(tmp_path / "string.ckpt"), append_dict={"note": "hello"})
    cases["holds no parameters"] = str(tmp_path / "string.ckpt")
    for expected, src in cases.items():
        assert run_tool(tool.main, [src, str(tmp_path / "out.ckpt")]) == 2
        err = capsys.readouterr().err
        assert_one_error_line(err)  # a report that does not fit goes on indented lines under it
        assert expected in err, expected
    (tmp_path / "blocker").write_text("a file")
    assert run_tool(tool.main, [str(hf_tiny[0]), str(tmp_path / "blocker" / "x.ckpt")]) == 2
    assert "a file is in the way" in assert_one_error_line(capsys.readouterr().err)
    assert not leftovers(tmp_path) and not (tmp_path / "out.ckpt").exists()


@pytest.mark.bad_input("command line",
                       "train_cls --lr nan / --warmup_factor inf / --seed 10**30 / --epoch_size 10**12 / "
                       "--scale '[1,'; "
                       "infer_det, infer_seg and export_features with --output naming a file or a path below a file",
                       "one 'error:' line naming the key or the output path, exit 2, no traceback, nothing trained "
                       "or loaded")
def test_tools_refuse_bad_values_and_unwritable_outputs_in_one_line(tmp_path, capsys, load_tool):
    from pvt_dense.cli import run_tool
    train_cls = load_tool("train_cls")
    for argv, key in ((["--lr", "nan"], "lr"), (["--warmup_factor", "inf"], "warmup_factor"),
                      (["--seed", "1" + "0" * 30], "seed"), (["--epoch_size", "1" + "0" * 12], "epoch_size"),
                      (["--scale", "[1,"], "scale")):
        assert run_tool(train_cls.main, argv + ["--data_dir", str(tmp_path)]) == 2
        assert f"{key} = " in assert_one_error_line(capsys.readouterr().err), argv
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    for tool, extra in (("infer_det", ["--ckpt_path", "missing.ckpt"]), ("infer_seg", ["--ckpt_path", "missing.ckpt"]),
                        ("export_features", ["--backbone", "pvt_tiny"])):
        for output in (blocker, blocker / "sub"):
            assert run_tool(load_tool(tool).main, extra + ["--input", str(image), "--output", str(output)]) == 2
            assert "--output" in assert_one_error_line(capsys.readouterr().err), (tool, output)


def test_unexpected_errors_become_one_line_too(capsys, monkeypatch):
    from pvt_dense.cli import TRACEBACK_ENV, run_tool
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)

    def broken(argv):
        raise RuntimeError("deep inside\n" + "C++ trace line\n" * 50)

    def unwritable(argv):
        raise PermissionError(13, "Permission denied", "/root/out")

    assert run_tool(broken) == 1
    assert "unexpected RuntimeError: deep inside" in assert_one_error_line(capsys.readouterr().err)
    assert run_tool(unwritable) == 2
    assert assert_one_error_line(capsys.readouterr().err) == "error: /root/out: Permission denied"


@pytest.mark.bad_input("command line",
                       "tools/train_cls.py --lr nan through the real command line",
                       "exit 2 with one 'error:' line naming lr, no traceback")
def test_a_refused_value_through_the_real_command_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "train_cls.py"), "--lr", "nan", "--data_dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "lr = 'nan' is not allowed" in assert_one_error_line(done.stderr)


# --- refused values -------------------------------------------------------------------------------------------------

@pytest.mark.bad_input("config",
                       "nan / inf / -inf for float keys (also list items), 1e400, ints beyond int64 or as 'nan'",
                       "ConfigError naming the key and 'finite float' / the int range")
def test_config_refuses_non_finite_floats_and_huge_ints():
    schema = {"lr": Field(0.1, float, low=0.0), "iou_thr": Field(0.5, float, low=0.0, high=1.0),
              "gamma": Field(2.0, float), "std": Field([1.0, 1.0], list, item=float),
              "size": Field(1, int), "seed": Field(0, int, low=0)}
    for key, value in (("lr", "nan"), ("iou_thr", "NaN"), ("gamma", "-inf"), ("gamma", "1e400"),
                       ("std", ["1", "inf"]), ("size", str(2 ** 63)), ("size", "nan"), ("seed", float("inf"))):
        with pytest.raises(ConfigError, match=f"{key} = .*not allowed"):
            load_config(schema, overrides=[(key, value)])
    assert load_config(schema, overrides=[("size", str(2 ** 63 - 1))]).size == 2 ** 63 - 1
    with pytest.raises(ConfigError, match="finite float"):
        load_config(schema, overrides=[("gamma", "nan")])


@pytest.mark.bad_input("config",
                       "total_iters 10**8 (segmentation), epoch_size x steps beyond 10 million",
                       "ConfigError naming the key before any schedule list is built")
def test_schedules_longer_than_ten_million_iterations_are_refused():
    from pvt_dense.engine.schedules import warmup_poly_schedule, warmup_step_schedule
    from pvt_dense.segmentation.config import load_segmentation_config
    with pytest.raises(ConfigError, match="total_iters"):
        load_segmentation_config(None, ["--total_iters", str(10 ** 8)])
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="total_iters"):
        warmup_poly_schedule(0.1, 10 ** 12)
    with pytest.raises(ConfigError, match="epochs x iterations per epoch"):
        warmup_step_schedule(0.1, 10 ** 12, [1])
    assert time.perf_counter() - started < 1


@pytest.mark.bad_input("ADE20K annotation",
                       "a grayscale JPEG (lossy) named .png as a label map",
                       "AnnotationError naming the file: 'JPEG data, a lossy format'")
def test_lossy_label_maps_are_refused_whatever_their_name(tmp_path):
    from pvt_dense.segmentation.ade20k import read_label_raw
    labels = np.repeat(np.arange(8, dtype=np.uint8), 8).reshape(8, 8)
    Image.fromarray(labels).save(tmp_path / "label.png", format="JPEG")
    with pytest.raises(PVTDenseError, match="label.png.*JPEG data, a lossy format"):
        read_label_raw(tmp_path / "label.png")
    Image.fromarray(labels).save(tmp_path / "real.png", format="PNG")
    np.testing.assert_array_equal(read_label_raw(tmp_path / "real.png"), labels)


def test_weights_must_be_floating_point_but_counters_may_be_integers():
    from pvt_dense.checkpoint.load import check_weight_dtypes
    check_weight_dtypes({"bn.num_batches_tracked": np.array(3), "w": np.ones(2, np.float16)}, "x")
    for dtype in (np.int64, np.bool_, np.complex64):
        with pytest.raises(CheckpointError, match=f"'w' has dtype {np.dtype(dtype)}"):
            check_weight_dtypes({"w": np.ones(2, dtype)}, "x")


# --- runs that cannot trample each other ----------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys
    from pvt_dense.engine.checkpoints import CheckpointManager
    from pvt_dense.errors import PVTDenseError
    try:
        manager = CheckpointManager(sys.argv[1])
    except PVTDenseError as err:
        print("refused:", err)
        sys.exit(3)
    print("owned", flush=True)
    if sys.argv[2] == "hold":
        sys.stdin.readline()
""")


@pytest.mark.bad_input("training run (crash, interrupt, NaN)",
                       "a second run started into an output folder a live run owns; a run into a folder whose owner "
                       "was killed",
                       "RunDirectoryBusyError naming the owner's pid and host; the dead owner's lock is taken over")
def test_an_output_folder_is_owned_by_one_run_at_a_time(tmp_path):
    from pvt_dense.engine.checkpoints import CheckpointManager
    from pvt_dense.engine.run_lock import RunDirectoryBusyError
    run_dir = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir), "hold"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "owned"
        with pytest.raises(RunDirectoryBusyError, match=f"in use by another run \\(process {owner.pid} on "):
            CheckpointManager(run_dir)
        # Its temporaries in flight are not touched by the refused run.
        in_flight = run_dir / ".tmp-0123456789ab-ckpt_e0001_s0000001.ckpt"
        in_flight.write_bytes(b"being written")
        with pytest.raises(RunDirectoryBusyError):
            CheckpointManager(run_dir)
        assert in_flight.exists()
    finally:
        owner.kill()
        owner.wait()
    # The owner died without cleaning up (kill -9): its lock file is still there, and taken over.
    assert (run_dir / ".run.lock").exists()
    manager = CheckpointManager(run_dir)
    assert not in_flight.exists()  # now surely stale, so removed
    second = subprocess.run([sys.executable, "-c", HOLD_LOCK, str(run_dir), "exit"], capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 3 and f"process {os.getpid()}" in second.stdout
    manager.run_lock.release()


def test_the_stop_message_promises_a_kept_checkpoint_only_when_there_is_one(tmp_path):
    from pvt_dense.engine.checkpoints import CheckpointManager
    manager = CheckpointManager(tmp_path / "run")
    assert manager.kept_sentence().startswith("No checkpoint was written to")
    manager.save({"w": np.ones(2, np.float32)}, {"epoch": 1, "global_step": 1})
    assert manager.kept_sentence().startswith("The last good checkpoint is kept in")
    manager.run_lock.release()


# --- output names: one rule for every tool --------------------------------------------------------------------------

@pytest.mark.bad_input("output path",
                       "inputs cat.jpg, cat.png, CAT.JPG, a/b.png and a_b.png, absolute paths (/data/x.png, "
                       "C:\\data\\x.png), '../' names, a name of only '..'",
                       "distinct relative output names (extension kept, '~2' for case collisions, absolute paths "
                       "flattened to their file name); PVTDenseError for a name that leaves nothing")
def test_one_output_name_rule_for_every_tool():
    names = ["cat.jpg", "cat.png", "CAT.JPG", "a/b.png", "a_b.png", "/data/x.png", "C:\\data\\x.png",
             "../../etc/y.png", "sub/../z.png", "./w.png", "\\\\server\\share\\v.png", "odd:name?.png"]
    assert output_names(names) == ["cat.jpg", "cat.png", "CAT~2.JPG", "a/b.png", "a_b.png", "x.png", "x~2.png",
                                   "etc/y.png", "z.png", "w.png", "v.png", "odd_name_.png"]
    assert output_names(["cat.jpg", "Cat.jpg"], suffix=".npz") == ["cat.jpg.npz", "Cat.jpg~2.npz"]
    namer = OutputNamer(reserved=("detections.json",))
    assert namer.name_for("detections.json") == "detections~2.json"
    for name in ("..", "../..", "/", "."):
        with pytest.raises(PVTDenseError, match="no usable output file name"):
            relative_output_name(name)


class _FakeSegmentation:
    """Stands in for a Predictor: the image's mean brightness as every pixel's class, so outputs tell inputs apart."""

    class network:
        @staticmethod
        def set_train(mode):
            pass

    @staticmethod
    def predict(image):
        return np.full(image.shape[:2], int(round(float(image.mean()))) % 3, np.uint8)


@pytest.mark.bad_input("output path",
                       "tools/infer_seg inputs cat.jpg and cat.png in one folder; a list with a missing file and a "
                       "name that is only '..'",
                       "two separate outputs (masks/cat.jpg.png, masks/cat.png.png); the bad entries are reported "
                       "and every other image is segmented")
def test_infer_seg_keeps_cat_jpg_and_cat_png_apart_and_survives_bad_entries(tmp_path):
    from pvt_dense.segmentation.infer import infer_images
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "cat.jpg"), np.full((8, 8, 3), 1, np.uint8))
    cv2.imwrite(str(images / "cat.png"), np.full((8, 8, 3), 2, np.uint8))
    summary = infer_images(_FakeSegmentation(), images, tmp_path / "out", 3, progress=False)
    assert sorted(summary["written"]) == ["cat.jpg", "cat.png"] and not summary["existing"]
    masks = tmp_path / "out" / "masks"
    assert cv2.imread(str(masks / "cat.jpg.png"), cv2.IMREAD_UNCHANGED).max() == 1
    assert cv2.imread(str(masks / "cat.png.png"), cv2.IMREAD_UNCHANGED).max() == 2
    listing = tmp_path / "list.txt"
    listing.write_text("images/missing.png\n..\nimages/cat.png\n")
    summary = infer_images(_FakeSegmentation(), listing, tmp_path / "out2", 3, progress=False)
    assert summary["written"] == ["images/cat.png"]
    assert sorted(summary["unreadable"]) == ["..", "images/missing.png"]


@pytest.mark.bad_input("output path",
                       "tools/infer_det output folder holding a symlink (named like an input's subfolder) that points "
                       "out of it",
                       "that image is reported failed ('outside the output folder'); nothing is written through the "
                       "symlink; the other images are drawn")
def test_infer_det_never_writes_through_a_symlink_out_of_its_folder(tmp_path, monkeypatch):
    from pvt_dense.detection import infer
    images = tmp_path / "images"
    (images / "evil").mkdir(parents=True)
    cv2.imwrite(str(images / "evil" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(images / "b.png"), np.zeros((8, 8, 3), np.uint8))
    out, trap = tmp_path / "out", tmp_path / "trap"
    out.mkdir()
    trap.mkdir()
    os.symlink(trap, out / "evil")
    no_boxes = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    monkeypatch.setattr(infer, "detect_file", lambda *args: no_boxes)

    class Detector:
        def set_train(self, mode):
            pass

    summary = infer.infer_images(Detector(), images, out, ["digit"], settings=None, progress=False)
    assert os.listdir(trap) == []
    assert [name for name, _ in summary["failed"]] == ["evil/a.png"]
    assert "outside the output folder" in summary["failed"][0][1]
    assert summary["written"] == [contained_path(out, "b.png")]
