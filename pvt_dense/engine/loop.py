"""The iteration-based training loop shared by the three tasks (classification counts its epochs in iterations).

Everything the loop does is a function of one counter, the global iteration: the epoch is `iteration //
steps_per_epoch`, the batch is `source.batch(epoch, iteration % steps_per_epoch)` (a pure function of the seed,
epoch, index and rank, see the sources in `pvt_dense.detection.data` / `pvt_dense.segmentation.data`) and the lr is
`lr_schedule[iteration]` inside the optimizer. So a checkpoint that holds the weights, the optimizer state (moments
and step), the loss-scale state and the iteration is all a resumed run needs to take exactly the same steps as an
uninterrupted one.

Batches are prepared by a small thread pool a few iterations ahead: image decoding, resizing and target building
(OpenCV and numpy) release the GIL, so they overlap the training step.
"""
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import PVTDenseError
from .checkpoints import CheckpointManager
from .metrics_log import MetricsLog


class NonFiniteLossError(PVTDenseError):
    """The training loss (or the weights) became NaN or infinite."""


def check_finite_weights(params, where, kept_sentence):
    broken = [p.name for p in params if getattr(p, "requires_grad", False) and not np.isfinite(p.asnumpy()).all()]
    if broken:
        raise NonFiniteLossError(
            f"weights became non-finite ({', '.join(broken[:3])}{'...' if len(broken) > 3 else ''}) at {where}; "
            f"stopping without saving. {kept_sentence} (lower lr or loss_scale, or check the data)")


