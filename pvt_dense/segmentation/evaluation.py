"""Evaluate a segmentor over a split: per-image prediction at the recipe's test size, logits resized back to the
image's own size, one confusion matrix for the whole split, mIoU / mAcc / aAcc and a per-class table."""
import functools
import math
import sys

import cv2
import numpy as np

from ..class_names import printable
from ..data.images import ImageReadError, header_image_size
from ..data.transforms import network_input_size
from ..engine.shapes import BucketedForward, ShapeFlexibleForward, tensor_signature
from ..models.buckets import ALIGN
from ..models.fast_ops import RunningArgmax
from .ade20k import AnnotationError, list_samples, read_sample
from .metrics import ConfusionMatrix
from .transforms import prepare_test_image, sliding_windows


def resize_logits(logits, size):
    """(K, h, w) float32 -> (K, H, W), bilinear with half-pixel centres (PyTorch's align_corners=False)."""
    height, width = size
    if logits.shape[1:] == (height, width):
        return logits
    # One channel at a time, straight into the output: resizing channels-last instead costs two transposed copies of
    # all K maps (150 for ADE20K); measured for 150 x 512x704 -> 512x683: 0.8-1.1 s that way, 0.13 s this way.
    resized = np.empty((logits.shape[0], height, width), np.float32)
    for channel, plane in enumerate(logits):
        cv2.resize(plane, (width, height), dst=resized[channel], interpolation=cv2.INTER_LINEAR)
    return resized


def resized_argmax(logits, size, via=None):
    """`resize_logits(logits, size).argmax(axis=0)` (int32) without the K resized maps: each class map is resized into
    one reused buffer and folded into a running argmax (for 150 x 512x704 -> 512x683 the resized maps are 210 MB, a
    fresh allocation per image whose first touch alone cost 0.1-0.5 s). With `via` (h, w), each map is resized to
    (h, w) first and from there to `size`: `resize_logits(resize_logits(logits, via), size).argmax(axis=0)`, the
    two resizes of the test protocol (`Predictor`), for the price of about one."""
    height, width = size
    running = RunningArgmax((height, width))
    plane = np.empty((height, width), np.float32)
    middle = None if via is None or tuple(via) in (tuple(logits.shape[1:]), (height, width)) else \
        np.empty(tuple(via), np.float32)
    for channel in logits:
        if middle is not None:
            channel = cv2.resize(channel, (middle.shape[1], middle.shape[0]), dst=middle,
                                 interpolation=cv2.INTER_LINEAR)
        if channel.shape == (height, width):
            running.add(channel)
        else:
            running.add(cv2.resize(channel, (width, height), dst=plane, interpolation=cv2.INTER_LINEAR))
    return running.index


