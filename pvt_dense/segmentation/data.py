"""The deterministic training batch source that `pvt_dense.engine.loop.IterationLoop` draws from.

Batch `index` of `epoch` on `rank` is a pure function of (seed, epoch, index, rank): the epoch's order is a
permutation seeded by (seed, epoch), global batch k is positions k*B*W .. (k+1)*B*W - 1 of it (B per rank, W ranks)
dealt to the ranks in order, and each image's augmentation draws from a Generator seeded by (seed, epoch, image
index). So a resumed run sees exactly the batches an uninterrupted one would, and 1 process x 8 sees the same
global batches as 2 processes x 4.

A sample whose image or annotation cannot be used (unreadable, corrupt, label size differs from the image) is
skipped with a warning naming the file and the reason, and the next image of the epoch's order takes its place;
`skipped` counts them. Label values outside the classes are ignored and counted in `out_of_range_pixels`.
"""
import threading
import warnings

import numpy as np

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
        self.steps_per_epoch = len(self.samples) // (self.batch_size * self.world_size)
        self._lock = threading.Lock()
        self._bad = {}
        self._out_of_range = {}

    def __len__(self):
        return len(self.samples)

    @property
    def skipped(self):
        return len(self._bad)

    @property
    def out_of_range_pixels(self):
        return sum(self._out_of_range.values())

    def order(self, epoch):
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

    def _load(self, epoch, position, order):
        """The transformed sample at `position` of the epoch's order, or the next usable one after it."""
        for step in range(len(order)):
            index = int(order[(position + step) % len(order)])
            sample = self.samples[index]
            if sample.image in self._bad:
                continue
            try:
                image, label, outside = read_sample(sample, self.num_classes, self.reduce_zero_label, self.max_pixels)
            except PVTDenseError as err:
                with self._lock:
                    if sample.image not in self._bad:
                        self._bad[sample.image] = str(err)
                        warnings.warn(f"skipping training sample {sample.name}: {err}", RuntimeWarning, stacklevel=2)
                continue
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
        raise PVTDenseError(f"none of the {len(order)} training samples could be read")

    def batch(self, epoch, index):
        """(images (B, 3, h, w) float32, labels (B, h, w) int32) for this rank."""
        order = self.order(epoch)
        start = (index * self.world_size + self.rank) * self.batch_size
        pairs = [self._load(epoch, position, order) for position in range(start, start + self.batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
