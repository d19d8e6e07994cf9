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
import glob
import json
import math
import os
import re
import shutil
import warnings

import numpy as np

from ..atomic import TEMP_PREFIX, fsync_directory, fsync_file, temp_path_for
from ..errors import CheckpointError, ConfigError
from .run_lock import RunLock

# Nested dicts are refused by save_checkpoint's append_dict, strings are stored verbatim, so the metadata travels
# as one JSON string under a name no MindSpore parameter has.
META_KEY = "pvt_dense_meta_json"
POINTER_NAME = "latest.json"
# Every temporary starts with this, including the `.tmp` MindSpore derives from our temporary's name while it
# writes, so one pattern finds what a killed process left behind.
# save_checkpoint(crc_check=True) ends the file with b"crc_num" and a 10-byte CRC32; a file cut anywhere lacks it.
_CRC_MARK = b"crc_num"
_CRC_TRAILER_SIZE = len(_CRC_MARK) + 10


def _remove_temporaries(temp_path):
    """Remove a temporary and whatever MindSpore derived from its name (it writes `<stem>.tmp`, then renames)."""
    stem = os.path.splitext(temp_path)[0]
    for leftover in glob.glob(glob.escape(stem) + ".*"):
        try:
            os.remove(leftover)
        except OSError:
            pass


def _publish(temp_path, final_path):
    """The single step that makes a file visible under its final name."""
    try:
        fsync_file(temp_path)
        os.replace(temp_path, final_path)
    except BaseException:
        _remove_temporaries(temp_path)
        raise
    fsync_directory(os.path.dirname(final_path))


def _write_json_atomic(path, value):
    temp = temp_path_for(path)
    try:
        with open(temp, "x", encoding="utf-8") as handle:
            json.dump(value, handle, indent=1, sort_keys=True)
            handle.write("\n")
    except BaseException:
        _remove_temporaries(temp)
        raise
    _publish(temp, path)


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _has_crc_trailer(path):
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < _CRC_TRAILER_SIZE:
            return False
        handle.seek(-_CRC_TRAILER_SIZE, os.SEEK_END)
        return handle.read(len(_CRC_MARK)) == _CRC_MARK


