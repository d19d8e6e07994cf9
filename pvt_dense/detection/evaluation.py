"""COCO box evaluation through pycocotools: the 12 standard numbers, and the results JSON COCO tools read."""
import contextlib
import io
import json
import math

import numpy as np
from tqdm import tqdm

from ..atomic import write_atomic
from ..data.transforms import network_input_size
from ..errors import PVTDenseError
from ..engine.shapes import (DEFAULT_MAX_GRAPHS, BucketedForward, ShapeFlexibleForward,
                             tensor_signature)
from ..models.buckets import ALIGN, level_grids
from .build import load_detector
from .config import inference_settings
from .data import evaluation_batches, open_dataset
from .postprocess import InferenceSettings, detect_image

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
METRIC_TITLES = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)


def detections_to_coco(image_id, boxes, scores, labels, category_ids):
    """COCO result records ({image_id, category_id, bbox [x, y, w, h], score}) of one image's detections."""
    results = []
    for box, score, label in zip(np.asarray(boxes, np.float64), scores, labels):
        x1, y1, x2, y2 = (float(v) for v in box)
        results.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(float(score), 5)})
    return results


def coco_evaluate(coco_gt, results, image_ids=None, verbose=True):
    """The 12 COCO box metrics (fractions in [0, 1]; -1 where a category of boxes is absent, as pycocotools
    reports) of `results` (COCO result records) against the pycocotools index `coco_gt`, over `image_ids` (default:
    every image of the index). Prints pycocotools' summary when `verbose`."""
    from pycocotools.cocoeval import COCOeval
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    if not image_ids:
        raise PVTDenseError("no images to evaluate")
    if not results:
        # pycocotools cannot load an empty result list; nothing detected is simply 0 everywhere.
        stats = [0.0] * len(METRIC_NAMES)
        if verbose:
            print("\n".join(f" {title} = {0.0:.3f}" for title in METRIC_TITLES))
        return dict(zip(METRIC_NAMES, stats))
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        coco_dt = coco_gt.loadRes(list(results))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print("\n".join(line for line in captured.getvalue().splitlines() if "Average" in line))
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def write_results_json(path, results):
    """Write COCO result records to `path` atomically (the format `coco.loadRes` and the COCO server read)."""
    write_atomic(path, json.dumps(results).encode("utf-8"))
    return path


class DetectorForward:
    """The one place where inference runs the network: forward(images (B, 3, H, W) numpy float32) -> the head's raw
    outputs as numpy arrays (L class maps, then L box maps).

    Under the test protocol every distinct padded image size is a new input shape, and graph mode compiles one
    graph per input shape. A detector whose backbone supports size buckets (PVT v1, v2 but "-li") runs through a
    `BucketedForward` (policy "auto", sizes multiples of 32): a few bucket graphs, planned from the sizes announced
    with `expect_sizes`, serve every size with each size's own outputs. Otherwise it runs through a
    `ShapeFlexibleForward`: per shape either a compiled graph or an eager (PyNative) run, whichever the measured
    costs favour. Either way the outputs are those of the image at its own size, under a global PyNative context
    everything runs eagerly, and at most `max_graphs` compiled graphs stay alive. `shapes` records the distinct
    input shapes of a run, `stats` what ran how. A different strategy replaces this object: `predict_dataset` and
    `infer_images` take any callable with the same contract as `forward=`.
    """

    def __init__(self, detector, policy="auto", buckets=True, max_graphs=DEFAULT_MAX_GRAPHS):
        self.detector = detector
        self.shapes = set()
        self.bucketed = None
        if buckets and policy == "auto" and getattr(detector, "supports_buckets", False):
            self.bucketed = BucketedForward(detector, self.crop_outputs, max_graphs=max_graphs)
            self.flexible = self.bucketed.flexible
        else:
            self.flexible = ShapeFlexibleForward(detector, policy, max_graphs=max_graphs)

    @property
    def stats(self):
        return self.flexible.stats

    def crop_outputs(self, outputs, size):
        """Each level's class and box maps cropped to the grid of an input of `size` alone."""
        grids = level_grids(size, self.detector.anchor_generator.strides)
        grids = grids + grids
        if len(outputs) != len(grids):
            raise ValueError(f"the detector gave {len(outputs)} maps for {len(grids) // 2} levels")
        return [output[:, :, :grid[0], :grid[1]] for output, grid in zip(outputs, grids)]

    def expect_sizes(self, padded_sizes):
        """Announce one coming single-image call per padded (height, width) in `padded_sizes`."""
        padded_sizes = [tuple(size) for size in padded_sizes]
        if self.bucketed is not None and all(h % ALIGN == 0 and w % ALIGN == 0 for h, w in padded_sizes):
            self.bucketed.expect_sizes(padded_sizes)
            return
        for size in padded_sizes:
            self.flexible.expect(tensor_signature((1, 3) + size))

    def __call__(self, image_batch):
        import mindspore as ms
        self.shapes.add(tuple(image_batch.shape))
        height, width = image_batch.shape[2:]
        if self.bucketed is not None and height % ALIGN == 0 and width % ALIGN == 0:
            return self.bucketed(image_batch)
        return [output.asnumpy() for output in self.flexible(ms.Tensor(image_batch))]


