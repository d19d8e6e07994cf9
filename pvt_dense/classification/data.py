"""ImageNet-layout data for classification: `root/{train,val}/<class>/<image>`, with mindcv's transforms.

Two things differ from mindcv's `create_dataset`, each for a stated reason:
- Images are decoded in Python with OpenCV (`pvt_dense.data.images.read_image`), so a corrupt or unreadable file is
  skipped and counted instead of stopping a multi-day run; the next readable image of the epoch takes its place.
- The sample order of every epoch is a permutation seeded by (seed, epoch) dealt to the ranks by the sampler the
  three tasks share (`pvt_dense.data.sampler`), and every random draw of the training augmentation is seeded by the
  position it is made for: each image's (random resized crop, flip, RandAugment, random erasing) by (seed, epoch,
  rank, its position in the epoch), each batch's mixup/cutmix by (seed, epoch, rank, batch index). So any batch of
  any epoch can be replayed exactly after a crash, augmentation included (MindSpore's pipeline ops draw from
  generators that restart with the pipeline, and mindcv's Python ops from the process-wide `random`/`numpy.random`,
  neither of which a checkpoint can restore). Training batches are therefore built in Python (`TrainingBatches`,
  on the shared loop's batch threads); evaluation uses mindcv's `create_loader`.
mindcv's own transform lists (RandAugment, random erasing, bicubic resize, crop_pct) and mixup/cutmix (`Mixup`, as
its `create_loader` configures it) are used as they are; only their first op, which decodes bytes, becomes its
decoded-array equivalent, and the training ones run one image at a time under a lock (their random state is
process-wide).
"""
import os
import random
import threading

import numpy as np

from ..data.images import is_image_name, read_image
from ..data.sampler import EpochSampler, UnreadableSamples
from ..errors import ImageReadError, PVTDenseError


class DatasetLayoutError(PVTDenseError):
    """The dataset folder is not laid out as ImageNet (root/split/class/image)."""


def scan_image_folder(root, split):
    """(paths, labels, class_names) of `root/split/<class>/*`, classes in sorted order as ImageNet tools do."""
    folder = os.path.join(os.fspath(root), split)
    if not os.path.isdir(folder):
        raise DatasetLayoutError(f"missing split folder {folder!r}: an ImageNet-layout dataset has "
                                 f"{os.path.join(root, 'train')} and {os.path.join(root, 'val')}, each with one "
                                 "sub-folder per class")
    class_names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
                         and not d.startswith("."))
    if not class_names:
        raise DatasetLayoutError(f"{folder!r} has no class sub-folders")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for dirpath, dirnames, filenames in os.walk(os.path.join(folder, name)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if is_image_name(filename) and not filename.startswith("."):
                    paths.append(os.path.join(dirpath, filename))
                    labels.append(label)
    if not paths:
        raise DatasetLayoutError(f"{folder!r} has class folders but no images")
    return paths, np.asarray(labels, dtype=np.int32), class_names


def epoch_order(num_samples, epoch, seed, shuffle, rank, world_size, batch_size=1):
    """This rank's sample indices for `epoch`, by the shared sampler (`pvt_dense.data.sampler.EpochSampler`).

    Global batch k holds the same images as batch k of a single process with `batch_size * world_size` images, so
    one process and N processes train on the same data. With several processes the tail that does not fill a global
    batch is dropped, so every rank runs the same number of steps; one process keeps it and the loader's
    `drop_remainder` decides.
    """
    sampler = EpochSampler(num_samples, batch_size, world_size, rank, seed, shuffle,
                           tail="keep" if world_size == 1 else "drop")
    if sampler.steps_per_epoch == 0 and num_samples:
        raise PVTDenseError(f"{num_samples} images cannot fill one global batch of {sampler.global_batch} "
                            f"({world_size} processes x {batch_size})")
    return sampler.rank_order(epoch)


class ImageFolderSource:
    """Decoded RGB uint8 images and labels in this rank's order of an epoch.

    `read(order, position)` is the image at `position` of `order` (`order_of(epoch)`); an unreadable file is recorded
    in `bad_files` and the next readable image of the order takes its place. For `mindspore.dataset.GeneratorDataset`
    it is also random-access: `set_epoch(epoch)` selects the order that `source[position]` reads.
    """

    def __init__(self, paths, labels, seed=0, shuffle=True, rank=0, world_size=1, batch_size=1):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int32)
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.batch_size = batch_size
        self.unreadable = UnreadableSamples(errors=(ImageReadError,))
        self._order = (None, None)
        self.set_epoch(0)

    @property
    def bad_files(self):
        """{index of an unreadable image: the reason}."""
        return self.unreadable.bad

    def order_of(self, epoch):
        """This rank's sample indices for `epoch` (the latest epoch's kept; replaced whole, safe across threads)."""
        cached_epoch, order = self._order
        if cached_epoch != epoch:
            order = epoch_order(len(self.paths), epoch, self.seed, self.shuffle, self.rank, self.world_size,
                                self.batch_size)
            self._order = (epoch, order)
        return order

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.order = self.order_of(epoch)

    def read(self, order, position):
        _, sample = self.unreadable.read_first(
            order, position, lambda index: (read_image(self.paths[index]), self.labels[index]),
            "no readable image left in this shard of the dataset")
        return sample

    def __len__(self):
        return len(self.order)

    def __getitem__(self, position):
        return self.read(self.order, position)


