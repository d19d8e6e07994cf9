"""Training checkpoints, the per-epoch metrics log and the digits ImageNet: the files a long run leaves behind must
survive crashes, resumes and re-runs without losing or duplicating anything."""
import json
import os

import cv2
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from pvt_dense.data.digits import META_NAME, _plan_split, make_digits_imagenet
from pvt_dense.engine.checkpoints import CheckpointManager, read_checkpoint_meta
from pvt_dense.engine.metrics_log import MetricsLog
from pvt_dense.engine.run_lock import LOCK_NAME
from pvt_dense.errors import CheckpointError, ConfigError, PVTDenseError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def temporaries(directory):
    return sorted(name for name in os.listdir(directory) if ".tmp" in name)


def small_state(seed):
    rng = np.random.default_rng(seed)
    return {"head.weight": rng.standard_normal((3, 2)).astype(np.float32), "step": np.array(seed, np.int32)}


def save_epochs(manager, metrics, steps_per_epoch=10):
    return [manager.save(small_state(epoch), {"epoch": epoch, "global_step": epoch * steps_per_epoch,
                                              "rng": {"seed": epoch, "state": [1, 2, 3]}}, metric=metric)
            for epoch, metric in enumerate(metrics)]


# -- checkpoints -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, metrics, best_epoch", [("max", [0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.6], 3),
                                                       ("min", [0.9, 0.5, 0.7, 0.1, 0.8, None, 0.3], 3)])
def test_rotation_keeps_last_periodic_checkpoints_and_the_best(tmp_path, mode, metrics, best_epoch):
    manager = CheckpointManager(tmp_path, keep_last=3, mode=mode)
    paths = save_epochs(manager, metrics)

    assert manager.periodic_checkpoints() == ["ckpt_e0004_s0000040.ckpt", "ckpt_e0005_s0000050.ckpt",
                                              "ckpt_e0006_s0000060.ckpt"]
    assert sorted(os.listdir(tmp_path)) == sorted(manager.periodic_checkpoints()
                                                  + ["ckpt_best.ckpt", "latest.json", LOCK_NAME])
    best_meta = read_checkpoint_meta(tmp_path / "ckpt_best.ckpt")
    assert best_meta["epoch"] == best_epoch and best_meta["metric"] == metrics[best_epoch]
    assert best_meta["rng"] == {"seed": best_epoch, "state": [1, 2, 3]}  # nested meta survives
    with open(tmp_path / "latest.json", encoding="utf-8") as handle:
        assert json.load(handle)["checkpoint"] == os.path.basename(paths[-1])
    assert manager.latest() == (paths[-1], read_checkpoint_meta(paths[-1]))

    restarted = CheckpointManager(tmp_path, keep_last=3, mode=mode)
    assert restarted.best_metric == metrics[best_epoch]
    worse = 0.0 if mode == "max" else 1.0
    restarted.save(small_state(7), {"epoch": 7, "global_step": 70}, metric=worse)
    assert read_checkpoint_meta(tmp_path / "ckpt_best.ckpt")["epoch"] == best_epoch


@pytest.mark.bad_input("checkpoint (.ckpt)",
                       "a run whose newest training checkpoint is cut in half or loses its CRC trailer",
                       "RuntimeWarning naming the file; resuming picks the previous checkpoint")
