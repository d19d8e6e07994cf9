"""The end-to-end demo behind `make demo`, on sample photographs that ship with scikit-image.

1. pretrain a PVT-Tiny classifier on scikit-learn's digits written as an ImageNet folder layout
   (configs/demo/pvt_tiny_digits.yaml, a few minutes), and validate it;
2. load that checkpoint into a dense backbone (the path an ImageNet-pretrained model takes into detection);
3. export the four stage maps of scikit-image's sample photographs and print what came out;
4. train RetinaNet + FPN on digits pasted onto canvases (COCO layout) from that backbone, evaluate it with
   pycocotools and draw its detections (`pvt_dense.detection.demo`);
5. train Semantic FPN on digit masks (ADE20K layout) from the same backbone, evaluate mIoU and write overlays
   (`pvt_dense.segmentation.demo`).
Re-running resumes or skips whatever is already done; `tasks` picks the dense tasks to run. It starts by printing
how long each part takes on an idle 2-core CPU and ends with `summary.png` (`pvt_dense.demo_summary`), the picture
of the whole run, and the list of output folders.
"""
import os
import time

import numpy as np


DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo",
                           "pvt_tiny_digits.yaml")


def pretrain_on_digits(output_dir, config_path=DEMO_CONFIG):
    """Steps 1-2: the digits dataset, training (resumable), validation. Returns (model, best checkpoint, result)."""
    from .classification.config import load_classification_config
    from .classification.train import train_classifier
    from .classification.evaluation import validate_classifier
    from .data.digits import make_digits_imagenet
    from .demo_summary import read_metrics

    data_dir = os.path.join(output_dir, "digits")
    cfg = load_classification_config(config_path, ["--data_dir", data_dir, "--ckpt_save_dir",
                                                   os.path.join(output_dir, "pretrain")])
    # Written at the size the config trains at, so no resize blurs them a second time.
    summary = make_digits_imagenet(data_dir, image_size=cfg.image_resize)
    print(f"[1/4] digits as {cfg.image_resize}x{cfg.image_resize} ImageNet folders in {data_dir}: "
          f"{summary['train']} train / {summary['val']} val images, {summary['num_classes']} classes")
    print(f"[2/4] pretraining {cfg.model} for {cfg.epoch_size} epochs ({config_path})")
    train_classifier(cfg)
    best = os.path.join(cfg.ckpt_save_dir, f"{cfg.model}_best.ckpt")
    # The run validated every epoch and kept the best epoch's weights as `best`: that epoch's record says what the
    # checkpoint scores (validating it again gave the same figures and cost ~6 s of the idle demo).
    records = [record for record in read_metrics(os.path.join(cfg.ckpt_save_dir, "metrics.jsonl"))
               if record.get("val_top1") is not None]
    if records:
        record = max(records, key=lambda r: r["val_top1"])
        result = {"top1": record["val_top1"], "top5": record.get("val_top5", float("nan"))}
        source = f"epoch {record.get('epoch', '?')}'s validation"
    else:  # a run without per-epoch validation records
        result = validate_classifier(load_classification_config(config_path, [
            "--data_dir", data_dir, "--ckpt_path", best]))
        source = "validation"
    print(f"      {best} ({source}): top-1 {result['top1']:.1f}% (chance: {100 / cfg.num_classes:.0f}%), "
          f"top-5 {result['top5']:.1f}%")
    return cfg.model, best, result


DENSE_TASKS = ("detection", "segmentation")

# Wall seconds of each part on an idle 2-core CPU, graph compilations included: the mean of two whole runs
# (2026-12-07, Intel Xeon, nothing else running: 3 min 58 s both times; docs/quickstart.md).
PART_ESTIMATES = (("pretraining", 62), ("features", 4), ("detection", 78), ("segmentation", 91))


def print_plan(output_dir, tasks):
    parts = [(name, seconds) for name, seconds in PART_ESTIMATES
             if name in ("pretraining", "features") or name in tasks]
    total = sum(seconds for _, seconds in parts)
    print(f"pvt_dense demo into {os.path.abspath(output_dir)}: about {total / 60:.0f} min on an idle 2-core CPU "
          "(longer when the machine is busy; a re-run resumes or skips finished parts)")
    for name, seconds in parts:
        print(f"  {name:<13} ~{seconds:>4.0f} s")