class IterationLoop:
    """Run `total_iters` training iterations with evaluation, logging, atomic checkpoints and exact resume.

    Args:
        train_step: a `TrainStep` (or any callable) taking the batch's tensors and returning (loss, overflow, scale).
        source: has `steps_per_epoch` (batches per epoch on this rank) and `batch(epoch, index)` -> tuple of numpy
            arrays, deterministic in its arguments; optional `skipped` (unreadable samples skipped so far).
        lr_schedule: the per-iteration lr the optimizer uses (only read for logging here).
        total_iters: iterations of the whole run.
        run_dir: where checkpoints, metrics.jsonl/.csv and curves.png go.
        state_params: the Parameters/Cells a checkpoint holds (network, optimizer, loss-scale state, BN statistics).
        meta: JSON-serialisable facts stored in every checkpoint (the config, class names...).
        evaluate: `evaluate(iteration) -> dict` of float metrics, run on rank 0 every `eval_interval` iterations and
            at the end; the dict must hold `metric_name`, which picks the best checkpoint.
        save_interval: also checkpoint every N iterations (0: only at evaluations and the end); several Ns (a
            tuple) checkpoint at the multiples of each (e.g. every epoch and every 1000 iterations).
        resume: 'auto' (the newest checkpoint in run_dir if any), '' (start fresh) or a checkpoint path.
        log_interval: a metrics record (mean train loss since the last one, lr, seconds since the last one...)
            every N iterations, at evaluations and at the end.
        index_key: what numbers the records in metrics.jsonl/.csv: 'iteration', or 'epoch' when records come at
            epoch ends only.
        line_interval, format_line: print `format_line(record)` for every record at a multiple of line_interval
            (0: at evaluations only); `format_record` by default.
        on_epoch_start: called with the epoch's number before its first iteration (or the first after a resume).
    """

    def __init__(self, train_step, source, lr_schedule, total_iters, run_dir, state_params, *, meta=None,
                 evaluate=None, eval_interval=0, save_interval=0, metric_name="metric", metric_mode="max",
                 keep_last=5, resume="auto", rank=0, world_size=1, progress_bar=True, log_interval=50,
                 prefix="model", num_workers=2, prefetch=4, index_key="iteration", line_interval=0,
                 format_line=None, on_epoch_start=None):
        if total_iters < 1:
            raise PVTDenseError(f"total_iters must be at least 1, got {total_iters}")
        if source.steps_per_epoch < 1:
            raise PVTDenseError("the training set gives no full batch per process: add images or lower batch_size")
        self.train_step = train_step
        self.source = source
        self.lr_schedule = lr_schedule
        self.total_iters = int(total_iters)
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.state_params = state_params
        self.meta = dict(meta or {})
        self.evaluate = evaluate
        self.eval_interval = int(eval_interval)
        intervals = save_interval if isinstance(save_interval, (tuple, list)) else (save_interval,)
        self.save_intervals = tuple(int(n) for n in intervals if n)
        self.metric_name = metric_name
        self.resume = resume
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.progress_bar = progress_bar
        self.log_interval = int(log_interval)
        self.index_key = index_key
        self.line_interval = int(line_interval)
        self.format_line = format_line or (lambda record: format_record(record, self.total_iters))
        self.on_epoch_start = on_epoch_start
        self.num_workers = max(1, int(num_workers))
        self.prefetch = max(1, int(prefetch))
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=keep_last, metric_name=metric_name,
                                             mode=metric_mode, prefix=prefix, lock=self.is_main)
        self.state = {"iteration": 0, "epoch": 0, "overflow_steps": 0, "best_metric": None, "skipped_samples": 0}
        self.metrics = None

    # -- checkpoints ------------------------------------------------------------------------------------------
    def resume_point(self):
        if self.resume == "":
            return None
        if self.resume == "auto":
            return self.checkpoints.latest()
        if not os.path.isfile(self.resume):
            raise PVTDenseError(f"resume checkpoint not found: {self.resume}")
        return self.resume, None

    def restore(self, path):
        meta = self.checkpoints.load_into(path, self.state_params)
        loop_state = meta.get("loop_state")
        if loop_state is None:
            # Written before the classification trainer moved onto this loop: its state sits at the top level,
            # where `global_step` (which every checkpoint records) counts the iterations done: epochs x steps per
            # epoch + steps into the epoch.
            loop_state = {"iteration": meta["global_step"], "best_metric": self.checkpoints.best_metric,
                          **{key: meta[key] for key in ("overflow_steps",) if key in meta}}
        for key in self.state:
            if key in loop_state:
                self.state[key] = loop_state[key]
        self.state["epoch"] = self.state["iteration"] // self.source.steps_per_epoch
        return meta

    def save(self, metric=None):
        if not self.is_main:
            return None
        check_finite_weights(self._parameters(), f"iteration {self.state['iteration']}",
                             self.checkpoints.kept_sentence())
        meta = dict(self.meta, loop_state=dict(self.state), epoch=self.state["epoch"],
                    global_step=self.state["iteration"])
        return self.checkpoints.save(self.state_params, meta, metric=metric)

    def _parameters(self):
        params = []
        for item in self.state_params:
            params.extend(item.get_parameters() if hasattr(item, "get_parameters") else [item])
        return params

    # -- data -------------------------------------------------------------------------------------------------
    def _position(self, iteration):
        return divmod(iteration, self.source.steps_per_epoch)

    def _batches(self, pool, start):
        """Batches for iterations start.. in order, `prefetch` of them in flight at any time."""
        pending = {}
        for iteration in range(start, min(start + self.prefetch, self.total_iters)):
            pending[iteration] = pool.submit(self.source.batch, *self._position(iteration))
        for iteration in range(start, self.total_iters):
            ahead = iteration + self.prefetch
            if ahead < self.total_iters:
                pending[ahead] = pool.submit(self.source.batch, *self._position(ahead))
            yield pending.pop(iteration).result()

    # -- the loop ---------------------------------------------------------------------------------------------
    def _evaluate_and_record(self, record):
        if not (self.is_main and self.evaluate is not None):
            return None
        results = self.evaluate(self.state["iteration"])
        if self.metric_name not in results:
            raise PVTDenseError(f"evaluation returned {sorted(results)}, without the metric {self.metric_name!r}")
        record.update({f"val_{key}": value for key, value in results.items()})
        metric = float(results[self.metric_name])
        best = self.state["best_metric"]
        if math.isfinite(metric):
            better = best is None or (metric > best if self.checkpoints.mode == "max" else metric < best)
            self.state["best_metric"] = metric if better else best
        return metric

    def run(self):
        import mindspore as ms
        from tqdm import tqdm

        point = self.resume_point()
        if point is not None:
            self.restore(point[0])
            if self.is_main:
                print(f"resumed from {point[0]} at iteration {self.state['iteration']} of {self.total_iters}")
        if self.is_main:
            self.metrics = MetricsLog(self.run_dir, index_key=self.index_key,
                                      resume_from_epoch=self.state[self.index_key] if point is not None else -1)
        start = self.state["iteration"]
        bar = tqdm(total=self.total_iters, initial=start, unit="it", leave=False,
                   disable=not (self.is_main and self.progress_bar))
        losses, started, last_save = [], time.perf_counter(), start
        last_record_time = started
        with ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="batch") as pool:
            for arrays in self._batches(pool, start):
                iteration = self.state["iteration"]
                if self.on_epoch_start is not None and (iteration == start or
                                                        iteration % self.source.steps_per_epoch == 0):
                    self.on_epoch_start(iteration // self.source.steps_per_epoch)
                loss, overflow, _ = self.train_step(*(ms.Tensor(a) for a in arrays))
                loss_value = float(loss.asnumpy())
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss is {loss_value} at iteration {iteration + 1}; stopping. "
                        f"{self.checkpoints.kept_sentence()} (lower lr or loss_scale, or check the data)")
                if bool(overflow.asnumpy()):
                    self.state["overflow_steps"] += 1
                else:
                    losses.append(loss_value)
                iteration += 1
                self.state["iteration"] = iteration
                self.state["epoch"] = iteration // self.source.steps_per_epoch
                self.state["skipped_samples"] = int(getattr(self.source, "skipped", 0))
                lr = float(self.lr_schedule[min(iteration - 1, len(self.lr_schedule) - 1)])
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                it_s=f"{(iteration - start) / max(elapsed, 1e-9):.2f}")
                bar.update(1)

                finished = iteration == self.total_iters
                log_now = iteration % self.log_interval == 0 or finished
                eval_now = self.evaluate is not None and (
                    finished or (self.eval_interval and iteration % self.eval_interval == 0))
                save_now = eval_now or finished or any(iteration % n == 0 for n in self.save_intervals)
                if not (log_now or eval_now or save_now):
                    continue
                record = None
                if log_now or eval_now:
                    record = {"iteration": iteration, "epoch": self.state["epoch"],
                              "train_loss": float(np.mean(losses)) if losses else float("nan"), "lr": lr,
                              "seconds": round(time.perf_counter() - last_record_time, 3),  # training only
                              "overflow_steps": self.state["overflow_steps"],
                              "skipped_samples": self.state["skipped_samples"]}
                    losses = []
                if save_now and iteration != last_save:
                    # Saved before evaluating too, so a crash during a long evaluation loses no training.
                    self.save()
                    last_save = iteration
                metric = self._evaluate_and_record(record) if eval_now else None
                if self.is_main and record is not None:
                    self.metrics.append(record)
                    self.metrics.plot()
                    if eval_now or (self.line_interval and iteration % self.line_interval == 0):
                        bar.write(self.format_line(record))
                if metric is not None:
                    self.save(metric)  # the same file again, now carrying the metric that picks the best
                if record is not None:
                    last_record_time = time.perf_counter()
        bar.close()
        return dict(self.state)


def format_record(record, total_iters):
    parts = [f"iteration {record['iteration']}/{total_iters}", f"train loss {record['train_loss']:.4f}"]
    parts += [f"{key[4:]} {value:.4f}" for key, value in record.items()
              if key.startswith("val_") and isinstance(value, float)]
    parts.append(f"lr {record['lr']:.3e}")
    if record.get("overflow_steps"):
        parts.append(f"{record['overflow_steps']} overflow steps skipped")
    if record.get("skipped_samples"):
        parts.append(f"{record['skipped_samples']} unreadable samples skipped")
    return " | ".join(parts)
