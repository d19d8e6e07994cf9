"""ImageNet-layout data for classification: `root/{train,val}/<class>/<image>`, with mindcv's transforms.

Two things differ from mindcv's `create_dataset`, each for a stated reason:
- Images are decoded in Python with OpenCV (`pvt_dense.data.images.read_image`), so a corrupt or unreadable file is
  skipped and counted instead of stopping a multi-day run; the next readable image of the epoch takes its place.
- The sample order of every epoch is a permutation seeded by (seed, epoch) and sharded by rank, so an epoch can be
  replayed exactly after a crash, from its first batch or from any batch inside it.
mindcv's own transform lists (RandAugment, random erasing, bicubic resize, crop_pct) and its loader (mixup/cutmix)
are used as they are; only their first op, which decodes bytes, becomes its decoded-array equivalent.
"""
import os
import threading

import numpy as np

from ..data.images import is_image_name, read_image
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
    """This rank's sample indices for `epoch`, from one permutation seeded by (seed, epoch).

    With several ranks the permutation is dealt out batch by batch: global batch k holds the same images as batch k
    of a single process with `batch_size * world_size` images, so one process and N processes train on the same
    data. The tail that does not fill a global batch is dropped, so every rank runs the same number of steps.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle else np.arange(num_samples)
    if world_size == 1:
        return order
    global_batch = batch_size * world_size
    usable = num_samples // global_batch * global_batch
    if usable == 0:
        raise PVTDenseError(f"{num_samples} images cannot fill one global batch of {global_batch} "
                            f"({world_size} processes x {batch_size})")
    return order[:usable].reshape(-1, world_size, batch_size)[:, rank, :].reshape(-1)


class ImageFolderSource:
    """A random-access source for `mindspore.dataset.GeneratorDataset`: decoded RGB uint8 images and labels.

    `set_epoch(epoch, start_batch)` selects the epoch's order and where in it to begin; reading a bad file records
    it in `bad_files` and returns the next readable image of the order instead.
    """

    def __init__(self, paths, labels, seed=0, shuffle=True, rank=0, world_size=1, batch_size=1):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int32)
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.batch_size = batch_size
        self.bad_files = {}
        self._lock = threading.Lock()
        self.set_epoch(0)

    def set_epoch(self, epoch, start_batch=0):
        order = epoch_order(len(self.paths), epoch, self.seed, self.shuffle, self.rank, self.world_size,
                            self.batch_size)
        self.epoch_indices = order
        self.order = order[start_batch * self.batch_size:]

    def __len__(self):
        return len(self.order)

    def __getitem__(self, position):
        for step in range(len(self.order)):
            index = self.order[(position + step) % len(self.order)]
            if index in self.bad_files:
                continue
            try:
                return read_image(self.paths[index]), self.labels[index]
            except ImageReadError as err:
                with self._lock:
                    self.bad_files[index] = getattr(err, "reason", str(err))
        raise PVTDenseError("no readable image left in this shard of the dataset")


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


def build_loader(source, cfg, num_classes, training):
    """A batched MindSpore dataset over `source` with mindcv's transforms (and mixup/cutmix when training)."""
    import mindspore.dataset as ds
    from mindcv.data import create_loader
    workers = worker_count(cfg.num_parallel_workers)
    dataset = ds.GeneratorDataset(source, column_names=["image", "label"], shuffle=False,
                                  num_parallel_workers=workers, python_multiprocessing=False)
    transforms = decoded_train_transforms(cfg) if training else decoded_eval_transforms(cfg)
    return create_loader(dataset, batch_size=cfg.batch_size, drop_remainder=training and cfg.drop_remainder,
                         is_training=training, mixup=cfg.mixup if training else 0.0,
                         cutmix=cfg.cutmix if training else 0.0, cutmix_prob=cfg.cutmix_prob,
                         num_classes=num_classes, transform=transforms,
                         num_parallel_workers=workers)