class PartTimer:
    """Wall and CPU (user + sys of this process) seconds of one part of the demo."""

    def __init__(self, name, timings):
        self.name, self.timings = name, timings

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc):
        wall, cpu = time.perf_counter() - self.wall, _cpu_seconds() - self.cpu
        self.timings[self.name] = (wall, cpu)
        print(f"      ({self.name}: {wall:.0f} s wall, {cpu:.0f} s CPU)")
        return False


def _cpu_seconds():
    times = os.times()
    return times.user + times.system


def output_folders(output_dir, tasks):
    """(description, path) of every folder the demo writes results to, in the order a person would look."""
    folders = [("pretraining run (checkpoints, metrics, curves.png)", "pretrain"),
               ("stage maps of the sample photographs (.npz)", "features")]
    if "detection" in tasks:
        folders += [("drawn detections and detections.json", "detections"), ("detection run", "detection")]
    if "segmentation" in tasks:
        folders += [("segmentation masks, colours and overlays", "segmentation_overlays"),
                    ("segmentation run", "segmentation")]
    return [(text, os.path.join(output_dir, folder)) for text, folder in folders]


def run_demo(output_dir="outputs/demo", short_side=320, max_long_side=512, tasks=DENSE_TASKS):
    import mindspore as ms

    from .data.sample_photos import sample_images
    from .demo_summary import build_summary
    from .features import export_features
    from .models import create_backbone
    from .models.pvt import parameter_count

    os.makedirs(output_dir, exist_ok=True)
    print_plan(output_dir, tasks)
    timings = {}
    with PartTimer("pretraining", timings):
        model_name, ckpt, _ = pretrain_on_digits(output_dir)
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    with PartTimer("features", timings):
        backbone = create_backbone(model_name, pretrained=ckpt)
        print(f"[3/4] {model_name} backbone from {ckpt}: {parameter_count(backbone):,} parameters, "
              f"channels {backbone.out_channels}, strides {backbone.strides}")
        images = sample_images(os.path.join(output_dir, "samples"))
        summary = export_features(backbone, os.path.join(output_dir, "samples"),
                                  os.path.join(output_dir, "features"), short_side=short_side,
                                  max_long_side=max_long_side, progress=False)
        print(f"[4/4] stage maps of {len(images)} sample photographs (graph mode; a size met once runs eagerly "
              "instead of compiling a graph):")
        print("\n".join("  " + line for line in summary.lines()))
        for path in sorted(summary.exported + summary.skipped_existing):
            with np.load(path) as npz:
                shapes = " ".join("x".join(map(str, npz[f"stage{i + 1}"].shape)) for i in npz["out_indices"])
                print(f"  {os.path.basename(path)}: {tuple(npz['original_size'])} -> padded "
                      f"{tuple(npz['padded_size'])}; maps {shapes}")
    results = {"features": summary, "timings": timings}
    if "detection" in tasks:
        from .detection.demo import run_detection_demo
        with PartTimer("detection", timings):
            results["detection"] = run_detection_demo(ckpt, output_dir)
    if "segmentation" in tasks:
        from .segmentation.demo import run_segmentation_demo
        with PartTimer("segmentation", timings):
            results["segmentation"] = run_segmentation_demo(ckpt, output_dir)
    summary_path, numbers = build_summary(output_dir)
    results["summary"] = summary_path
    print("demo finished: " + ", ".join(f"{name} {wall:.0f} s" for name, (wall, _) in timings.items()))
    shown = {key: "not run" if value is None else f"{value:.3f}" for key, value in numbers.items()}
    print(f"headline (read back from the run's files): val top-1 {shown['top1']}%, box AP {shown['AP']}, "
          f"AP50 {shown['AP50']}, mIoU {shown['mIoU']}")
    for text, folder in output_folders(output_dir, tasks):
        print(f"  {text}: {folder}")
    print(f"open first: {summary_path}")
    return results
