"""The shared iteration loop: exact resume after a crash, evaluation and best checkpoint, non-finite loss, logs."""
import json
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import nn, ops

from pvt_dense.checkpoint.mindspore_ckpt import load_mindspore_checkpoint
from pvt_dense.engine.loop import IterationLoop, NonFiniteLossError
from pvt_dense.engine.schedules import warmup_poly_schedule, warmup_step_schedule
from pvt_dense.engine.train_step import TrainStep


class Crash(Exception):
    pass


class RandomRegression:
    """A deterministic batch source: batch (epoch, index) is a pure function of its arguments."""

    def __init__(self, steps_per_epoch=3, crash_at=None, poison_at=None):
        self.steps_per_epoch = steps_per_epoch
        self.crash_at = crash_at
        self.poison_at = poison_at
        self.calls = []

    def batch(self, epoch, index):
        position = epoch * self.steps_per_epoch + index
        if position == self.crash_at:
            raise Crash(f"simulated crash preparing iteration {position}")
        rng = np.random.default_rng([7, epoch, index])
        x = rng.standard_normal((4, 5)).astype(np.float32)
        y = (x @ np.arange(1, 6, dtype=np.float32)[:, None] / 5).astype(np.float32)
        if position == self.poison_at:
            x[0, 0] = np.nan
        return x, y


class Regressor(nn.Cell):
    def __init__(self):
        super().__init__()
        ms.set_seed(3)
        self.fc = nn.Dense(5, 1)
        self.loss = nn.MSELoss()

    def construct(self, x, y):
        return self.loss(self.fc(x), y)


def make_loop(run_dir, source, total_iters=8, evaluate=None, **kwargs):
    from mindcv.optim.adamw import AdamW
    net = Regressor()
    schedule = warmup_step_schedule(0.05, total_iters, milestones=[5], warmup_iters=2)
    optimizer = AdamW(net.trainable_params(), learning_rate=schedule, weight_decay=0.01)
    step = TrainStep(net, optimizer)
    loop = IterationLoop(step, source, schedule, total_iters, run_dir,
                         [net, optimizer, step.scale, step.clean_steps], evaluate=evaluate, progress_bar=False,
                         log_interval=2, **kwargs)
    return loop, net


