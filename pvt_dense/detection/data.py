"""Deterministic training batches for `pvt_dense.engine.loop.IterationLoop`, and ordered evaluation batches.

The batches of an epoch are a pure function of (seed, epoch, rank), dealt by the sampler the three tasks share
(`pvt_dense.data.sampler.EpochSampler`): one permutation seeded by (seed, epoch) is split into the landscape and
the other images (each batch holds one orientation, mmdetection's aspect-ratio grouping), each group is cut into
global batches of `batch_size * world_size` (its last batch filled up from the group's start, as mmdetection's
GroupSampler does), and when both orientations are present the batches are put in an order drawn from the same
generator. Rank r takes slice r of each global batch and pads it to its largest image rounded up to `pad_grid` (see
`transforms.batch_shape`; `shapes` records the distinct batch shapes, each one graph compilation). Flips draw from
a generator seeded by (seed, epoch, image index). A resumed run therefore sees exactly the batches an uninterrupted
run would.

An image file that cannot be decoded is recorded and replaced by the next image of its group in the epoch's order
(deterministic, since a corrupt file stays corrupt); `skipped` counts them.
"""
import threading

import numpy as np

from ..data.sampler import EpochSampler, UnreadableSamples
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError, ImageReadError, PVTDenseError
from .coco import CocoDetection
from .config import resolve
from .transforms import batch_shape, canvas_shape, is_landscape, pad_targets, prepare_image


class DetectionBatchSource:
    """Training batches of (images (B, 3, H, W) float32, gt_boxes (B, max_gt, 4) float32, gt_labels (B, max_gt)
    int32, gt_mask (B, max_gt) float32, pad_sizes (B, 2) float32) from a `CocoDetection`; pad_sizes holds each
    image's resized size rounded up to size_divisor (mmdetection's pad_shape), which the loss needs."""

    def __init__(self, dataset, batch_size, max_gt=100, img_scale=(1333, 800), size_divisor=32, flip_prob=0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=0, rank=0, world_size=1, shuffle=True, pad_grid=128):
        if len(dataset) == 0:
            raise PVTDenseError(f"the training set {dataset.ann_file} has no images")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.global_batch = self.batch_size * int(world_size)
        self.max_gt = int(max_gt)
        self.img_scale = tuple(img_scale)
        self.size_divisor = int(size_divisor)
        self.pad_grid = int(pad_grid)
        if self.pad_grid < 1 or self.pad_grid % self.size_divisor:
            raise PVTDenseError(f"pad_grid ({pad_grid}) must be a positive multiple of size_divisor ({size_divisor})")
        self.shapes = set()
        self.flip_prob = float(flip_prob)
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), int(rank), int(world_size), shuffle
        self.landscape = np.asarray([is_landscape(r.height, r.width) for r in dataset.records])
        # group 0: landscape, 1: the others
        self.sampler = EpochSampler(len(dataset), self.batch_size, world_size, rank, seed, shuffle, tail="fill",
                                    groups=(~self.landscape).astype(np.int8))
        self.unreadable = UnreadableSamples(
            errors=(ImageReadError,), warning=lambda index, err: f"skipping unreadable training image: {err}")
        self._lock = threading.Lock()
        self.steps_per_epoch = self.sampler.steps_per_epoch

    @property
    def bad_images(self):
        return self.unreadable.bad

    @property
    def skipped(self):
        return len(self.unreadable)

    def batch(self, epoch, index):
        mine, group = self.sampler.rank_batch(epoch, index)
        landscape = bool(self.landscape[group[0]])
        count = len(mine)
        boxes = np.zeros((count, self.max_gt, 4), np.float32)
        labels = np.zeros((count, self.max_gt), np.int32)
        mask = np.zeros((count, self.max_gt), np.float32)
        pad_sizes = np.zeros((count, 2), np.float32)
        prepared = []
        for slot, sample in enumerate(mine):
            used, (image, record) = self.unreadable.read_in_place(
                group, int(sample), self.dataset.read, lambda: "no readable image left among the training images "
                f"of this orientation ({len(self.unreadable)} unreadable)")
            flip = np.random.default_rng([self.seed, epoch, used]).random() < self.flip_prob
            chw, resized_boxes, meta = prepare_image(image, record.boxes, self.img_scale, flip, self.mean, self.std,
                                                     self.size_divisor)
            prepared.append(chw)
            pad_sizes[slot] = meta["pad_size"]
            boxes[slot], labels[slot], mask[slot] = pad_targets(resized_boxes, record.labels, self.max_gt)
        shape = batch_shape([chw.shape[1:] for chw in prepared], self.pad_grid,
                            canvas_shape(landscape, self.img_scale, self.size_divisor))
        images = np.zeros((count, 3) + shape, np.float32)
        for slot, chw in enumerate(prepared):
            images[slot, :, :chw.shape[1], :chw.shape[2]] = chw
        with self._lock:
            self.shapes.add(images.shape)
        return images, boxes, labels, mask, pad_sizes


def evaluation_batches(dataset, indices=None, img_scale=(1333, 800), size_divisor=32, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD):
    """Yield (images (1, 3, H, W), [meta], [record]) per readable image, in dataset order, each image padded only
    to a multiple of size_divisor (mmdetection's test protocol); unreadable images are yielded as (None, [error
    message], [record]) so the caller can count them."""
    indices = range(len(dataset)) if indices is None else indices
    for index in indices:
        try:
            image, record = dataset.read(index)
        except ImageReadError as err:
            yield None, [str(err)], [dataset.records[index]]
            continue
        chw, _, meta = prepare_image(image, record.boxes, img_scale, False, mean, std, size_divisor)
        yield chw[None], [meta], [record]


def open_dataset(cfg, split, check_files=True):
    ann, images = resolve(cfg, f"{split}_ann"), resolve(cfg, f"{split}_images")
    dataset = CocoDetection(ann, images, max_gt=cfg.max_gt, check_files=check_files)
    if dataset.num_classes != cfg.num_classes:
        raise ConfigError(f"num_classes is {cfg.num_classes} but {ann} has {dataset.num_classes} categories; set "
                          f"num_classes: {dataset.num_classes}")
    return dataset