def announce_sizes(forward, image_sizes, img_scale, size_divisor):
    """Tell `forward` (when it takes announcements) the input sizes of the images (height, width) to come."""
    if hasattr(forward, "expect_sizes"):
        forward.expect_sizes(network_input_size(h, w, img_scale, size_divisor) for h, w in image_sizes)


def predict_dataset(detector, dataset, settings=InferenceSettings(), img_scale=(1333, 800), size_divisor=32,
                    mean=None, std=None, indices=None, progress=True, forward=None):
    """(COCO result records, ids of the images evaluated, list of unreadable image messages, number of distinct
    input shapes) over `dataset`, one image at a time under mmdetection's test protocol; `forward` defaults to a
    `DetectorForward` of the detector."""
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    detector.set_train(False)
    forward = forward or DetectorForward(detector)
    results, image_ids, unreadable, shapes = [], [], [], set()
    total = len(dataset) if indices is None else len(indices)
    # The annotation file gives every image's size, so the padded sizes to come are known without reading a file.
    records = dataset.records if indices is None else [dataset.records[i] for i in indices]
    announce_sizes(forward, ((r.height, r.width) for r in records), img_scale, size_divisor)
    batches = evaluation_batches(dataset, indices, img_scale, size_divisor, mean or IMAGENET_MEAN,
                                 std or IMAGENET_STD)
    for images, metas, records in tqdm(batches, total=total, desc="detect", unit="img", leave=False,
                                       disable=not progress):
        if images is None:
            unreadable.extend(metas)
            continue
        shapes.add(images.shape)
        outputs = forward(images)
        for slot, (meta, record) in enumerate(zip(metas, records)):
            boxes, scores, labels = detect_image(outputs, slot, detector.anchor_generator, detector.num_classes,
                                                 meta, settings)
            results.extend(detections_to_coco(record.image_id, boxes, scores, labels, dataset.category_ids))
            image_ids.append(record.image_id)
    return results, image_ids, unreadable, len(shapes)


def evaluate_detector(detector, dataset, settings=InferenceSettings(), img_scale=(1333, 800), size_divisor=32,
                      mean=None, std=None, max_images=0, results_json=None, verbose=True, progress=True,
                      forward=None):
    """Run the detector over `dataset` (the first `max_images` when > 0), evaluate with pycocotools and return the
    12 metrics plus `images`, `unreadable` and `input_shapes` counts; writes the results JSON when `results_json`
    is a path."""
    indices = range(min(max_images, len(dataset))) if max_images else None
    forward = forward or DetectorForward(detector)
    results, image_ids, unreadable, num_shapes = predict_dataset(detector, dataset, settings, img_scale,
                                                                 size_divisor, mean, std, indices, progress,
                                                                 forward)
    if verbose:
        print(f"{len(image_ids)} images in {num_shapes} distinct input shapes"
              + (f"; forward: {forward.stats.summary()}" if hasattr(forward, "stats") else ""))
    for message in unreadable:
        print(f"warning: skipped in evaluation: {message}")
    if results_json:
        write_results_json(results_json, results)
    metrics = coco_evaluate(dataset.coco, results, image_ids, verbose=verbose)
    metrics = {key: (value if math.isfinite(value) else -1.0) for key, value in metrics.items()}
    metrics.update(images=len(image_ids), unreadable=len(unreadable), input_shapes=num_shapes)
    return metrics


def evaluate_on(detector, dataset, cfg, results_json=None, verbose=True):
    return evaluate_detector(detector, dataset, inference_settings(cfg), tuple(cfg.img_scale), cfg.size_divisor,
                             tuple(cfg.mean), tuple(cfg.std), cfg.max_eval_images, results_json=results_json,
                             verbose=verbose, progress=cfg.progress_bar)


def evaluate_checkpoint(cfg, ckpt_path, results_json=None):
    """The 12 COCO metrics of a checkpoint on the config's val set (printed by pycocotools' summary)."""
    val_set = open_dataset(cfg, "val")
    detector = load_detector(cfg, ckpt_path, val_set.num_classes)
    return evaluate_on(detector, val_set, cfg, results_json=results_json)