def weights(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def test_a_crashed_run_resumes_to_the_uninterrupted_weights(tmp_path, pynative):
    reference_loop, reference_net = make_loop(tmp_path / "whole", RandomRegression())
    state = reference_loop.run()
    assert state["iteration"] == 8 and state["epoch"] == 2

    # Checkpoints at iterations 4 and 8; the crash comes after iteration 6 was logged, so the resumed run
    # restarts mid-epoch (epoch 1, batch 1) and repeats iterations 5-6.
    crashing_loop, _ = make_loop(tmp_path / "crash", RandomRegression(crash_at=7), save_interval=4)
    with pytest.raises(Crash):
        crashing_loop.run()
    assert crashing_loop.checkpoints.latest()[1]["loop_state"]["iteration"] == 4
    resumed_loop, resumed_net = make_loop(tmp_path / "crash", RandomRegression(), save_interval=4)
    assert resumed_loop.run()["iteration"] == 8
    for name, value in weights(reference_net).items():
        np.testing.assert_allclose(weights(resumed_net)[name], value, atol=1e-6, err_msg=name)

    with open(tmp_path / "crash" / "metrics.jsonl", encoding="utf-8") as handle:
        iterations = [json.loads(line)["iteration"] for line in handle]
    assert iterations == [2, 4, 6, 8]  # each logged once although iterations 5-6 ran twice


def test_a_checkpoint_of_the_former_classification_trainer_resumes_where_it_stopped(tmp_path, pynative):
    # Before classification ran on this loop, its checkpoints kept the training position at the top level of the
    # meta (epoch, step_in_epoch, global_step...) and no loop_state.
    from pvt_dense.engine.checkpoints import META_KEY, CheckpointManager
    reference_loop, reference_net = make_loop(tmp_path / "whole", RandomRegression())
    reference_loop.run()
    crashing_loop, _ = make_loop(tmp_path / "old", RandomRegression(crash_at=7), save_interval=4)
    with pytest.raises(Crash):
        crashing_loop.run()
    path, _ = crashing_loop.checkpoints.latest()
    arrays = {name: value.asnumpy() for name, value in load_mindspore_checkpoint(path).items() if name != META_KEY}
    old_meta = {"epoch": 1, "step_in_epoch": 1, "global_step": 4, "overflow_steps": 0, "best_top1": None,
                "skipped_images": 0, "config": {}, "class_names": []}
    CheckpointManager(tmp_path / "old", prefix="model").save(arrays, old_meta)
    assert "loop_state" not in crashing_loop.checkpoints.latest()[1]
    resumed_loop, resumed_net = make_loop(tmp_path / "old", RandomRegression(), save_interval=4)
    assert resumed_loop.run()["iteration"] == 8
    for name, value in weights(reference_net).items():
        np.testing.assert_allclose(weights(resumed_net)[name], value, atol=1e-6, err_msg=name)


def test_evaluation_picks_the_best_checkpoint(tmp_path, pynative):
    scores = {3: 0.2, 6: 0.9, 8: 0.5}
    loop, _ = make_loop(tmp_path, RandomRegression(), evaluate=lambda it: {"score": scores[it]},
                        eval_interval=3, metric_name="score")
    state = loop.run()
    assert state["best_metric"] == 0.9
    best_path, best_meta = loop.checkpoints.best()
    assert best_meta["loop_state"]["iteration"] == 6 and best_meta["metric"] == 0.9
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl", encoding="utf-8")]
    assert [r.get("val_score") for r in records if "val_score" in r] == [0.2, 0.9, 0.5]
    assert os.path.exists(tmp_path / "curves.png")


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, pynative):
    loop, _ = make_loop(tmp_path, RandomRegression(poison_at=5), save_interval=2)
    with pytest.raises(NonFiniteLossError, match="iteration 6"):
        loop.run()
    assert loop.checkpoints.latest()[1]["loop_state"]["iteration"] == 4


def test_mindspore_loss_scale_cell_cannot_replace_train_step_on_the_cpu(pynative):
    # MindSpore's TrainOneStepWithLossScaleCell (+ DynamicLossScaleUpdateCell) would skip overflowing updates and
    # adjust the scale as TrainStep does, but anywhere but a GPU it checks overflow with the Ascend status kernel,
    # which the CPU lacks; it also has no gradient-norm clipping, which the recipes use (clip_grad_norm).
    import inspect
    net = Regressor()
    x, y = RandomRegression().batch(0, 0)
    theirs = nn.TrainOneStepWithLossScaleCell(
        net, nn.SGD(net.trainable_params(), learning_rate=0.01),
        scale_sense=nn.DynamicLossScaleUpdateCell(loss_scale_value=1024.0, scale_factor=2, scale_window=2))
    with pytest.raises(RuntimeError, match="NPUGetFloatStatusV2"):
        theirs(ms.Tensor(x), ms.Tensor(y))
    assert not any("clip" in name for name in inspect.signature(nn.TrainOneStepWithLossScaleCell).parameters)
    ours = TrainStep(net, nn.SGD(net.trainable_params(), learning_rate=0.01), loss_scale=1024.0,
                     dynamic_loss_scale=True, clip_grad_norm=1.0)
    loss, overflow, _ = ours(ms.Tensor(x), ms.Tensor(y))
    assert np.isfinite(loss.asnumpy()) and not bool(overflow.asnumpy())


def test_schedules_follow_mmcv_semantics():
    steps = warmup_step_schedule(1.0, 12, milestones=[8, 11], warmup_iters=4, warmup_ratio=0.001)
    # Hand-computed: warmup factor 1 - (1 - i/4) * 0.999 for i < 4; then 1, x0.1 from 8, x0.01 from 11.
    np.testing.assert_allclose(steps[:5], [0.001, 0.25075, 0.5005, 0.75025, 1.0])
    np.testing.assert_allclose(steps[7:], [1.0, 0.1, 0.1, 0.1, 0.01])
    poly = warmup_poly_schedule(2.0, 4, power=0.5, min_lr=0.0)
    np.testing.assert_allclose(poly, [2.0, 2 * 0.75 ** 0.5, 2 * 0.5 ** 0.5, 2 * 0.25 ** 0.5])


