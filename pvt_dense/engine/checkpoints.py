"""Training checkpoints that a crash, a full disk or a kill -9 at any moment cannot turn into a lost run.

Every file reaches its final name only through `os.replace` of a fsynced temporary in the same directory, so a
name either holds a complete file or the previous one. The order of writes is what makes resuming safe:

1. the periodic checkpoint `{prefix}_e{epoch:04d}_s{step:07d}.ckpt` (weights, optimizer state and the run's
   metadata as one JSON string inside the same file, so the two can never disagree or be half-written apart);
2. `{prefix}_best.ckpt`, a hard link to (or copy of) it when its metric is a new best;
3. `latest.json`, the pointer a resuming run follows;
4. only then old periodic checkpoints are deleted, never the one `latest.json` names nor the best.

A crash between 1 and 3 leaves a complete checkpoint that `latest.json` does not name yet: resuming takes the
previous one, which is consistent with itself. Checkpoints newer than the one just saved belong to an abandoned
run (a resume from an older point); they are neither counted nor deleted, since they are overwritten or rotated
out once training passes them. One manager per directory: `latest.json` and the temporaries are shared names.
"""
import json
import math
import os
import re
import shutil
import warnings

from ..atomic import TEMP_PREFIX, publish, remove_temporaries, temp_path_for, write_atomic
from ..checkpoint.native_file import META_KEY, load_checkpoint_into, read_checkpoint_meta, save_entries
from ..errors import CheckpointError, ConfigError
from .run_lock import RunLock

POINTER_NAME = "latest.json"


def _write_json_atomic(path, value):
    write_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8"))


