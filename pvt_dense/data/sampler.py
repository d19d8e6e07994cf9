"""Which training samples each process reads, batch by batch, in every epoch; and skipping unreadable ones.

One rule for the three tasks: epoch e's order is a permutation drawn from a generator seeded by (seed, epoch), cut
into global batches of `batch_size * world_size`, and rank r takes slice r of every global batch. So the global
batches do not depend on how many processes share them (1 x 16 and 2 x 8 see the same), and a resumed run sees
exactly the batches an uninterrupted one would. What differs between the tasks is stated as data:
- `tail`: the samples that do not fill a last global batch are dropped ("drop"), kept as a short last batch
  ("keep", one process only: the loader's batch op decides), or filled up by repeating the epoch's (or group's)
  order from its start ("fill", mmdetection's GroupSampler);
- `groups`: one group id per sample; each batch then holds one group (mmdetection's aspect-ratio grouping), each
  group's order is the epoch's order restricted to it, groups are cut in ascending id order, and when more than one
  group is present the batches are put in an order drawn from the same generator so the groups interleave.

`UnreadableSamples` is the other shared piece: a sample that cannot be read is recorded (with the reason) and the
next readable one in the same order takes its place; a corrupt file stays corrupt, so this stays deterministic.
"""
import threading
import warnings

import numpy as np

from ..errors import PVTDenseError

TAILS = ("drop", "keep", "fill")


class EpochSampler:
    def __init__(self, num_samples, batch_size, world_size=1, rank=0, seed=0, shuffle=True, tail="drop",
                 groups=None):
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
        if tail == "keep" and world_size > 1:
            raise ValueError("a short last batch cannot be dealt to several processes; use tail='drop' or 'fill'")
        self.num_samples = int(num_samples)
        self.batch_size, self.world_size, self.rank = int(batch_size), int(world_size), int(rank)
        self.global_batch = self.batch_size * self.world_size
        self.seed, self.shuffle, self.tail = int(seed), shuffle, tail
        self.groups = None if groups is None else np.asarray(groups)
        self.steps_per_epoch = sum(self._batch_count(size) for size in self._group_sizes())
        self._plans = {}

    def _group_sizes(self):
        if self.groups is None:
            return [self.num_samples]
        return [int(count) for count in np.unique(self.groups, return_counts=True)[1]]

    def _batch_count(self, size):
        if self.tail == "drop":
            return size // self.global_batch
        return -(-size // self.global_batch)

    def epoch_order(self, epoch):
        """(the epoch's sample order, the generator it came from, positioned after the permutation)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        return order, rng

    def epoch_plan(self, epoch):
        """(global batches as index arrays, the order each batch's group was cut from, one entry per batch)."""
        plan = self._plans.get(epoch)
        if plan is None:
            plan = self._plan(epoch)
            self._plans = {epoch: plan}  # one epoch at a time; replaced whole, so readers on other threads are safe
        return plan

    def _plan(self, epoch):
        order, rng = self.epoch_order(epoch)
        if self.groups is None:
            sequences = [order]
        else:
            sequences = [order[self.groups[order] == group] for group in np.unique(self.groups)]
        batches, sources = [], []
        for sequence in sequences:
            count = self._batch_count(sequence.size)
            if self.tail == "fill":
                cut = np.resize(sequence, count * self.global_batch)  # repeats from the sequence's start
            elif self.tail == "drop":
                cut = sequence[:count * self.global_batch]
            else:
                cut = sequence
            batches += [cut[k * self.global_batch:(k + 1) * self.global_batch] for k in range(count)]
            sources += [sequence] * count
        if self.shuffle and len(sequences) > 1:
            shuffled = rng.permutation(len(batches))
            batches, sources = [batches[i] for i in shuffled], [sources[i] for i in shuffled]
        return batches, sources

    def deal(self, global_batch):
        """This rank's slice of one global batch."""
        return global_batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def rank_batch(self, epoch, index):
        """(this rank's samples of global batch `index`, the order they were cut from: where replacements come from)."""
        batches, sources = self.epoch_plan(epoch)
        return self.deal(batches[index]), sources[index]

    def rank_order(self, epoch):
        """This rank's samples for the whole epoch, batch after batch (for a loader that batches them itself)."""
        batches, _ = self.epoch_plan(epoch)
        if not batches:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([self.deal(batch) for batch in batches])


class UnreadableSamples:
    """The samples found unreadable so far (`bad`: key -> reason) and the rule that replaces them: `read_first(
    sequence, start, read)` returns (index, read(index)) for the first sample of `sequence` from `start` on
    (wrapping) that reads without one of `errors`. `warning(index, err)` gives the message issued once per new
    unreadable sample (None: silent, the caller reports the count)."""

    def __init__(self, errors=(PVTDenseError,), key=None, warning=None, reason=None):
        self.errors = tuple(errors)
        self.key = key or (lambda index: index)
        self.warning = warning
        self.reason = reason or (lambda err: getattr(err, "reason", str(err)))
        self.bad = {}
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.bad)

    def read_first(self, sequence, start, read, exhausted="no readable sample left"):
        for step in range(len(sequence)):
            index = int(sequence[(start + step) % len(sequence)])
            key = self.key(index)
            if key in self.bad:
                continue
            try:
                return index, read(index)
            except self.errors as err:
                with self._lock:
                    if key not in self.bad:
                        self.bad[key] = self.reason(err)
                        if self.warning:
                            warnings.warn(self.warning(index, err), RuntimeWarning, stacklevel=3)
        raise PVTDenseError(exhausted() if callable(exhausted) else exhausted)

    def read_in_place(self, sequence, index, read, exhausted="no readable sample left"):
        """`read_first` from where `index` first stands in `sequence`."""
        return self.read_first(sequence, int(np.flatnonzero(sequence == index)[0]), read, exhausted)