def test_mindcv_schedulers_cannot_express_the_dense_recipes_warmup_and_steps():
    # RetinaNet 1x (mmdetection): a linear warmup of 500 iterations, a fraction of an epoch, and x0.1 at the starts
    # of epochs 8 and 11. mindcv's create_scheduler warms up for whole epochs only and counts its milestones from
    # the warmup's end, so the dense recipes keep warmup_step_schedule (mmcv's semantics, tested above).
    from mindcv.scheduler import create_scheduler
    recipe = dict(scheduler="multi_step_decay", lr=1.0, min_lr=0.0, warmup_factor=0.001, decay_rate=0.1,
                  milestones=[8, 11], num_epochs=12, lr_epoch_stair=False)
    with pytest.raises(TypeError):
        create_scheduler(100, warmup_epochs=0.05, **recipe)

    def decays(schedule):
        values = np.asarray(schedule, dtype=np.float64)
        return (np.flatnonzero(values[1:] < values[:-1] - 1e-12) + 1).tolist()

    assert decays(warmup_step_schedule(1.0, 1200, [800, 1100], 0.1, warmup_iters=5, warmup_ratio=0.001)) == [800, 1100]
    assert decays(create_scheduler(100, warmup_epochs=1, **recipe)) == [900]


class TwoLayers(nn.Cell):
    """Gradients of several shapes, large enough (x100 targets) that clipping at 1.0 bites."""

    def __init__(self):
        super().__init__()
        ms.set_seed(5)
        self.fc1 = nn.Dense(5, 16)
        self.fc2 = nn.Dense(16, 1)

    def construct(self, x, y):
        return ops.mean((self.fc2(ops.relu(self.fc1(x))) - y * 100.0) ** 2)


@pytest.mark.parametrize("loss_scale", [1.0, 1024.0])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernel-library", "mindspore-ops"])
@pytest.mark.parametrize("clip, mode", [(0.0, ms.PYNATIVE_MODE), (1.0, ms.PYNATIVE_MODE), (1e6, ms.PYNATIVE_MODE),
                                        (1.0, ms.GRAPH_MODE)], ids=["no-clip", "clip", "clip-above-norm", "graph"])
def test_clipped_update_is_torch_clip_grad_norm(kernels, clip, mode, loss_scale, pynative):
    # SGD with lr 1 makes the update the (unscaled, clipped) gradient itself; the reference clips the plain
    # gradients with torch.nn.utils.clip_grad_norm_'s rule in float64.
    import contextlib
    from mindspore import ops as mops
    from pvt_dense.models.fast_ops import kernels as kernel_library, mindspore_ops_only
    if kernels and kernel_library() is None:
        pytest.skip("kernel library unavailable")
    ms.set_context(mode=mode)
    x, y = RandomRegression().batch(0, 1)
    net = TwoLayers()
    weights = net.trainable_params()
    grads = mops.GradOperation(get_by_list=True)(net, weights)(ms.Tensor(x), ms.Tensor(y))
    grads = [g.asnumpy().astype(np.float64) for g in grads]
    norm = np.sqrt(sum((g ** 2).sum() for g in grads))
    assert norm > 10  # clipping at 1.0 changes the update
    expected = [g * min(1.0, clip / (norm + 1e-6)) if clip else g for g in grads]
    before = [w.asnumpy().copy() for w in weights]
    with (contextlib.nullcontext() if kernels else mindspore_ops_only()):
        step = TrainStep(net, nn.SGD(weights, learning_rate=1.0), loss_scale=loss_scale, clip_grad_norm=clip)
    assert (step.global_norm is not None) == kernels
    loss, overflow, _ = step(ms.Tensor(x), ms.Tensor(y))
    assert not bool(overflow.asnumpy()) and np.isfinite(loss.asnumpy())
    for w, old, update in zip(weights, before, expected):
        np.testing.assert_allclose(old - w.asnumpy(), update, rtol=2e-5, atol=1e-6 * np.abs(update).max(),
                                   err_msg=w.name)
