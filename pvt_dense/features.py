"""Export PVT stage maps of many images to one .npz file per image, streaming, resumable, and safe to re-run.

Output layout (see `export_features` for the arrays inside each file): the image's name relative to the input,
plus `.npz`, under `output_dir`, by the rule of `pvt_dense.output_names`: a directory input keeps its subfolders
(`photos/2024/a.jpg` -> `OUT/2024/a.jpg.npz` for input `photos`); a single file gives `OUT/a.jpg.npz`; a list file
uses each relative line as written and the file name of each absolute one. The extension stays in the name so
`a.jpg` and `a.png` never overwrite each other.
"""
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np
from mindspore import Tensor
from tqdm import tqdm

from .atomic import write_atomic
from .data.images import header_image_size, list_image_entries, read_image, resolve_max_pixels
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, check_positive, preprocess_dense, rescaled_size
from .engine.shapes import DEFAULT_MAX_GRAPHS, BucketedForward, ShapeFlexibleForward, ShapeStats, tensor_signature
from .errors import ConfigError, PVTDenseError
from .models import create_backbone
from .models.factory import get_spec
from .output_names import contained_path
from .output_names import output_names as names_by_rule

PAD_DIVISOR = 32  # the stride of the last PVT stage: every stage map is then exactly padded_size // stride


@dataclass
class ExportSummary:
    """What an export did: files written, outputs found from an earlier run, and images that failed (why)."""

    output_dir: str
    exported: List[str] = field(default_factory=list)
    skipped_existing: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)
    forward_stats: ShapeStats = field(default_factory=ShapeStats)

    def lines(self):
        out = [f"exported {len(self.exported)} feature files to {self.output_dir}",
               f"skipped {len(self.skipped_existing)} images whose .npz already exists",
               f"failed {len(self.failed)} images"]
        if self.exported:
            out.append(f"forward passes: {self.forward_stats.summary()}")
        out += [f"  {source}: {reason}" for source, reason in self.failed]
        return out

    def __str__(self):
        return "\n".join(self.lines())


def stage_key(stage_index):
    """Array name of a stage map: 'stage1'..'stage4', numbered from 1 like the PVT paper."""
    return f"stage{stage_index + 1}"


def output_names(entries):
    """One distinct output name ('<name>.npz') per entry, in order, by the rule of `pvt_dense.output_names`."""
    return names_by_rule([entry.name for entry in entries], suffix=".npz")