class CheckpointManager:
    """Periodic + best checkpoints of one training run in one directory, resumable after any crash."""

    def __init__(self, directory, keep_last=5, metric_name="top1", mode="max", prefix="ckpt", lock=True):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError(f"keep_last must be a positive integer, got {keep_last!r}")
        if mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(prefix)):
            raise ConfigError(f"checkpoint prefix must be a plain file-name stem, got {prefix!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep_last = keep_last
        self.metric_name = metric_name
        self.mode = mode
        self.prefix = prefix
        self._periodic_pattern = re.compile(rf"{re.escape(prefix)}_e(\d{{4,}})_s(\d{{7,}})\.ckpt")
        os.makedirs(self.directory, exist_ok=True)
        # The writing process owns the folder for the whole run (other ranks of a data-parallel run only read);
        # only then are temporaries surely stale, never another live run's file being written.
        self.run_lock = RunLock(self.directory) if lock else None
        if lock:
            self._remove_stale_temporaries()
        self._best_metric = self._read_best_metric()

    # -- names -------------------------------------------------------------------------------------------------

    @property
    def best_path(self):
        return os.path.join(self.directory, f"{self.prefix}_best.ckpt")

    @property
    def pointer_path(self):
        return os.path.join(self.directory, POINTER_NAME)

    @property
    def best_metric(self):
        return self._best_metric

    def periodic_name(self, epoch, global_step):
        return f"{self.prefix}_e{epoch:04d}_s{global_step:07d}.ckpt"

    def _order_key(self, name):
        match = self._periodic_pattern.fullmatch(name)
        return (int(match.group(1)), int(match.group(2))) if match else None

    def periodic_checkpoints(self):
        """Names of the periodic checkpoints in the directory, oldest first."""
        names = [name for name in os.listdir(self.directory) if self._order_key(name) is not None]
        return sorted(names, key=self._order_key)

    # -- startup -----------------------------------------------------------------------------------------------

    def _remove_stale_temporaries(self):
        # A temporary can only be left by a process that died mid-write; none of them is a complete file.
        for name in os.listdir(self.directory):
            if name.startswith(TEMP_PREFIX):
                try:
                    os.remove(os.path.join(self.directory, name))
                except OSError:
                    pass

    def _read_best_metric(self):
        if not os.path.exists(self.best_path):
            return None
        try:
            meta = read_checkpoint_meta(self.best_path)
        except CheckpointError as err:
            warnings.warn(f"ignoring the best checkpoint: {err}; the next checkpoint with a metric replaces it",
                          RuntimeWarning, stacklevel=3)
            return None
        metric = meta.get("metric")
        return float(metric) if isinstance(metric, (int, float)) else None

    # -- saving ------------------------------------------------------------------------------------------------

    def _is_better(self, metric):
        if metric is None or not math.isfinite(metric):
            return False
        if self._best_metric is None:
            return True
        return metric > self._best_metric if self.mode == "max" else metric < self._best_metric

    def save(self, params, meta, metric=None):
        """Write one periodic checkpoint (and the best, if it is one), move `latest.json` to it, rotate; -> path.

        `params`: Parameters and/or Cells (network and optimizer: moments, global_step...) or a name -> array
        dict. `meta`: JSON-serialisable, with int `epoch` and `global_step`; `metric` is added to it.
        """
        import mindspore as ms
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint meta must be a dict, got {type(meta).__name__}")
        for key in ("epoch", "global_step"):
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"checkpoint meta needs a non-negative int {key!r}, got {value!r}")
        if metric is not None:
            metric = float(metric)
        record = dict(meta, metric=metric, metric_name=self.metric_name)
        try:
            meta_text = json.dumps(record, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint meta is not JSON-serialisable: {err}") from None
        entries = save_entries(params)

        name = self.periodic_name(meta["epoch"], meta["global_step"])
        path = os.path.join(self.directory, name)
        temp = temp_path_for(path)
        try:
            ms.save_checkpoint(entries, temp, append_dict={META_KEY: meta_text}, crc_check=True)
        except BaseException:
            remove_temporaries(temp)
            raise
        publish(temp, path)

        if self._is_better(metric):
            self._publish_best(path)
            self._best_metric = metric
        _write_json_atomic(self.pointer_path, {"checkpoint": name, "epoch": meta["epoch"],
                                               "global_step": meta["global_step"], "metric": metric,
                                               "best_metric": self._best_metric})
        self._rotate(current=name)
        return path

    def _publish_best(self, source):
        temp = temp_path_for(self.best_path)
        try:
            try:
                os.link(source, temp)
            except OSError:  # filesystems without hard links
                shutil.copyfile(source, temp)
        except BaseException:
            remove_temporaries(temp)
            raise
        publish(temp, self.best_path)

    def _rotate(self, current):
        current_key = self._order_key(current)
        timeline = [name for name in self.periodic_checkpoints() if self._order_key(name) <= current_key]
        protected = {current, self._pointer_target()}
        for name in timeline[:-self.keep_last]:
            if name not in protected:
                try:
                    os.remove(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass

    # -- resuming ----------------------------------------------------------------------------------------------

    def _pointer_target(self):
        """The checkpoint name `latest.json` holds, or None if it is missing or damaged (with a warning)."""
        try:
            with open(self.pointer_path, encoding="utf-8") as handle:
                pointer = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            warnings.warn(f"ignoring damaged {self.pointer_path}: {err}", RuntimeWarning, stacklevel=3)
            return None
        name = pointer.get("checkpoint") if isinstance(pointer, dict) else None
        # Only a bare periodic name is followed, so a tampered pointer cannot lead outside the directory.
        if not isinstance(name, str) or self._order_key(name) is None:
            warnings.warn(f"ignoring {self.pointer_path}: it does not name a periodic checkpoint",
                          RuntimeWarning, stacklevel=3)
            return None
        return name

    def latest(self):
        """(path, meta) of the newest complete checkpoint to resume from, or None when there is none.

        `latest.json` decides; when it is missing or names a damaged file, the newest older checkpoint that
        reads in full is taken, and every file passed over is named in a RuntimeWarning.
        """
        target = self._pointer_target()
        newest_first = self.periodic_checkpoints()[::-1]
        if target is None:
            candidates = newest_first
        else:
            candidates = [target] + [name for name in newest_first if self._order_key(name) < self._order_key(target)]
        candidates = [os.path.join(self.directory, name) for name in candidates]
        if os.path.exists(self.best_path):
            candidates.append(self.best_path)  # the last resort: an older state beats starting over
        for path in candidates:
            try:
                meta = read_checkpoint_meta(path)
            except CheckpointError as err:
                warnings.warn(f"skipping checkpoint {path}: {err}", RuntimeWarning, stacklevel=2)
                continue
            return path, meta
        return None

    def kept_sentence(self):
        """What a run that stops on bad numbers leaves behind, true whether or not it saved anything yet."""
        if self.periodic_checkpoints() or os.path.exists(self.best_path):
            return f"The last good checkpoint is kept in {self.directory}"
        return f"No checkpoint was written to {self.directory} yet"

    def best(self):
        """(path, meta) of the best checkpoint, or None."""
        if not os.path.exists(self.best_path):
            return None
        return self.best_path, read_checkpoint_meta(self.best_path)

    def load_into(self, path, cells_or_params):
        """Load `path` into Cells/optimizers/Parameters (see `load_checkpoint_into`); returns its meta."""
        return load_checkpoint_into(path, cells_or_params)
