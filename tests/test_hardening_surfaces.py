"""Hostile input on the newer surfaces (whole-model checkpoints and their metadata, the image-header pre-pass,
output subfolders, the run lock, the kernel cache), met the way a user meets it: through the tools. Each case ends
in one clear line naming the file and what is wrong, or works within a bound; nothing already computed is lost."""
import contextlib
import json
import os
import signal
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import cv2
import mindspore as ms
import numpy as np
import pytest

from pvt_dense.errors import CheckpointError, PVTDenseError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hardening import assert_one_error_line  # noqa: E402  (shared helpers of the first pass)

# A RetinaNet and a Semantic FPN on PVT-Tiny with narrow necks and heads: every key family of the real files, built
# and run in seconds (PyNative, 64x48 images at a 64-pixel scale).
DET_NARROW = [("mode", 1), ("pretrained", ""), ("num_classes", 3), ("neck_channels", 16),
              ("head_channels", 16), ("head_stacked_convs", 1)]
DET_TOOL_ARGS = [f"--{key}={value}" for key, value in DET_NARROW] + ["--img_scale=[64, 64]", "--progress_bar=False"]
SEG_NARROW = [("mode", 1), ("pretrained", ""), ("num_classes", 3), ("neck_channels", 16), ("head_channels", 8)]
SEG_TOOL_ARGS = [f"--{key}={value}" for key, value in SEG_NARROW] + ["--test_scale=[64, 64]",
                                                                     "--progress_bar=False"]


@contextlib.contextmanager
def no_hang(seconds=120):
    """Fail instead of hanging forever (an open() of a FIFO waits for a writer that never comes)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_image(path, value=90, size=(48, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full(size + (3,), value, np.uint8))
    return path


@pytest.fixture
def run(load_tool):
    """run(tool, argv, capsys): (exit status, stdout, stderr) of tools/<tool>.py run in this process as its command
    line would run it."""
    from pvt_dense.cli import run_tool

    def call(tool, argv, capsys):
        status = run_tool(load_tool(tool).main, [str(arg) for arg in argv])
        out, err = capsys.readouterr()
        return status, out, err
    return call


# --- small whole-model checkpoints, native and OpenMMLab -----------------------------------------------------------

def detection_cfg():
    from pvt_dense.detection.config import load_detection_config
    return load_detection_config(None, DET_NARROW)


@pytest.fixture(scope="module")
def detector_state():
    """{structural name: array} of a narrow 3-class RetinaNet with random weights, built once."""
    from pvt_dense.detection.build import build_retinanet
    detector = build_retinanet(detection_cfg(), load_pretrained=False)
    rng = np.random.default_rng(0)
    state = {}
    for name, param in detector.parameters_and_names():
        value = (0.05 * rng.standard_normal(param.shape)).astype(np.float32)
        if name.endswith(("gamma", "moving_variance")):
            value += 1
        state[name] = value
    return state


def native_detector(path, state, meta, edit=None):
    """A native detector checkpoint of `state` (after `edit(state)`) with metadata `meta`."""
    from pvt_dense.checkpoint.whole_model import save_whole_model
    from pvt_dense.detection.build import build_retinanet
    state = dict(state)
    if edit:
        edit(state)
    detector = build_retinanet(detection_cfg(), load_pretrained=False)
    for name, param in detector.parameters_and_names():
        param.set_data(ms.Tensor(state[name]))
    return save_whole_model(detector, str(path), meta)


def mmlab_state(state):
    """The RetinaNet `state` in an official PVT release's names (mmdetection 2.x): backbone in the official PVT
    names under `backbone.`, mmdetection's neck and head names."""
    from pvt_dense.checkpoint.keymaps import from_native
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    out = {"backbone." + k: v for k, v in from_native(backbone, "official").items()}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "neck":
            kind, index = parts[1], int(parts[2])
            if kind == "extra_convs":
                kind, index = "fpn_convs", index + 3  # three levels used: the extra convs follow in fpn_convs
            out[f"neck.{kind}.{index}.conv.{parts[3]}"] = value
        elif parts[0] == "head" and parts[1] in ("cls_convs", "reg_convs"):
            out[f"bbox_head.{parts[1]}.{int(parts[2]) // 2}.conv.{parts[3]}"] = value
        elif parts[0] == "head":
            out[f"bbox_head.{parts[1]}.{parts[2]}"] = value
    return out