_AUGMENT_LOCK = threading.Lock()


def set_seeds_between_augmentations(seed):
    """`set_seeds` (the run's generators, MindSpore's op seeds among them) once no batch thread is augmenting: it
    reseeds the process-wide generators the augmentation borrows."""
    from ..engine.run_setup import set_seeds
    with _AUGMENT_LOCK:
        set_seeds(seed)


def _seeded_draws(seed, epoch, rank, position, kind):
    """A generator for one image's (kind 0) or one batch's (kind 1) random draws, fixed by where it is in the run."""
    return np.random.default_rng([int(seed), int(epoch), int(rank), int(position), kind])


class _SeededGlobalRandom:
    """Seeds `random`, `numpy.random` and MindSpore's dataset seed from `draws` for the block, then puts MindSpore's
    dataset seed back. Callers hold _AUGMENT_LOCK: the three are process-wide."""

    def __init__(self, draws):
        self.draws = draws

    def reseed_dataset_ops(self):
        import mindspore.dataset as ds
        # An eager MindSpore random op seeds itself from the dataset seed on every call: one fresh seed per op.
        ds.config.set_seed(int(self.draws.integers(2 ** 32 - 1)))

    def __enter__(self):
        import mindspore.dataset as ds
        self.saved = ds.config.get_seed()
        random.seed(int(self.draws.integers(2 ** 63)))
        np.random.seed(int(self.draws.integers(2 ** 32)))
        return self

    def __exit__(self, *exc):
        import mindspore.dataset as ds
        ds.config.set_seed(self.saved)
        return False


class TrainingBatches:
    """Training batches for the shared `IterationLoop`: `batch(epoch, index)` -> (images (B, 3, H, W) float32,
    labels (B,) int32, or (B, num_classes) float32 soft labels under mixup/cutmix), a function of its arguments only.

    Each image is augmented by mindcv's transforms with its draws seeded by (seed, epoch, rank, its position in the
    epoch), each batch's mixup/cutmix by (seed, epoch, rank, batch index): the same batch at the same place in a
    run is the same whether or not the run was interrupted before it.
    """

    def __init__(self, images, transforms, mixup, batch_size, max_steps_per_epoch=0):
        self.images, self.transforms, self.mixup = images, list(transforms), mixup
        self.batch_size = int(batch_size)
        full_steps = len(images.order_of(0)) // self.batch_size
        if full_steps == 0:
            raise PVTDenseError(f"{len(images.order_of(0))} training images per process is less than one batch of "
                                f"{self.batch_size}")
        self.steps_per_epoch = min(full_steps, max_steps_per_epoch) if max_steps_per_epoch else full_steps

    @property
    def skipped(self):
        return len(self.images.bad_files)

    def _augmented(self, epoch, order, position):
        image, label = self.images.read(order, position)
        with _AUGMENT_LOCK, _SeededGlobalRandom(_seeded_draws(self.images.seed, epoch, self.images.rank, position,
                                                              0)) as rng:
            for op in self.transforms:
                rng.reseed_dataset_ops()
                image = op(image)
        return image, label

    def batch(self, epoch, index):
        order = self.images.order_of(epoch)
        first = index * self.batch_size
        images, labels = zip(*(self._augmented(epoch, order, position)
                               for position in range(first, first + self.batch_size)))
        images, labels = np.stack(images), np.asarray(labels, dtype=np.int32)
        if self.mixup is not None:
            with _AUGMENT_LOCK, _SeededGlobalRandom(_seeded_draws(self.images.seed, epoch, self.images.rank, index,
                                                                  1)):
                images, labels = self.mixup(images, labels)
        return images, labels