@pytest.mark.parametrize("cut", ["half", "crc_trailer"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, cut):
    manager = CheckpointManager(tmp_path, keep_last=5)
    paths = save_epochs(manager, [0.1, 0.2, 0.3])
    newest = paths[-1]
    size = os.path.getsize(newest)
    os.chmod(newest, 0o600)  # MindSpore leaves checkpoints read-only
    with open(newest, "r+b") as handle:
        handle.truncate(size // 2 if cut == "half" else size - 17)

    with pytest.warns(RuntimeWarning, match=os.path.basename(newest)):
        found = manager.latest()
    assert found is not None
    path, meta = found
    assert path == paths[-2] and meta["epoch"] == 1 and meta["global_step"] == 10


@pytest.mark.bad_input("checkpoint (.ckpt)",
                       "a run folder whose latest.json is truncated",
                       "RuntimeWarning naming latest.json; the newest readable checkpoint is used")
def test_damaged_latest_json_falls_back_to_the_newest_readable_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path)
    paths = save_epochs(manager, [0.1, 0.2])
    with open(tmp_path / "latest.json", "r+b") as handle:
        handle.truncate(5)
    with pytest.warns(RuntimeWarning, match="latest.json"):
        assert manager.latest()[0] == paths[-1]


@pytest.mark.bad_input("training run (crash, interrupt, NaN)",
                       "a crash between writing a checkpoint's temporary file and renaming it; the temporaries a kill "
                       "-9 leaves",
                       "the previous checkpoint, latest.json and best metric stay; leftover temporaries are removed "
                       "on restart")
def test_crash_between_temp_write_and_replace_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    first = manager.save(small_state(0), {"epoch": 0, "global_step": 10}, metric=0.5)
    pointer_before = (tmp_path / "latest.json").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="simulated crash"):
            manager.save(small_state(1), {"epoch": 1, "global_step": 20}, metric=0.9)
    assert (tmp_path / "latest.json").read_bytes() == pointer_before
    assert manager.periodic_checkpoints() == [os.path.basename(first)]
    assert manager.latest()[0] == first and manager.best_metric == 0.5

    # What a kill -9 at that moment leaves: our temporary and the one MindSpore derives from its name.
    (tmp_path / ".tmp-0123456789ab-ckpt_e0001_s0000020.ckpt").write_bytes(b"partial")
    (tmp_path / ".tmp-0123456789ab-ckpt_e0001_s0000020.tmp").write_bytes(b"partial")
    restarted = CheckpointManager(tmp_path)
    assert temporaries(tmp_path) == []
    second = restarted.save(small_state(1), {"epoch": 1, "global_step": 20}, metric=0.9)
    assert restarted.latest()[0] == second
    assert temporaries(tmp_path) == []


def adam_training(seed):
    """A tiny Dense + Adam with seeded weights, and a function taking one step on a fixed batch."""
    rng = np.random.default_rng(seed)
    net = nn.Dense(4, 3)
    net.weight.set_data(ms.Tensor(rng.standard_normal((3, 4)).astype(np.float32)))
    net.bias.set_data(ms.Tensor(rng.standard_normal(3).astype(np.float32)))
    optimizer = nn.Adam(net.trainable_params(), learning_rate=0.05)
    loss_fn = nn.MSELoss()
    inputs = ms.Tensor(np.linspace(-1, 1, 8 * 4, dtype=np.float32).reshape(8, 4))
    targets = ms.Tensor(np.linspace(0, 1, 8 * 3, dtype=np.float32).reshape(8, 3))
    grad_fn = ms.value_and_grad(lambda x, y: loss_fn(net(x), y), None, optimizer.parameters)

    def step():
        _, grads = grad_fn(inputs, targets)
        optimizer(grads)

    return net, optimizer, step


def values(*cells):
    return {param.name: param.asnumpy().copy() for cell in cells for _, param in cell.parameters_and_names()}


def test_load_into_restores_weights_and_optimizer_state_exactly(tmp_path, pynative):
    net, optimizer, step = adam_training(seed=0)
    step()
    manager = CheckpointManager(tmp_path)
    path = manager.save([net, optimizer], {"epoch": 0, "global_step": 1, "lr": 0.05}, metric=0.25)

    resumed_net, resumed_optimizer, resumed_step = adam_training(seed=1)
    meta = manager.load_into(path, [resumed_net, resumed_optimizer])
    assert meta["epoch"] == 0 and meta["lr"] == 0.05 and meta["metric"] == 0.25
    saved, restored = values(net, optimizer), values(resumed_net, resumed_optimizer)
    assert {"moment1.weight", "moment2.bias", "global_step", "beta1_power"} <= set(restored)
    assert saved.keys() == restored.keys()
    for name in saved:
        assert saved[name].dtype == restored[name].dtype and np.array_equal(saved[name], restored[name]), name
    assert int(restored["global_step"].reshape(-1)[0]) == 1

    # The moments, not just the weights, came back: the next step is the same step.
    step()
    resumed_step()
    for name, value in values(net, optimizer).items():
        assert np.array_equal(value, values(resumed_net, resumed_optimizer)[name]), name


@pytest.mark.bad_input("checkpoint (.ckpt)",
                       "a weights-only training checkpoint resumed into a model and its optimizer, or into a wider "
                       "layer",
                       "CheckpointError naming the missing parameters (moment1.weight, global_step) or the shape "
                       "mismatch; nothing is changed")