def crop_logits(outputs, size, stride=1):
    """The logits of a size bucket (`BucketedForward`) cropped to the valid region `size` (at the logits' `stride`:
    the bucket sizes are multiples of it)."""
    return [output[:, :, :size[0] // stride, :size[1] // stride] for output in outputs]


class Predictor:
    """RGB uint8 image -> (num_classes, H, W) logits at the image's size, through an inference Cell that maps
    (1, 3, h, w) inputs to a tuple whose first item is (1, K, h / s, w / s) logits at its `output_stride` s (1 when
    it has none; `SegmentorInference`).

    The test protocol of the official PVT segmentation code (mmseg 0.x `MultiScaleFlipAug(img_scale=(2048, 512))`
    around its `AlignResize(keep_ratio=True, size_divisor=32)`): `prepare_test_image` rescales keeping the ratio and
    then resizes again to multiples of 32; mode "whole" runs the network once on that image, with no padding; "slide"
    runs `crop_size` windows every `stride` pixels over it and averages the overlapping logits (for images much
    larger than the training crops). The logits come back at the network input's size and are resized bilinearly
    (half-pixel centres) to the image's own size; `predict` takes their argmax. mmseg 1.2's `EncoderDecoder.predict`
    does the same two resizes (here both on the host, from logits at the network's output stride; `predict` folds
    each class map into the argmax as soon as it is resized).

    `forward` is the one per-input call: (3, h, w) float32 -> (K, h / s, w / s) float32 logits. By default
    it runs `network`: in mode "whole" through a `ShapeFlexibleForward` (every image has its own aligned size, so
    per size either a compiled graph or an eager PyNative run, whichever the measured costs favour; the logits are
    the same either way, and under a global PyNative context everything runs eagerly), in mode "slide" directly in
    the current MindSpore mode (the windows share one shape: one graph). `expect_images` announces the image sizes
    to come; `stats` (a `ShapeStats`, None for a forward passed in or slide mode) says what ran how. Pass another
    callable to run the network differently.
    """

    def __init__(self, network, scale=(2048, 512), size_divisor=32, mode="whole", crop_size=(512, 512),
                 stride=(341, 341), forward=None):
        if mode not in ("whole", "slide"):
            raise ValueError(f"test mode must be 'whole' or 'slide', got {mode!r}")
        self.network = network
        self.scale = tuple(scale)
        self.size_divisor = size_divisor
        self.mode = mode
        self.crop_size = tuple(crop_size)
        self.stride = tuple(stride)
        self.output_stride = int(getattr(network, "output_stride", 1))
        self.flexible = self.bucketed = None
        if forward is None and mode == "whole":
            if getattr(network, "supports_buckets", False) and size_divisor % ALIGN == 0:
                self.bucketed = BucketedForward(network, functools.partial(crop_logits, stride=self.output_stride),
                                                compile_pixels=2.0e6)
                self.flexible = self.bucketed.flexible
            else:
                self.flexible = ShapeFlexibleForward(network)
        self.forward = forward if forward is not None else self.network_forward

    @property
    def stats(self):
        return self.flexible.stats if self.flexible is not None else None

    def expect_images(self, image_sizes):
        """Announce one coming image per (height, width) in `image_sizes` (mode "whole" with the default forward;
        otherwise nothing to announce)."""
        if self.flexible is None:
            return
        aligned_sizes = [network_input_size(height, width, self.scale, self.size_divisor)
                         for height, width in image_sizes]
        if self.bucketed is not None:
            self.bucketed.expect_sizes(aligned_sizes)
            return
        for aligned in aligned_sizes:
            self.flexible.expect(tensor_signature((1, 3) + tuple(aligned)))

    def expect_files(self, paths):
        """`expect_images` with the sizes read from the files' headers (unreadable headers are left out)."""
        sizes = (header_image_size(path) for path in paths)
        self.expect_images(size for size in sizes if size is not None)

    def network_forward(self, array):
        import mindspore as ms
        if self.bucketed is not None:
            return self.bucketed(array[None])[0][0]
        run = self.flexible if self.flexible is not None else self.network
        return run(ms.Tensor(np.ascontiguousarray(array[None])))[0].asnumpy()[0]

    def logits(self, image):
        return resize_logits(self.network_logits(image), image.shape[:2])

    def network_logits(self, image):
        """(K, h, w) float32 logits at the network input's size (h, w multiples of size_divisor)."""
        return self._logits(prepare_test_image(image, self.scale, self.size_divisor), upsample=True)

    def _logits(self, x, upsample):
        """The logits of the network input x (3, h, w): at (h, w), or in mode "whole" without `upsample` at the
        network's output stride."""
        if self.mode == "whole":
            out = self.forward(x)
            if upsample:
                out = resize_logits(out, x.shape[1:])
        else:
            height, width = x.shape[1:]
            out, count = None, np.zeros((height, width), np.float32)
            for top, bottom, left, right in sliding_windows(height, width, self.crop_size, self.stride):
                window = resize_logits(self.forward(x[:, top:bottom, left:right]), (bottom - top, right - left))
                if out is None:
                    out = np.zeros((window.shape[0], height, width), np.float32)
                out[:, top:bottom, left:right] += window
                count[top:bottom, left:right] += 1
            out = out / count
        return out.astype(np.float32, copy=False)

    def predict(self, image):
        """(H, W) uint8 class map: the argmax of `logits(image)`, computed without them (`resized_argmax`)."""
        x = prepare_test_image(image, self.scale, self.size_divisor)
        return resized_argmax(self._logits(x, upsample=False), image.shape[:2], via=x.shape[1:]).astype(np.uint8)


def evaluate_segmentor(network, samples, num_classes, reduce_zero_label=True, predictor_options=None,
                       progress=False, desc="eval", max_pixels=None):
    """Metrics of `network` (an inference Cell, set to eval mode here) over labelled `samples`.

    Returns {"mIoU", "mAcc", "aAcc", "IoU", "Acc", "label_pixels", "samples", "skipped", "out_of_range_pixels",
    "forward_stats"} (the last: the predictor's `ShapeStats`, None in slide mode).
    Samples whose files cannot be used are skipped and listed in "skipped_files" (name -> reason).
    """
    from tqdm import tqdm
    network.set_train(False)
    predictor = Predictor(network, **(predictor_options or {}))
    predictor.expect_files(sample.image for sample in samples)
    confusion = ConfusionMatrix(num_classes)
    skipped, out_of_range, counted = {}, 0, 0
    for sample in tqdm(samples, desc=desc, unit="img", leave=False, disable=not progress):
        try:
            image, label, outside = read_sample(sample, num_classes, reduce_zero_label, max_pixels)
        except (ImageReadError, AnnotationError) as err:
            skipped[sample.name] = str(err)
            continue
        out_of_range += outside
        confusion.update(predictor.predict(image), label)
        counted += 1
    result = confusion.summary()
    result.update(samples=counted, skipped=len(skipped), skipped_files=skipped, out_of_range_pixels=out_of_range,
                  forward_stats=predictor.stats)
    return result


def format_results(result, class_names):
    """The per-class IoU / Acc table and the summary line, as mmseg prints them (percentages). Names (which may
    come from a checkpoint) are escaped and cut to 40 characters."""
    class_names = [printable(name, 40) for name in class_names]
    width = max([len("class")] + [len(name) for name in class_names])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]

    def percent(value):
        return "   nan" if math.isnan(value) else f"{100 * value:6.2f}"

    for name, iou, acc in zip(class_names, result["IoU"], result["Acc"]):
        lines.append(f"{name:<{width}}  {percent(iou)}  {percent(acc)}")
    lines.append("-" * (width + 16))
    lines.append(f"aAcc {percent(result['aAcc']).strip()}  mIoU {percent(result['mIoU']).strip()}  "
                 f"mAcc {percent(result['mAcc']).strip()}  ({result['samples']} images"
                 + (f", {result['skipped']} unreadable skipped" if result["skipped"] else "")
                 + (f", {result['out_of_range_pixels']} out-of-range label pixels ignored"
                    if result["out_of_range_pixels"] else "") + ")")
    return "\n".join(lines)


def evaluate_checkpoint(cfg, ckpt_path):
    """The metrics of a whole-segmentor checkpoint (ours, an official PVT Semantic FPN release or an
    mmsegmentation 1.x file) on the config's val split, as `evaluate_segmentor` returns them, with the
    "class_names" to print them under (the checkpoint's, else the config's)."""
    from .build import load_trained_segmentor_with_report
    from .config import checkpoint_class_names, predictor_options
    from .segmentor import SegmentorInference
    net, report = load_trained_segmentor_with_report(cfg, ckpt_path)
    samples = list_samples(cfg.data_dir, cfg.val_split)
    result = evaluate_segmentor(SegmentorInference(net, upsample=False), samples, cfg.num_classes, cfg.reduce_zero_label,
                                predictor_options(cfg), progress=cfg.progress_bar)
    result["class_names"] = checkpoint_class_names(cfg, report)
    return result


def print_evaluation(result, max_skipped=10):
    """The per-class table and summary on stdout (with the forward's shape statistics when there are some), the
    first `max_skipped` unusable samples on stderr."""
    print(format_results(result, result["class_names"]))
    if result["forward_stats"] is not None:
        print(f"forward: {result['forward_stats'].summary()}")
    for name, reason in list(result["skipped_files"].items())[:max_skipped]:
        print(f"skipped {name}: {reason}", file=sys.stderr)
