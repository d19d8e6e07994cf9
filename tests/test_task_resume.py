"""Exact resume at the task level: Semantic FPN (train_seg's SegmentationRun) and RetinaNet (train_detector) runs
that crash mid-way on a tiny set and are resumed from their last step checkpoint end with the uninterrupted run's
weights (to 1e-6). The loop-level mechanism is tested in tests/test_loop.py; this checks that each task puts all
of its state (model, BatchNorm statistics, optimizer moments, lr step, loss scale, data position) in it."""
import numpy as np
import pytest

from pvt_dense.data.digits_detection import make_digits_detection
from pvt_dense.detection.data import DetectionBatchSource
from pvt_dense.segmentation.data import SegmentationBatchSource
from pvt_dense.segmentation.config import load_segmentation_config
from pvt_dense.segmentation.train import SegmentationRun
from test_detection_train import tiny_config as tiny_detection_config
from test_segmentation_training import TINY_RUN, write_shapes_set


class Crash(Exception):
    pass


def crash_when_preparing(monkeypatch, source_class, iteration):
    """The process 'dies' while the loop prepares the batch of `iteration` (0-based), after the steps before it."""
    real = source_class.batch

    def batch(self, epoch, index):
        if epoch * self.steps_per_epoch + index == iteration:
            raise Crash(f"simulated crash at iteration {iteration}")
        return real(self, epoch, index)

    monkeypatch.setattr(source_class, "batch", batch)
    return lambda: monkeypatch.setattr(source_class, "batch", real)


def assert_same_weights(expected, actual):
    assert set(expected) == set(actual)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-6, err_msg=name)


def values(params):
    return {p.name: p.asnumpy().copy() for p in params}


@pytest.mark.bad_input("training run (crash, interrupt, NaN)",
                       "a Semantic FPN run (flip augmentation on) that crashes at iteration 5 of 8, then resumed",
                       "the resumed run reaches the uninterrupted run's iteration and weights, BatchNorm statistics "
                       "and optimizer moments included (to 1e-6)")
def test_segmentation_run_resumes_to_the_same_weights(tmp_path, monkeypatch, pynative):
    from pvt_dense.engine.train_step import training_state_parameters
    shapes = write_shapes_set(tmp_path / "shapes", count=8)

    def run(run_dir):
        cfg = load_segmentation_config(None, TINY_RUN + ["--data_dir", str(shapes), "--ckpt_save_dir", str(run_dir),
                                                         "--total_iters", "8", "--save_interval", "2",
                                                         "--mode", "1", "--resume", "auto",
                                                         # dropout masks come from MindSpore's op-level generators,
                                                         # which a checkpoint cannot restore (as drop path)
                                                         "--dropout_ratio", "0"])
        return SegmentationRun(cfg)

    straight = run(tmp_path / "straight")
    straight.fit()
    restore = crash_when_preparing(monkeypatch, SegmentationBatchSource, 5)
    with pytest.raises(Crash):
        run(tmp_path / "resumed").fit()
    restore()
    resumed = run(tmp_path / "resumed")
    state = resumed.fit()
    assert state["iteration"] == 8
    assert_same_weights(values(training_state_parameters(straight.net, straight.optimizer, straight.train_step)),
                        values(training_state_parameters(resumed.net, resumed.optimizer, resumed.train_step)))


@pytest.mark.bad_input("training run (crash, interrupt, NaN)",
                       "a RetinaNet run (flip augmentation on) that crashes at iteration 5 of 8, then resumed",
                       "the resumed run reaches the uninterrupted run's iteration and detector weights (to 1e-6)")
def test_detection_run_resumes_to_the_same_weights(tmp_path, monkeypatch, pynative):
    from pvt_dense.detection.train import train_detector
    data = make_digits_detection(tmp_path / "digits", train_images=8, val_images=1, canvas_size=64,
                                 digit_sizes=(22, 30), min_digits=1, max_digits=2, classes=2, seed=1)

    def config(run_dir):
        return tiny_detection_config(data, run_dir, "--epochs", "4", "--save_interval", "2", "--mode", "1",
                                     "--resume", "auto", "--flip_prob", "0.5", "--val_ann", "")

    straight = train_detector(config(tmp_path / "straight"))
    restore = crash_when_preparing(monkeypatch, DetectionBatchSource, 5)
    with pytest.raises(Crash):
        train_detector(config(tmp_path / "resumed"))
    restore()
    resumed = train_detector(config(tmp_path / "resumed"))
    assert straight["iteration"] == resumed["iteration"] == 8
    assert_same_weights(values(straight["detector"].get_parameters()), values(resumed["detector"].get_parameters()))