def test_load_into_refuses_missing_or_misshapen_parameters_and_changes_nothing(tmp_path, pynative):
    net, optimizer, step = adam_training(seed=0)
    manager = CheckpointManager(tmp_path)
    weights_only = manager.save(net, {"epoch": 0, "global_step": 0})

    fresh_net, fresh_optimizer, _ = adam_training(seed=1)
    before = values(fresh_net, fresh_optimizer)
    with pytest.raises(CheckpointError, match=r"moment1\.weight") as caught:
        manager.load_into(weights_only, [fresh_net, fresh_optimizer])
    assert "global_step" in str(caught.value)
    after = values(fresh_net, fresh_optimizer)
    assert all(np.array_equal(before[name], after[name]) for name in before)  # all or nothing

    assert manager.load_into(weights_only, fresh_net)["epoch"] == 0  # unused names in the file are fine
    assert np.array_equal(fresh_net.weight.asnumpy(), net.weight.asnumpy())

    wider = nn.Dense(5, 3)
    with pytest.raises(CheckpointError, match=r"weight \(file \(3, 4\)"):
        manager.load_into(weights_only, [wider.weight, wider.bias])  # loose Parameters work too


# -- metrics log -------------------------------------------------------------------------------------------------

@pytest.mark.bad_input("metrics log",
                       "a record with a nested dict value; a record for an epoch already logged",
                       "PVTDenseError naming the nested value, or pointing to resume_from_epoch")
def test_metrics_records_round_trip_through_both_files(tmp_path):
    log = MetricsLog(tmp_path)
    records = [{"epoch": 0, "train_loss": np.float32(2.5), "top1": 0.1, "lr": 1e-3, "phase": "warmup"},
               {"epoch": 1, "train_loss": 1.75, "top1": np.float64(0.4), "lr": 5e-4, "phase": "cosine"}]
    for record in records:
        log.append(record)
    reopened = MetricsLog(tmp_path)
    assert reopened.records == [{key: (float(v) if isinstance(v, np.floating) else v) for key, v in r.items()}
                                for r in records]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    assert temporaries(tmp_path) == []
    with pytest.raises(PVTDenseError, match="nested"):
        log.append({"epoch": 2, "nested": {"a": 1}})
    with pytest.raises(PVTDenseError, match="resume_from_epoch"):
        log.append({"epoch": 1, "train_loss": 1.0})


def test_resume_drops_records_after_the_checkpoint_epoch(tmp_path):
    log = MetricsLog(tmp_path)
    for epoch in range(5):
        log.append({"epoch": epoch, "train_loss": 1.0 / (epoch + 1)})
    resumed = MetricsLog(tmp_path, resume_from_epoch=2)
    assert [record["epoch"] for record in resumed.records] == [0, 1, 2]
    resumed.append({"epoch": 3, "train_loss": 0.3})
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == [0, 1, 2, 3]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == ["0,1.0", "1,0.5", "2,0.3333333333333333",
                                                                       "3,0.3"]


def test_csv_header_is_the_union_of_keys(tmp_path):
    log = MetricsLog(tmp_path)
    log.append({"train_loss": 2.0, "epoch": 0})
    log.append({"epoch": 1, "train_loss": 1.5, "val_loss": 1.7, "top1": 0.3})
    log.append({"epoch": 2, "val_loss": 1.2, "mIoU": 0.1})
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows == ["epoch,train_loss,val_loss,top1,mIoU", "0,2.0,,,", "1,1.5,1.7,0.3,", "2,,1.2,,0.1"]


@pytest.mark.bad_input("metrics log", "plotting an empty log", "PVTDenseError: nothing to plot")
def test_plot_writes_a_valid_png(tmp_path):
    log = MetricsLog(tmp_path)
    for epoch in range(4):
        log.append({"epoch": epoch, "train_loss": 2.0 - 0.3 * epoch, "val_loss": 2.1 - 0.25 * epoch,
                    "val_top1": 0.2 * epoch, "top5": 0.25 * epoch, "lr": 0.1, "note": "x"})
    path = log.plot()
    assert path == str(tmp_path / "curves.png")
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    image = cv2.imread(path)
    assert image is not None and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) > 100
    assert temporaries(tmp_path) == []
    with pytest.raises(PVTDenseError, match="nothing to plot"):
        MetricsLog(tmp_path / "empty").plot()


# -- digits ImageNet ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sklearn_digits():
    """scikit-learn's digits (8x8 images and labels), which make_digits_imagenet writes out."""
    from sklearn.datasets import load_digits
    return load_digits()


def dataset_files(root):
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)


