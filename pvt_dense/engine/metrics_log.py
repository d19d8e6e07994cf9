"""Training records as `metrics.jsonl` (for programs) and `metrics.csv` (for people), plus their curves.

Records are indexed by epoch (classification) or by iteration (the dense-prediction loop): `index_key`.

Both files are rewritten whole through a fsynced temporary and `os.replace` on every record: they hold one line
per epoch, so this costs nothing, and a crash can never leave a half-written line that a resumed run would trip
over. A resumed run restarts from a checkpoint that may be older than the last record (epochs logged after the
last checkpoint and then lost to the crash); `resume_from_epoch` drops exactly those records so the retrained
epochs do not appear twice.
"""
import csv
import io
import json
import math
import numbers
import os
import warnings

from ..atomic import write_atomic
from ..errors import PVTDenseError

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
_NAMED_METRICS = ("top1", "top5", "mAP", "mIoU")


def _plain_value(key, value):
    """A JSON/CSV scalar: numpy and MindSpore scalars become Python numbers, anything nested is refused."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _plain_value(key, item())
        except (TypeError, ValueError):
            pass
    raise PVTDenseError(f"metrics record value {key!r} must be a number, string or None, got {type(value).__name__}")


class MetricsLog:
    """One record per epoch (or per `index_key` value) in `directory`; `resume_from_epoch=E` forgets records
    whose index is after E."""

    def __init__(self, directory, resume_from_epoch=None, index_key="epoch"):
        self.directory = os.path.abspath(os.fspath(directory))
        self.index_key = index_key
        os.makedirs(self.directory, exist_ok=True)
        self.records = self._read_existing()
        if resume_from_epoch is not None:
            kept = [record for record in self.records if record[index_key] <= resume_from_epoch]
            if len(kept) != len(self.records):
                self.records = kept
                self._write_files()

    @property
    def jsonl_path(self):
        return os.path.join(self.directory, JSONL_NAME)

    @property
    def csv_path(self):
        return os.path.join(self.directory, CSV_NAME)

    def _read_existing(self):
        try:
            with open(self.jsonl_path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get(self.index_key), int):
                # Only someone else's edit can produce this (we never write partial lines); keep the rest.
                warnings.warn(f"{self.jsonl_path}:{number}: skipping an unreadable record", RuntimeWarning,
                              stacklevel=3)
                continue
            records.append(record)
        return records

    def append(self, record):
        """Add the record of one epoch (needs an int `epoch` -- or `index_key` -- after the last one logged);
        returns it as stored."""
        if not isinstance(record, dict):
            raise PVTDenseError(f"a metrics record is a dict, got {type(record).__name__}")
        clean = {str(key): _plain_value(key, value) for key, value in record.items()}
        key = self.index_key
        epoch = clean.get(key)
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise PVTDenseError(f"a metrics record needs an int {key!r}, got {record.get(key)!r}")
        if self.records and epoch <= self.records[-1][key]:
            # Two records for one epoch mean a restarted run wrote over an old log: say so instead of mixing them.
            raise PVTDenseError(f"{key} {epoch} is not after the last {key} logged in {self.jsonl_path} "
                                f"({self.records[-1][key]}); pass resume_from_epoch when resuming, or use a "
                                "new directory")
        self.records.append(clean)
        self._write_files()
        return clean

    def columns(self):
        """Union of the records' keys, the index first, then in order of first appearance."""
        names = {self.index_key: None}
        for record in self.records:
            names.update(dict.fromkeys(record))
        return list(names)

    def _write_files(self):
        lines = "".join(json.dumps(record) + "\n" for record in self.records)
        write_atomic(self.jsonl_path, lines.encode("utf-8"))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=self.columns(), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: ("" if value is None else value) for key, value in record.items()}
                         for record in self.records)
        write_atomic(self.csv_path, table.getvalue().encode("utf-8"))

    # -- curves ------------------------------------------------------------------------------------------------

    def _series(self, key):
        points = [(record[self.index_key], record.get(key)) for record in self.records]
        return [(epoch, value) for epoch, value in points
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]

    def plot(self, path="curves.png"):
        """Loss curves and metric curves (val_*, top1, top5, mAP, mIoU) side by side as a PNG; returns its path.

        Draws with Agg through the object API, never pyplot: no display is needed and the backend of a process
        that already uses matplotlib (a notebook) is left alone.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if not self.records:
            raise PVTDenseError(f"no metrics recorded in {self.directory} yet, nothing to plot")
        path = os.path.join(self.directory, os.fspath(path))
        keys = [key for key in self.columns() if key != self.index_key and self._series(key)]
        loss_keys = [key for key in keys if "loss" in key.lower()]
        metric_keys = [key for key in keys if key not in loss_keys
                       and (key.startswith("val_") or key in _NAMED_METRICS)]

        figure = Figure(figsize=(11, 4.2), dpi=100)
        FigureCanvasAgg(figure)
        for axis_index, (keys_here, title) in enumerate(((loss_keys, "loss"), (metric_keys, "metrics"))):
            axis = figure.add_subplot(1, 2, axis_index + 1)
            for key in keys_here:
                epochs, values = zip(*self._series(key))
                axis.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3, label=key)
            axis.set_title(title)
            axis.set_xlabel(self.index_key)
            axis.grid(alpha=0.3)
            if keys_here:
                axis.legend(fontsize=8)
            else:
                axis.text(0.5, 0.5, f"no {title} recorded", ha="center", va="center", transform=axis.transAxes)
        figure.tight_layout()
        image = io.BytesIO()
        figure.savefig(image, format="png")
        write_atomic(path, image.getvalue())
        return path