def write_npz_atomic(path, arrays):
    """Write an .npz via a temporary file in the same folder and `os.replace`, so a killed run never leaves a
    half-written file that a re-run would take as done."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # A dot name that never ends in .npz, so it is neither listed as an output nor skipped as one.
    write_atomic(path, writer=lambda handle: np.savez(handle, **arrays), prefix=".", suffix=".partial")


@dataclass
class PendingImage:
    source: str
    target: str
    chw: np.ndarray
    meta: dict


class SameShapeBatcher:
    """Groups preprocessed images by padded size into batches of up to `batch_size`.

    Each image is padded only to its own multiple of 32, never to a batch mate's size, so its features do not
    depend on the batch size or the other images (PVT attention is global: padding changes every output). At most `max_pending` images wait; past that the
    fullest group goes out as a smaller batch, which bounds memory on inputs of many different sizes.
    """

    def __init__(self, batch_size, max_pending):
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.groups = OrderedDict()

    def add(self, item):
        """Queue `item`; returns the batches that are now ready (possibly none)."""
        group = self.groups.setdefault(item.chw.shape, [])
        group.append(item)
        if len(group) == self.batch_size:
            return [self.groups.pop(item.chw.shape)]
        if sum(len(waiting) for waiting in self.groups.values()) > self.max_pending:
            fullest = max(self.groups, key=lambda shape: len(self.groups[shape]))
            return [self.groups.pop(fullest)]
        return []

    def drain(self):
        batches = list(self.groups.values())
        self.groups.clear()
        return batches


def feature_arrays(maps, meta, source, backbone_name, ckpt, out_indices, strides, channels):
    resized = meta["resized_size"]
    arrays = {stage_key(index): stage_map for index, stage_map in zip(out_indices, maps)}
    arrays.update(
        out_indices=np.asarray(out_indices, dtype=np.int64),
        strides=np.asarray(strides, dtype=np.int64),
        channels=np.asarray(channels, dtype=np.int64),
        valid_sizes=np.asarray([(math.ceil(resized[0] / s), math.ceil(resized[1] / s)) for s in strides],
                               dtype=np.int64).reshape(len(strides), 2),
        original_size=np.asarray(meta["original_size"], dtype=np.int64),
        resized_size=np.asarray(resized, dtype=np.int64),
        padded_size=np.asarray(meta["padded_size"], dtype=np.int64),
        scale_factor=np.asarray(meta["scale_factor"], dtype=np.float64),
        mean=np.asarray(IMAGENET_MEAN, dtype=np.float32),
        std=np.asarray(IMAGENET_STD, dtype=np.float32),
        backbone=np.asarray(backbone_name),
        checkpoint=np.asarray(os.path.abspath(ckpt) if ckpt else ""),
        source=np.asarray(os.path.abspath(source)),
    )
    return arrays


def export_features(backbone, input, output_dir, ckpt=None, short_side=800, max_long_side=1333, batch_size=1,
                    out_indices=None, progress=True, max_pixels=None):
    """Run a PVT backbone over images and write one `.npz` of stage maps per image; returns an `ExportSummary`.

    Args:
        backbone: a model name (`pvt_tiny` ... `pvt_large`, built here, with `ckpt` loaded if given; random
            weights otherwise) or a `PVTBackbone` already built (then `ckpt` must be None). Runs in whatever
            MindSpore mode is set; the command-line tool uses graph mode.
        input: an image file, a directory (recursive) or a .txt list of paths (see `list_image_entries`).
        output_dir: where the .npz files go (module docstring: names). Nothing is ever written outside it:
            '..', absolute paths and symlinks already inside it that point out are neutralised or refused.
        short_side, max_long_side: the keep-ratio resize of `preprocess_dense`; padding is to a multiple of 32.
        batch_size: images per forward; images are batched only with others of the same padded size.
        out_indices: stages to export (0..3); default all four, or those of a built backbone.
        max_pixels: the decode limit of `read_image`.

    Each file holds float32 `stage{i+1}` maps of shape (C_i, H_pad // s_i, W_pad // s_i) for each exported stage i:
    the maps of the padded input, exactly what a detector neck sees. Only the top-left `valid_sizes[k]`
    (= ceil(resized_size / s_i)) cells of the k-th map cover the image: crop with
    `stage[:, :valid_h, :valid_w]`. Metadata arrays: `out_indices`, `strides`, `channels`, `valid_sizes` (one
    row per exported stage), `original_size`, `resized_size`, `padded_size` ((height, width) in pixels),
    `scale_factor` (resized / original, per axis), `mean`, `std`, and strings `backbone`, `checkpoint` ('' for
    random weights), `source` (absolute image path). Loads with `np.load(path)` (no pickle).

    Images whose .npz exists are skipped (a run can be resumed; the model and checkpoint are only loaded when
    something is left to do); unreadable images are listed in the summary and do not stop the run. Images are
    read, run and written batch by batch, so memory does not grow with the number of images. Forward passes go
    through `BucketedForward` (a few size-bucket graphs serve every padded size, each image getting the maps of its
    own padded input) or, for backbones that cannot be bucketed (v2 "-li"), `ShapeFlexibleForward` per size; the
    features are the same either way. `summary.forward_stats` says what happened.
    """
    check_positive(batch_size=batch_size, short_side=short_side, max_long_side=max_long_side)
    max_pixels = resolve_max_pixels(max_pixels)
    net, backbone_name, out_indices = resolve_backbone(backbone, ckpt, out_indices)
    spec = get_spec(backbone_name)
    strides = tuple(spec.strides[i] for i in out_indices)
    channels = tuple(spec.embed_dims[i] for i in out_indices)

    entries = list_image_entries(input)
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise PVTDenseError(f"output {output_dir!r} exists and is not a directory")
    os.makedirs(output_dir, exist_ok=True)
    root_real = os.path.realpath(output_dir)
    summary = ExportSummary(output_dir)

    todo = []
    for entry, name in zip(entries, output_names(entries)):
        try:
            target = contained_path(root_real, name)
        except PVTDenseError as err:
            summary.failed.append((entry.path, str(err)))
            continue
        if os.path.lexists(target):
            summary.skipped_existing.append(target)
        else:
            todo.append((entry, name, target))
    if not todo:
        return summary

    if net is None:
        net = create_backbone(backbone_name, out_indices=out_indices, pretrained=ckpt)
    net.set_train(False)

    with tqdm(total=len(todo), disable=not progress, unit="img", desc=f"{backbone_name} features") as bar:
        def record_failure(source, reason):
            summary.failed.append((source, reason))
            bar.update(1)
            bar.set_postfix(failed=len(summary.failed))

        def preprocess(image):
            return preprocess_dense(image, short_side, max_long_side, PAD_DIVISOR)

        batcher = SameShapeBatcher(batch_size, max_pending=4 * batch_size)
        forward = backbone_forward(net, strides)
        summary.forward_stats = forward.stats
        if batch_size == 1:  # larger batches are formed on the fly, so their shapes are not known ahead
            forward.expect_sizes(padded_sizes_ahead((entry.path for entry, _, _ in todo), short_side,
                                                    max_long_side))
        for batch in ready_batches(todo, root_real, preprocess, max_pixels, batcher, record_failure):
            for item, maps in zip(batch, forward_batch(forward, batch)):
                arrays = feature_arrays(maps, item.meta, item.source, backbone_name, ckpt, out_indices, strides,
                                        channels)
                try:
                    write_npz_atomic(item.target, arrays)
                except OSError as err:
                    record_failure(item.source, f"cannot write {item.target}: {err.strerror or err}")
                    continue
                summary.exported.append(item.target)
                bar.update(1)
    return summary


def padded_sizes_ahead(paths, short_side, max_long_side):
    """The padded (height, width) each image will have, from file headers only (`header_image_size`), for images
    whose header can be read; used to tell the forward which input sizes recur."""
    for path in paths:
        size = header_image_size(path)
        if size is None:
            continue
        resized_height, resized_width, _ = rescaled_size(*size, short_side, max_long_side)
        yield (math.ceil(resized_height / PAD_DIVISOR) * PAD_DIVISOR,
               math.ceil(resized_width / PAD_DIVISOR) * PAD_DIVISOR)


def ready_batches(todo, root_real, preprocess, max_pixels, batcher, record_failure):
    """Read and preprocess the planned images one at a time, yielding same-shape batches as they fill up."""
    for entry, name, target in todo:
        try:
            contained_path(root_real, name)  # again: the folder may have changed since planning
            chw, meta = preprocess(read_image(entry.path, max_pixels))
        except PVTDenseError as err:
            record_failure(entry.path, getattr(err, "reason", str(err)))
            continue
        yield from batcher.add(PendingImage(entry.path, target, chw, meta))
    yield from batcher.drain()


class SizedForward:
    """A backbone run per input size through a `ShapeFlexibleForward`, with `BucketedForward`'s interface:
    `expect_sizes` and numpy batches in, numpy maps out (for backbones that cannot run in size buckets)."""

    def __init__(self, net, policy="auto", max_graphs=DEFAULT_MAX_GRAPHS):
        self.flexible = ShapeFlexibleForward(net, policy, max_graphs=max_graphs)
        self.stats = self.flexible.stats

    def expect_sizes(self, sizes):
        for size in sizes:
            self.flexible.expect(tensor_signature((1, 3) + tuple(size)))

    def __call__(self, images):
        return [stage_maps.asnumpy() for stage_maps in self.flexible(Tensor(images))]


def backbone_forward(net, strides):
    """How the backbone runs: in size buckets (a few graphs for all padded sizes, each image's own maps) where it
    can, else per size."""
    if not getattr(net, "supports_buckets", False):
        return SizedForward(net)

    def crop(maps, size):
        return [stage_maps[:, :, :size[0] // stride, :size[1] // stride] for stage_maps, stride in zip(maps, strides)]
    return BucketedForward(net, crop)


def forward_batch(forward, batch):
    """Per image of a same-shape batch, its list of stage maps (C, h, w); `forward` runs the backbone."""
    maps = forward(np.stack([item.chw for item in batch]))
    return [[stage_maps[i] for stage_maps in maps] for i in range(len(batch))]


def resolve_backbone(backbone, ckpt, out_indices):
    """(built net or None, model name, out_indices) for a model name or an already built backbone."""
    if isinstance(backbone, str):
        num_stages = len(get_spec(backbone).depths)
        out_indices = tuple(out_indices) if out_indices is not None else tuple(range(num_stages))
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not all(
                0 <= i < num_stages for i in out_indices):
            raise ConfigError(f"out_indices must be increasing stage indices in 0..{num_stages - 1}, got "
                              f"{out_indices}")
        return None, backbone, out_indices
    if ckpt is not None:
        raise ConfigError("pass ckpt only with a model name; a built backbone already has its weights")
    name = getattr(backbone, "model_name", None)
    if name is None or not hasattr(backbone, "out_indices"):
        raise ConfigError(f"backbone must be a model name or a backbone from create_backbone, got "
                          f"{type(backbone).__name__}")
    if out_indices is not None and tuple(out_indices) != tuple(backbone.out_indices):
        raise ConfigError(f"out_indices {tuple(out_indices)} differ from the built backbone's "
                          f"{tuple(backbone.out_indices)}")
    return backbone, name, tuple(backbone.out_indices)