def read_checkpoint_meta(path):
    """The metadata of a complete checkpoint this module wrote; CheckpointError saying why a file does not qualify.

    Completeness is checked in full: the CRC trailer must be there (a file cut at a record boundary still parses)
    and MindSpore must parse the whole file with its CRC, which also catches flipped bytes inside tensor data.
    """
    import mindspore as ms
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not _has_crc_trailer(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (truncated: no CRC trailer)")
    try:
        stored = ms.load_checkpoint(path, crc_check=True, choice_func=lambda name: name == META_KEY)
    except Exception as err:  # ValueError/RuntimeError with C++ traces, whatever the damage was
        raise CheckpointError(f"checkpoint {path} cannot be read: {_first_line(err)}") from None
    if not isinstance(stored.get(META_KEY), str):
        raise CheckpointError(f"checkpoint {path} has no training metadata (not written by CheckpointManager)")
    try:
        meta = json.loads(stored[META_KEY])
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {err}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has metadata that is not a JSON object")
    return meta


def _save_entries(params):
    """Parameters, Cells, or a name -> array dict, as save_checkpoint's list of {"name", "data"}, one per name."""
    import mindspore as ms
    from mindspore import nn

    entries = {}

    def add(name, data, owner):
        if name in entries:
            # An optimizer lists the network's own Parameters again: the same object is not a conflict.
            if entries[name][1] is owner:
                return
            raise CheckpointError(f"two different parameters are both named {name!r}; a checkpoint keys by name")
        entries[name] = (data, owner)

    if isinstance(params, dict):
        for name, value in params.items():
            if isinstance(value, (ms.Parameter, ms.Tensor)):
                add(str(name), value, value)
            else:
                add(str(name), ms.Tensor(np.asarray(value)), value)
    else:
        items = [params] if isinstance(params, (nn.Cell, ms.Parameter)) else list(params)
        for item in items:
            if isinstance(item, nn.Cell):
                for _, param in item.parameters_and_names():
                    add(param.name, param, param)
            elif isinstance(item, ms.Parameter):
                add(item.name, item, item)
            else:
                raise CheckpointError(f"cannot save {type(item).__name__}: pass Parameters, Cells or a dict of arrays")
    if not entries:
        raise CheckpointError("nothing to save: the parameter list is empty")
    if META_KEY in entries:
        raise CheckpointError(f"a parameter is named {META_KEY!r}, the name reserved for the checkpoint's metadata")
    return [{"name": name, "data": data} for name, (data, _) in entries.items()]


def _holder_cell(params):
    """Loose Parameters as a Cell, the only thing load_param_into_net accepts; ParameterTuple keeps their names."""
    from mindspore import ParameterTuple, nn

    class ParameterHolder(nn.Cell):
        def __init__(self):
            super().__init__()
            self.held = ParameterTuple(params)

    return ParameterHolder()


def _load_targets(cells_or_params):
    import mindspore as ms
    from mindspore import nn

    if isinstance(cells_or_params, (nn.Cell, ms.Parameter)):
        items = [cells_or_params]
    elif isinstance(cells_or_params, dict):
        items = list(cells_or_params.values())
    else:
        items = list(cells_or_params)
    cells = [item for item in items if isinstance(item, nn.Cell)]
    loose = [item for item in items if isinstance(item, ms.Parameter)]
    others = [type(item).__name__ for item in items if not isinstance(item, (nn.Cell, ms.Parameter))]
    if others:
        raise CheckpointError(f"cannot load a checkpoint into {', '.join(sorted(set(others)))}: pass Cells, "
                              "optimizers or Parameters")
    if loose:
        cells.append(_holder_cell(loose))
    if not cells:
        raise CheckpointError("nothing to load the checkpoint into")
    return cells


def _summarise(names, limit=8):
    names = sorted(set(names))
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_checkpoint_into(path, cells_or_params):
    """Load a checkpoint into Cells/optimizers/Parameters, all or nothing; return its metadata ({} if none).

    Every target parameter must be in the file with the same shape and dtype: a resumed run that silently keeps
    freshly initialised moments or a step counter at 0 trains differently without any error. Names in the file
    that no target asks for (an optimizer's state when evaluating) are fine.
    """
    import mindspore as ms
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = ms.load_checkpoint(path, crc_check=_has_crc_trailer(path))
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {_first_line(err)}") from None
    meta_text = state.pop(META_KEY, None)
    try:
        meta = json.loads(meta_text) if isinstance(meta_text, str) else {}
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {err}") from None
    state = {name: value for name, value in state.items() if isinstance(value, ms.Parameter)}

    cells = _load_targets(cells_or_params)
    missing, mismatched = [], []
    for cell in cells:
        for _, param in cell.parameters_and_names():
            stored = state.get(param.name)
            if stored is None:
                missing.append(param.name)
            elif tuple(stored.shape) != tuple(param.shape) or stored.dtype != param.dtype:
                mismatched.append(f"{param.name} (file {tuple(stored.shape)} {stored.dtype}, "
                                  f"model {tuple(param.shape)} {param.dtype})")
    # Checked before anything is assigned, so a refused checkpoint leaves the model exactly as it was.
    problems = []
    if missing:
        problems.append(f"{len(set(missing))} parameters are not in it: {_summarise(missing)}")
    if mismatched:
        problems.append(f"{len(set(mismatched))} do not fit: {_summarise(mismatched, limit=4)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit: " + "; ".join(problems))

    for cell in cells:
        try:
            # strict_load=True: otherwise MindSpore retries unmatched names by suffix and could fill `weight`
            # from `moment1.weight`, and converts dtypes silently.
            not_loaded, _ = ms.load_param_into_net(cell, state, strict_load=True)
        except (RuntimeError, TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} could not be loaded: {_first_line(err)}") from None
        if not_loaded:
            raise CheckpointError(f"checkpoint {path}: {len(not_loaded)} parameters were not loaded: "
                                  f"{_summarise(not_loaded)}")
    return meta


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
        entries = _save_entries(params)

        name = self.periodic_name(meta["epoch"], meta["global_step"])
        path = os.path.join(self.directory, name)
        temp = temp_path_for(path)
        try:
            ms.save_checkpoint(entries, temp, append_dict={META_KEY: meta_text}, crc_check=True)
        except BaseException:
            _remove_temporaries(temp)
            raise
        _publish(temp, path)

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
            _remove_temporaries(temp)
            raise
        _publish(temp, self.best_path)

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