def decoded_train_transforms(cfg):
    """mindcv's ImageNet training transforms for the config, starting from a decoded image."""
    from mindcv.data import create_transforms
    from mindspore.dataset import vision
    ops = create_transforms(dataset_name="imagenet", image_resize=cfg.image_resize, is_training=True,
                            auto_augment=cfg.auto_augment, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                            hflip=cfg.hflip, vflip=cfg.vflip, color_jitter=cfg.color_jitter or None,
                            interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std, re_prob=cfg.re_prob,
                            re_scale=tuple(cfg.re_scale), re_ratio=tuple(cfg.re_ratio), re_value=cfg.re_value,
                            re_max_attempts=cfg.re_max_attempts)
    first = ops[0]
    if not isinstance(first, vision.RandomCropDecodeResize):
        raise RuntimeError(f"mindcv's training transforms changed: expected RandomCropDecodeResize first, got "
                           f"{type(first).__name__}")
    inter = getattr(vision.Inter, cfg.interpolation.upper(), vision.Inter.BILINEAR)
    ops[0] = vision.RandomResizedCrop(cfg.image_resize, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                      interpolation=inter)
    return ops


def decoded_eval_transforms(cfg):
    """mindcv's ImageNet eval transforms (resize to image_size / crop_pct, center crop) from a decoded image."""
    from mindcv.data import create_transforms
    from mindspore.dataset import vision
    ops = create_transforms(dataset_name="imagenet", image_resize=cfg.image_resize, is_training=False,
                            crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)
    return [op for op in ops if not isinstance(op, vision.Decode)]


def worker_count(requested):
    """The config's worker count, capped by this machine's cores (MindSpore refuses more than it has)."""
    return max(1, min(int(requested), os.cpu_count() or 1))


def build_eval_loader(source, cfg, num_classes):
    """A batched MindSpore dataset over `source` with mindcv's eval transforms."""
    import mindspore.dataset as ds
    from mindcv.data import create_loader
    workers = worker_count(cfg.num_parallel_workers)
    dataset = ds.GeneratorDataset(source, column_names=["image", "label"], shuffle=False,
                                  num_parallel_workers=workers, python_multiprocessing=False)
    return create_loader(dataset, batch_size=cfg.batch_size, drop_remainder=False, is_training=False,
                         num_classes=num_classes, transform=decoded_eval_transforms(cfg), num_parallel_workers=workers)


def build_training_batches(images, cfg, num_classes):
    """mindcv's training pipeline as its `create_loader` configures it (transforms, batch, mixup/cutmix), as
    `TrainingBatches` for the shared loop."""
    mixup = None
    if cfg.mixup + cfg.cutmix > 0.0 and cfg.batch_size > 1:  # as mindcv's create_loader configures it
        from mindcv.data.mixup import Mixup
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=None, prob=cfg.cutmix_prob,
                      switch_prob=0.5, label_smoothing=0.0, num_classes=num_classes)
    return TrainingBatches(images, decoded_train_transforms(cfg), mixup, cfg.batch_size, cfg.max_steps_per_epoch)