def save_mmlab(path, state, meta):
    torch = pytest.importorskip("torch")
    torch.save({"meta": meta, "state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}},
               str(path))
    return str(path)


@pytest.fixture
def detect_tool(run):
    """detect_tool(ckpt, images, out, capsys, extra=()): `run` of infer_det on a folder, guarded against hangs."""
    def call(ckpt, images, out, capsys, extra=()):
        with no_hang():
            return run("infer_det", ["--ckpt_path", ckpt, "--input", images, "--output", out, *DET_TOOL_ARGS,
                                     *extra], capsys)
    return call


@pytest.fixture
def image_folder(tmp_path):
    """Two images and a FIFO named like one (which infer_det's header pre-pass and reader must skip, not wait on)."""
    folder = tmp_path / "images"
    write_image(folder / "a.png", 40)
    write_image(folder / "b.png", 200)
    os.mkfifo(folder / "pipe.jpg")
    return folder


# --- 1: FIFOs among the images ----------------------------------------------------------------------------------------

@pytest.mark.bad_input("image", "a FIFO named pipe.jpg in a .txt list beside an ordinary image "
                       "(tools/export_features.py; infer_det and infer_seg meet one in their input folder below); a "
                       "FIFO as the list file",
                       "no hang: the header pre-pass skips it and it is reported 'not a regular file'; the ordinary "
                       "image is exported, exit 0; the FIFO list: one 'error:' line naming it, exit 2")
def test_a_fifo_among_the_images_is_skipped_not_waited_for(tmp_path, capsys, run):
    from pvt_dense.data.images import header_image_size, read_image
    folder = tmp_path / "images"
    write_image(folder / "ok.png")
    os.mkfifo(folder / "pipe.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("images/pipe.jpg\nimages/ok.png\n")
    with no_hang():
        assert header_image_size(folder / "pipe.jpg") is None
        with pytest.raises(PVTDenseError, match="pipe.jpg.*not a regular file"):
            read_image(folder / "pipe.jpg")
        # (infer_det and infer_seg meet the FIFO in an input folder below.)
        out = tmp_path / "feats"
        status, stdout, stderr = run("export_features", ["--backbone", "pvt_tiny", "--input", listing, "--output", out,
                                                         "--short-side", "32", "--no-progress"], capsys)
        assert status == 0, stderr
        assert "not a regular file" in stdout and "pipe.jpg" in stdout
        assert [p.name for p in out.rglob("*.npz")] == ["ok.png.npz"]
        os.mkfifo(tmp_path / "fifo.txt")  # the list file itself
        status, _, stderr = run("export_features", ["--backbone", "pvt_tiny", "--input", tmp_path / "fifo.txt",
                                                    "--output", tmp_path / "feats_fifo"], capsys)
        assert status == 2 and "fifo.txt': not a regular file" in assert_one_error_line(stderr)


# --- 2, 11: class names in a whole-model file's meta ------------------------------------------------------------------

@pytest.mark.bad_input("dense checkpoint", "tools/infer_det.py with an OpenMMLab RetinaNet .pth whose meta CLASSES "
                       "holds a 1 MB name",
                       "one 'error:' line naming the file and CLASSES[1] (1048576 characters; a class name has 1 to "
                       "256), exit 2 before any model is built; nothing written")
def test_a_megabyte_class_name_is_refused_before_any_model_is_built(detector_state, image_folder, tmp_path, capsys,
                                                                       monkeypatch, detect_tool):
    from pvt_dense.detection import build
    path = save_mmlab(tmp_path / "names.pth", mmlab_state(detector_state),
                      {"CLASSES": ("cat", "x" * (1 << 20), "dog"), "mmdet_version": "2.13.0"})

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from refused metadata")

    monkeypatch.setattr(build, "build_retinanet", no_model)
    status, out, err = detect_tool(path, image_folder, tmp_path / "out", capsys)
    assert status == 2
    line = assert_one_error_line(err)
    assert path in line and "CLASSES[1] is 1048576 characters long" in line and len(line) < 400
    assert len(out) < 1000 and not list((tmp_path / "out").iterdir())


@pytest.mark.bad_input("dense checkpoint", "tools/infer_det.py with an OpenMMLab RetinaNet .pth whose classification "
                       "bias makes every anchor fire (2 images and a FIFO named pipe.jpg)",
                       "at most max_per_img detections per image; detections.json names each class once (top-level "
                       "'classes'), each detection gives its label: the file stays small")
def test_every_anchor_firing_gives_a_bounded_json_naming_each_class_once(detector_state, image_folder, tmp_path,
                                                                         capsys, detect_tool):
    state = mmlab_state(detector_state)
    state["bbox_head.retina_cls.bias"] = np.full_like(state["bbox_head.retina_cls.bias"], 20.0)
    names = ("person", "bicycle", "car")
    path = save_mmlab(tmp_path / "fire.pth", state, {"CLASSES": names, "mmdet_version": "2.13.0"})
    status, out, err = detect_tool(path, image_folder, tmp_path / "out", capsys, ["--max_per_img=50"])
    assert status == 0, err
    text = (tmp_path / "out" / "detections.json").read_text()
    results = json.loads(text)
    assert results["classes"] == [{"label": i, "name": name} for i, name in enumerate(names)]
    assert sorted(results["images"]) == ["a.png", "b.png"]
    assert results["failed"] == {"pipe.jpg": "not a regular file (a FIFO, device or socket)"}
    for image in results["images"].values():
        assert len(image["detections"]) == 50
        assert all(set(d) == {"bbox_xyxy", "score", "label"} for d in image["detections"])
    assert sum(text.count(name) for name in names) == 3 and len(text) < 100_000


@pytest.mark.bad_input("dense checkpoint", "class names holding a newline with a forged 'error: ...' line, an ANSI "
                       "escape and a NUL (tools/infer_det.py, OpenMMLab .pth)",
                       "the load report prints them escaped (\\n, \\x1b, \\x00): no forged line, no raw control "
                       "character; detections.json keeps them exactly (JSON-escaped)")
def test_control_characters_in_class_names_are_escaped_when_printed(detector_state, image_folder, tmp_path, capsys,
                                                                    detect_tool):
    names = ("cat\nerror: forged line", "\x1b[31mred", "nul\x00byte")
    path = save_mmlab(tmp_path / "escapes.pth", mmlab_state(detector_state),
                      {"CLASSES": names, "mmdet_version": "2.13.0"})
    status, out, err = detect_tool(path, image_folder, tmp_path / "out", capsys)
    assert status == 0, err
    assert not any(line.startswith("error:") for line in (out + err).splitlines())
    assert "\x1b" not in out + err and "\x00" not in out + err
    assert "cat\\nerror: forged line" in out and "\\x1b[31mred" in out and "nul\\x00byte" in out
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [c["name"] for c in results["classes"]] == list(names)


# --- 4, 5, 9: native metadata checked before the model is built -------------------------------------------------------

NATIVE_META_CASES = [
    pytest.param({"class_names": ["a", "b", "c"], "category_ids": ["1", "2", "3"]}, "category_ids[0] is '1'",
                 marks=pytest.mark.bad_input("dense checkpoint", "tools/infer_det.py with a native detector .ckpt "
                                             "whose meta category_ids are strings, or fewer than its classes",
                                             "one 'error:' line naming the file and category_ids, exit 2, before "
                                             "any image is read"), id="string-ids"),
    pytest.param({"class_names": ["a", "b", "c"], "category_ids": [1, 2]},
                 "category_ids has 2 entries but it names 3", id="short-ids"),
    pytest.param({"class_names": 5}, "class_names is of type int, not a list of names",
                 marks=pytest.mark.bad_input("dense checkpoint", "tools/infer_det.py with a native detector .ckpt "
                                             "whose meta class_names is the number 5",
                                             "one 'error:' line naming the file and class_names, exit 2"),
                 id="int-names"),
    pytest.param({"class_names": [f"c{i}" for i in range(100_000)]},
                 "names 100000 classes but its classifier detector.head.retina_cls.weight has 27 outputs",
                 marks=pytest.mark.bad_input("dense checkpoint", "tools/infer_det.py with a native detector .ckpt "
                                             "naming 100 000 classes and holding weights for 3",
                                             "one 'error:' line naming the file and the classifier's 27 outputs (3 "
                                             "classes at 9 anchors), before a 100 000-class head is built"),
                 id="names-beyond-weights"),
]


@pytest.mark.parametrize("meta, expected", NATIVE_META_CASES)
def test_native_metadata_is_checked_before_the_detector_is_built(detector_state, image_folder, tmp_path, capsys,
                                                                 monkeypatch, meta, expected, detect_tool):
    from pvt_dense.detection import build
    path = native_detector(tmp_path / "meta.ckpt", detector_state, {"task": "detector", **meta})

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from refused metadata")

    monkeypatch.setattr(build, "build_retinanet", no_model)
    status, out, err = detect_tool(path, image_folder, tmp_path / "out", capsys)
    assert status == 2
    line = assert_one_error_line(err)
    assert path in line and expected in line, line
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.bad_input("image", "an unexpected failure half-way through tools/infer_det.py's images (the second of "
                       "two)", "detections.json is still written, with the first image's detections and the second "
                       "named as where it stopped; the error propagates")
def test_detections_of_earlier_images_survive_a_later_failure(tmp_path, image_folder, monkeypatch):
    from pvt_dense.detection import infer
    seen = []

    def detect(*args):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("boom")
        return np.array([[1, 2, 10, 12]], np.float32), np.array([0.9], np.float32), np.array([1])

    class Detector:
        def set_train(self, mode):
            pass

    monkeypatch.setattr(infer, "detect_file", detect)
    with pytest.raises(RuntimeError, match="boom"):
        infer.infer_images(Detector(), image_folder, tmp_path / "out", ["x", "y"], settings=None, progress=False,
                           category_ids=[7, 9])
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert results["classes"] == [{"label": 0, "name": "x", "category_id": 7},
                                  {"label": 1, "name": "y", "category_id": 9}]
    assert results["images"]["a.png"]["detections"] == [{"bbox_xyxy": [1.0, 2.0, 10.0, 12.0], "score": 0.9,
                                                         "label": 1, "category_id": 9}]
    assert results["failed"] == {"b.png": "stopped here: RuntimeError"}


# --- 6: two copies of one weight under different prefixes -------------------------------------------------------------

@pytest.mark.bad_input("checkpoint (.pth/.bin pickle)", "tools/convert_weights.py on an OpenMMLab RetinaNet .pth "
                       "holding backbone.patch_embed1.proj.weight and module.backbone.patch_embed1.proj.weight; a "
                       ".safetensors backbone with backbone.X and model.backbone.X",
                       "one 'error:' line naming the two copies, exit 2, nothing written; the whole-model loader "
                       "refuses the .pth too")
def test_two_copies_of_a_weight_under_stripped_prefixes_are_refused(detector_state, tmp_path, capsys, run):
    from safetensors.numpy import save_file

    from pvt_dense.checkpoint import load_whole_model
    from pvt_dense.checkpoint.keymaps import from_native
    from pvt_dense.detection.build import build_retinanet
    state = mmlab_state(detector_state)
    key = "backbone.patch_embed1.proj.weight"
    state["module." + key] = state[key] + 1
    path = save_mmlab(tmp_path / "twice.pth", state, {"CLASSES": ("a", "b", "c")})
    status, _, err = run("convert_weights", [path, tmp_path / "out.ckpt"], capsys)
    assert status == 2 and f"two tensors named '{key}'" in assert_one_error_line(err)
    detector = build_retinanet(detection_cfg(), load_pretrained=False)
    with pytest.raises(CheckpointError, match=f"two tensors named '{key}'"):
        load_whole_model(detector, path)

    backbone = {k[len("backbone."):]: v for k, v in detector_state.items() if k.startswith("backbone.")}
    official = {"backbone." + k: v for k, v in from_native(backbone, "official").items()}
    official["model.backbone.pos_embed1"] = official["backbone.pos_embed1"] * 2
    save_file(official, str(tmp_path / "twice.safetensors"))
    status, _, err = run("convert_weights", [tmp_path / "twice.safetensors", tmp_path / "out.ckpt"], capsys)
    assert status == 2
    assert "'model.backbone.pos_embed1' and 'backbone.pos_embed1' are two copies" in assert_one_error_line(err)
    assert not (tmp_path / "out.ckpt").exists()


# --- 7: non-finite weights in whole-model files -----------------------------------------------------------------------

@pytest.mark.bad_input("dense checkpoint", "NaN / inf in the classification head and the patch embedding of a "
                       "whole-model file (tools/infer_det.py on an OpenMMLab .pth; a native .ckpt)",
                       "a 'warning: checkpoint ... has non-finite values in 2 tensors: ...' line naming them, as the "
                       "backbone loader warns; the run goes on")
def test_non_finite_whole_model_weights_are_warned_about(detector_state, image_folder, tmp_path, capsys, detect_tool):
    from pvt_dense.checkpoint import load_whole_model
    from pvt_dense.detection.build import build_retinanet
    state = mmlab_state(detector_state)
    state["bbox_head.retina_cls.weight"] = state["bbox_head.retina_cls.weight"].copy()
    state["bbox_head.retina_cls.weight"][0, 0, 0, 0] = np.nan
    state["backbone.patch_embed1.proj.weight"] = np.full_like(state["backbone.patch_embed1.proj.weight"], np.inf)
    path = save_mmlab(tmp_path / "nan.pth", state, {"CLASSES": ("a", "b", "c")})
    status, _, err = detect_tool(path, image_folder, tmp_path / "out", capsys)
    assert status == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "has non-finite values in 2 tensors" in warnings[0], err
    assert "head.retina_cls.weight" in warnings[0] and "patch_embed.proj.weight" in warnings[0]

    def poison(native):
        native["head.retina_cls.bias"] = np.full_like(native["head.retina_cls.bias"], np.nan)

    native = native_detector(tmp_path / "nan.ckpt", detector_state, {"task": "detector"}, poison)
    detector = build_retinanet(detection_cfg(), load_pretrained=False)
    report = load_whole_model(detector, native)
    assert report.warnings == [f"checkpoint {native} has non-finite values in 1 tensors: head.retina_cls.bias"]


# --- 8, 10: the run lock ---------------------------------------------------------------------------------------------

@pytest.mark.bad_input("training run (crash, interrupt, NaN)", "an output folder whose .run.lock is a hard link to "
                       "another file, or a FIFO",
                       "PVTDenseError naming the lock ('has 2 hard links' / 'not a regular file'); the linked file "
                       "is unchanged, nothing hangs")
@pytest.mark.parametrize("kind", ["hard link", "fifo"])
def test_a_lock_file_that_is_a_hard_link_or_a_fifo_is_refused(tmp_path, kind):
    from pvt_dense.engine.checkpoints import CheckpointManager
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / ".run.lock"
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    if kind == "hard link":
        os.link(precious, lock)
        expected = "has 2 hard links"
    else:
        os.mkfifo(lock)
        expected = "not a regular file"
    with no_hang(), pytest.raises(PVTDenseError, match=expected) as refused:
        CheckpointManager(run_dir)
    assert str(lock) in str(refused.value)
    assert precious.read_text() == "keep me"


# --- 12: an output subfolder that leads elsewhere --------------------------------------------------------------------

@pytest.fixture(scope="module")
def segmentor_ckpt(tmp_path_factory):
    from pvt_dense.checkpoint.whole_model import save_whole_model
    from pvt_dense.segmentation.build import build_segmentor
    from pvt_dense.segmentation.config import load_segmentation_config
    net = build_segmentor(load_segmentation_config(None, SEG_NARROW))
    path = tmp_path_factory.mktemp("seg") / "semfpn.ckpt"
    return save_whole_model(net, str(path), {"task": "segmentor", "class_names": ["sky", "road", "tree"]})


@pytest.mark.bad_input("output path", "tools/infer_seg.py with OUT/masks a symlink to another folder; with "
                       "OUT/masks/sub a symlink out (for input sub/b.png), a FIFO and an ordinary image beside it",
                       "exit 2 with one 'error:' line naming the folder, before the model is loaded; exit 2 naming "
                       "sub/b.png, the other image's outputs written, the FIFO skipped; nothing written elsewhere")
def test_infer_seg_fails_when_an_output_subfolder_leads_elsewhere(segmentor_ckpt, tmp_path, capsys, run):
    images = tmp_path / "images"
    write_image(images / "a.png")
    write_image(images / "sub" / "b.png")
    os.mkfifo(images / "pipe.jpg")
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    os.symlink(elsewhere, out / "masks")
    arguments = ["--input", images, "--output", out, *SEG_TOOL_ARGS]
    status, _, err = run("infer_seg", ["--ckpt_path", tmp_path / "not_loaded_yet.ckpt"] + arguments, capsys)
    assert status == 2 and "masks" in assert_one_error_line(err) and "leads out of" in err
    arguments += ["--ckpt_path", segmentor_ckpt]
    os.remove(out / "masks")
    (out / "masks").mkdir()
    os.symlink(elsewhere, out / "masks" / "sub")
    with no_hang():
        status, stdout, err = run("infer_seg", arguments, capsys)
    assert status == 2
    line = assert_one_error_line(err)
    assert "sub/b.png" in line and "outside the output folder" in line
    assert "1 images segmented" in stdout and "1 unreadable skipped" in stdout and "1 not written" in stdout
    assert "skipped pipe.jpg: not a regular file" in err
    assert (out / "masks" / "a.png.png").is_file() and os.listdir(elsewhere) == []


@pytest.mark.bad_input("output path", "tools/infer_det.py with OUT/sub a symlink out of OUT, for input sub/a.png",
                       "exit 2 with one 'error:' line naming sub/a.png; the other image drawn and detections.json "
                       "written; nothing written through the symlink")
def test_infer_det_fails_when_a_drawn_image_cannot_be_written(tmp_path, capsys, monkeypatch, detect_tool):
    from pvt_dense.detection import build, infer

    class Detector:
        def set_train(self, mode):
            pass

    monkeypatch.setattr(build, "load_detector_with_names", lambda cfg, path: (Detector(), ["x"], None))
    monkeypatch.setattr(infer, "detect_file", lambda *args: (np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                                             np.zeros(0, np.int64)))
    images, out, elsewhere = tmp_path / "images", tmp_path / "out", tmp_path / "elsewhere"
    write_image(images / "sub" / "a.png")
    write_image(images / "b.png")
    elsewhere.mkdir()
    out.mkdir()
    os.symlink(elsewhere, out / "sub")
    status, stdout, err = detect_tool(tmp_path / "any.ckpt", images, out, capsys)
    assert status == 2
    line = assert_one_error_line(err)
    assert "sub/a.png" in line and "outside the output folder" in line
    assert (out / "b.png").is_file() and os.listdir(elsewhere) == []
    assert list(json.loads((out / "detections.json").read_text())["images"]) == ["b.png"]


# --- 3: the kernel library --------------------------------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")


def compile_stub(tmp_path):
    """A real shared library of 100+ KB (a large initialised array), like the kernel library in form."""
    from pvt_dense.models import kernel_library
    source = tmp_path / "stub.cc"
    source.write_text('static char big[100000] = {1};\nextern "C" char *PvtStub() { return big; }\n')
    library = tmp_path / "stub.so"
    subprocess.run([kernel_library._compiler(), "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


@needs_compiler
@pytest.mark.bad_input("kernel library", "a truncated copy of a shared library at the cached kernel library's name "
                       "(owner and mode correct, no build record), met by tools/export_features.py",
                       "no SIGBUS: one warning ('segment ... past its end ... truncated'), MindSpore's operators, "
                       "the features written, exit 0")
def test_a_truncated_library_in_the_cache_never_crashes_a_tool(tmp_path):
    from pvt_dense.models import fast_ops, kernel_library
    cache = tmp_path / "cache"
    kernel_library.private_cache_dir(str(cache))
    target = kernel_library.library_candidates(kernel_library.read_kernel_sources(), kernel_library._compiler(),
                                               str(cache))[0][0]
    whole = compile_stub(tmp_path).read_bytes()
    Path(target).write_bytes(whole[:len(whole) // 2])
    os.chmod(target, 0o700)
    probe = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({target!r})"], capture_output=True)
    assert probe.returncode < 0  # loading it unchecked kills the process (SIGBUS on Linux with glibc)
    write_image(tmp_path / "ok.png")
    env = dict(os.environ, PVT_DENSE_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    env.pop(fast_ops.ENV_SWITCH, None)
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "export_features.py"), "--backbone", "pvt_tiny",
                           "--input", str(tmp_path / "ok.png"), "--output", str(tmp_path / "feats"), "--short-side",
                           "32", "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    warned = [line for line in done.stderr.splitlines() if "kernels unavailable" in line]
    assert len(warned) == 1 and "past its end" in warned[0] and "truncated" in warned[0], done.stderr[-3000:]
    assert (tmp_path / "feats" / "ok.png.npz").is_file()


@needs_compiler
@pytest.mark.bad_input("kernel library", "the cached kernel library replaced by a shorter or altered file after its "
                       "build recorded its size and SHA-256",
                       "removed and built again (once); a rebuild that fails falls back with one warning saying "
                       "what differed; a build writes its record before publishing the library")
def test_a_library_that_differs_from_its_build_record_is_rebuilt(tmp_path, monkeypatch, pynative):
    import warnings

    from pvt_dense.models import fast_ops, kernel_library
    cache = tmp_path / "cache"
    monkeypatch.setattr(fast_ops, "_STATE", {})
    monkeypatch.setenv(kernel_library.ENV_CACHE_DIR, str(cache))
    monkeypatch.delenv(fast_ops.ENV_SWITCH, raising=False)
    stub = compile_stub(tmp_path)
    calls = tmp_path / "calls"
    # A "compiler" that writes the stub where -o says (a build that succeeds, in milliseconds), or fails once
    # told to; one script throughout, since the compiler's identity is part of the cache key.
    failing = tmp_path / "fail"
    fake = tmp_path / "fake-cxx"
    fake.write_text(f'#!/bin/sh\necho call >> "{calls}"\nif [ -e "{failing}" ]; then echo "fake-cxx: no" >&2; '
                    f'exit 1; fi\nwhile [ "$1" != "-o" ]; do shift; done\ncp "{stub}" "$2"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fast_ops.kernels() is None  # the stub lacks the kernels: built, recorded, refused at loading
    target = kernel_library.library_candidates(kernel_library.read_kernel_sources(), kernel_library._compiler(),
                                               str(cache))[0][0]
    record = json.loads(Path(kernel_library.record_path(target)).read_text())
    assert record["size"] == stub.stat().st_size and "lacks the kernel symbols" in str(caught[-1].message)

    Path(target).write_bytes(stub.read_bytes()[:1000])  # damaged since
    os.chmod(target, 0o700)
    failing.touch()
    monkeypatch.setattr(fast_ops, "_STATE", {})
    before = len(calls.read_text().splitlines())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fast_ops.kernels() is None
    message = "\n".join(str(w.message) for w in caught if "kernels unavailable" in str(w.message))
    assert f"{target} was removed: it has 1000 bytes but {stub.stat().st_size} were built" in message
    assert len(calls.read_text().splitlines()) > before  # rebuilt (and that failed here)
    assert not os.path.exists(target)


# --- 13: a 16-bit image within a memory bound -------------------------------------------------------------------------

@pytest.mark.bad_input("image", "a 16-bit colour PNG (here 1500x1500; the adversarial pass used 9000x9000, 472 KB, "
                       "2.19 GB peak)",
                       "read to 8 bits band by band: the conversion allocates under 1.5x its 8-bit result (it was "
                       "over 10x); values (v + 128) // 257 as before")
def test_a_16_bit_image_is_read_within_a_memory_bound(tmp_path):
    from pvt_dense.data.images import DECODE_FLAGS, read_image, to_rgb8
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 65536, (1500, 1500, 3), dtype=np.uint16)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), pixels)
    decoded = cv2.imdecode(np.fromfile(path, np.uint8), DECODE_FLAGS)
    tracemalloc.start()
    try:
        rgb = to_rgb8(str(path), decoded)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * rgb.nbytes, (peak, rgb.nbytes)
    expected = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)[..., ::-1]
    np.testing.assert_array_equal(read_image(path), expected)
    gray = pixels[..., 0]
    cv2.imwrite(str(path), gray)
    np.testing.assert_array_equal(read_image(path), np.repeat(expected[..., 2:3], 3, axis=2))


# --- batched_nms on degenerate boxes ---------------------------------------------------------------------------------

@pytest.mark.bad_input("detections", "detection.postprocess.batched_nms on zero-area, inverted and identical boxes",
                       "the same boxes kept as torchvision's batched_nms (IoU 0/0 is not above the threshold: both "
                       "of two identical empty boxes stay), best score first")
def test_batched_nms_keeps_degenerate_boxes_as_torchvision_does():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from pvt_dense.detection.postprocess import batched_nms
    empty = np.array([[5, 5, 5, 9], [5, 5, 5, 9], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    assert list(batched_nms(empty, np.array([0.9, 0.8, 0.7, 0.6], np.float32), np.zeros(4), 0.5)) == [0, 1, 2]
    rng = np.random.default_rng(0)
    for trial in range(200):
        count = int(rng.integers(1, 30))
        corner = rng.integers(0, 20, (count, 2)).astype(np.float32)
        size = rng.integers(-2, 6, (count, 2)).astype(np.float32)
        size[rng.random(count) < 0.3] = 0
        boxes = np.concatenate([corner, corner + size], axis=1)
        boxes[1::2] = boxes[0::2][:count // 2]  # identical pairs
        scores = rng.permutation(count).astype(np.float32) / count + 0.01
        labels = rng.integers(0, 3, count)
        ours = batched_nms(boxes, scores, labels, 0.5)
        reference = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                                torch.from_numpy(labels), 0.5).numpy()
        assert list(ours) == list(reference), trial
