"""The deterministic training batch source that `pvt_dense.engine.loop.IterationLoop` draws from.

Batch `index` of `epoch` on `rank` is a pure function of (seed, epoch, index, rank), dealt by the sampler the three
tasks share (`pvt_dense.data.sampler.EpochSampler`): the epoch's order is a permutation seeded by (seed, epoch),
global batch k is positions k*B*W .. (k+1)*B*W - 1 of it (B per rank, W ranks; a tail that fills no global batch
is dropped) dealt to the ranks in order, and each image's augmentation draws from a Generator seeded by (seed, epoch, image
index). So a resumed run sees exactly the batches an uninterrupted one would, and 1 process x 8 sees the same
global batches as 2 processes x 4.

A sample whose image or annotation cannot be used (unreadable, corrupt, label size differs from the image) is
skipped with a warning naming the file and the reason, and the next image of the epoch's order takes its place;
`skipped` counts them. Label values outside the classes are ignored and counted in `out_of_range_pixels`.
"""
import threading
import warnings

import numpy as np

from ..data.sampler import EpochSampler, UnreadableSamples
from ..errors import PVTDenseError
from .ade20k import read_sample


class SegmentationBatchSource:
    def __init__(self, samples, transform, num_classes, reduce_zero_label, batch_size, seed=0, rank=0,
                 world_size=1, shuffle=True, max_pixels=None):
        if not samples:
            raise PVTDenseError("the training split has no samples")
        self.samples = list(samples)
        self.transform = transform
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle = shuffle
        self.max_pixels = max_pixels
        self.sampler = EpochSampler(len(self.samples), self.batch_size, self.world_size, self.rank, self.seed,
                                    shuffle, tail="drop")
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.unreadable = UnreadableSamples(
            key=lambda index: self.samples[index].image, reason=str,
            warning=lambda index, err: f"skipping training sample {self.samples[index].name}: {err}")
        self._lock = threading.Lock()
        self._out_of_range = {}

    def __len__(self):
        return len(self.samples)

    @property
    def skipped(self):
        return len(self.unreadable)

    @property
    def out_of_range_pixels(self):
        return sum(self._out_of_range.values())

    def _read(self, index):
        return read_sample(self.samples[index], self.num_classes, self.reduce_zero_label, self.max_pixels)

    def _load(self, epoch, sample_index, sequence):
        """The transformed sample `sample_index`, or the next usable one after it in `sequence`."""
        index, (image, label, outside) = self.unreadable.read_in_place(
            sequence, sample_index, self._read, f"none of the {len(sequence)} training samples could be read")
        sample = self.samples[index]
        if label is None:
            raise PVTDenseError(f"training sample {sample.name} has no annotation")
        if outside:
            with self._lock:
                if sample.label not in self._out_of_range:
                    self._out_of_range[sample.label] = outside
                    warnings.warn(f"{sample.label}: {outside} pixels have label values outside the "
                                  f"{self.num_classes} classes; they are ignored", RuntimeWarning, stacklevel=2)
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.transform(image, label, rng)

    def batch(self, epoch, index):
        """(images (B, 3, h, w) float32, labels (B, h, w) int32) for this rank."""
        mine, sequence = self.sampler.rank_batch(epoch, index)
        pairs = [self._load(epoch, int(sample), sequence) for sample in mine]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