def test_digits_counts_labels_and_images(tmp_path, sklearn_digits):
    root = tmp_path / "digits"
    summary = make_digits_imagenet(root, image_size=24, classes=4, limit_per_class=10, seed=3)
    assert summary["written"] and summary["class_names"] == ["n00000000", "n00000001", "n00000002", "n00000003"]
    assert (summary["train"], summary["val"]) == (32, 8)
    for split, per_class in (("train", 8), ("val", 2)):
        assert sorted(os.listdir(root / split)) == summary["class_names"]
        for class_index, class_name in enumerate(summary["class_names"]):
            names = sorted(os.listdir(root / split / class_name))
            assert len(names) == per_class and summary["counts"][split][class_name] == per_class
            for name in names:  # the file name is the index in load_digits(): the label must agree
                assert sklearn_digits.target[int(name[:-4])] == class_index
    train_names = {name for _, _, names in os.walk(root / "train") for name in names}
    val_names = {name for _, _, names in os.walk(root / "val") for name in names}
    assert not train_names & val_names

    for path in dataset_files(root)[::7]:
        if not path.endswith(".png"):
            continue
        image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        assert image.shape == (24, 24, 3) and image.dtype == np.uint8
        assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
        source = sklearn_digits.images[int(os.path.basename(path)[:-4])]
        shrunk = cv2.resize(image[..., 0].astype(np.float32), (8, 8), interpolation=cv2.INTER_AREA) * 16 / 255
        assert np.abs(shrunk - source).mean() < 1.5 and image.max() > 128


def test_digits_split_is_stratified_and_seeded(sklearn_digits):
    plan = _plan_split(sklearn_digits.target, val_fraction=0.2, classes=10, seed=0, limit_per_class=None)
    for digit in range(10):
        members = set(np.flatnonzero(sklearn_digits.target == digit).tolist())
        train, val = set(plan["train"][digit]), set(plan["val"][digit])
        assert train | val == members and not train & val
        assert len(val) == round(0.2 * len(members))
    assert sum(len(v) for v in plan["val"].values()) == 359
    assert _plan_split(sklearn_digits.target, 0.2, 10, 0, None) == plan
    assert _plan_split(sklearn_digits.target, 0.2, 10, 1, None)["val"] != plan["val"]


def test_digits_second_call_rewrites_nothing_and_an_interrupted_build_resumes(tmp_path):
    root = tmp_path / "digits"
    make_digits_imagenet(root, image_size=16, classes=3, limit_per_class=5)
    stamps = {path: os.stat(path).st_mtime_ns for path in dataset_files(root)}
    again = make_digits_imagenet(root, image_size=16, classes=3, limit_per_class=5)
    assert not again["written"]
    assert {path: os.stat(path).st_mtime_ns for path in dataset_files(root)} == stamps

    # A build killed halfway: the meta still says incomplete and an image is missing.
    meta = json.loads((root / META_NAME).read_text())
    (root / META_NAME).write_text(json.dumps(dict(meta, complete=False)))
    lost = next(path for path in stamps if path.endswith(".png"))
    os.remove(lost)
    resumed = make_digits_imagenet(root, image_size=16, classes=3, limit_per_class=5)
    assert resumed["written"] and os.path.isfile(lost)
    untouched = [path for path in stamps if path.endswith(".png") and path != lost]
    assert all(os.stat(path).st_mtime_ns == stamps[path] for path in untouched)

    resized = make_digits_imagenet(root, image_size=12, classes=2, limit_per_class=4)
    assert resized["written"] and sorted(os.listdir(root / "train")) == ["n00000000", "n00000001"]
    assert len([p for p in dataset_files(root) if p.endswith(".png")]) == 8
    assert cv2.imread(dataset_files(root / "val")[0]).shape == (12, 12, 3)


@pytest.mark.bad_input("output path",
                       "the digits dataset built into a folder holding a user's file or another generator's meta "
                       "file; limit_per_class=1",
                       "ConfigError naming the folder ('not empty') or the value; the user's file is untouched")
def test_digits_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("my thesis")
    with pytest.raises(ConfigError, match=str(tmp_path)):
        make_digits_imagenet(tmp_path, limit_per_class=2)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]

    impostor = tmp_path / "other"
    impostor.mkdir()
    (impostor / META_NAME).write_text(json.dumps({"generator": "someone else"}))
    with pytest.raises(ConfigError, match="not empty"):
        make_digits_imagenet(impostor, limit_per_class=2)
    with pytest.raises(ConfigError, match="limit_per_class"):
        make_digits_imagenet(tmp_path / "new", limit_per_class=1)
