"""The end-to-end demo behind `make demo`, on sample photographs that ship with scikit-image.

1. pretrain a PVT-Tiny classifier on scikit-learn's digits written as an ImageNet folder layout
   (configs/demo/pvt_tiny_digits.yaml, a few minutes), and validate it;
2. load that checkpoint into a dense backbone (the path an ImageNet-pretrained model takes into detection);
3. export the four stage maps of scikit-image's sample photographs and print what came out;
4. train RetinaNet + FPN on digits pasted onto canvases (COCO layout) from that backbone, evaluate it with
   pycocotools and draw its detections (`pvt_dense.detection.demo`);
5. train Semantic FPN on digit masks (ADE20K layout) from the same backbone, evaluate mIoU and write overlays
   (`pvt_dense.segmentation.demo`).
Re-running resumes or skips whatever is already done; `tasks` picks the dense tasks to run.
"""
import os
import time

import numpy as np


DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo",
                           "pvt_tiny_digits.yaml")


def pretrain_on_digits(output_dir, config_path=DEMO_CONFIG):
    """Steps 1-2: the digits dataset, training (resumable), validation. Returns (model, best checkpoint, result)."""
    from .classification.recipe import load_classification_config
    from .classification.train import train_classifier
    from .classification.validate import validate_classifier
    from .data.digits import make_digits_imagenet

    data_dir = os.path.join(output_dir, "digits")
    summary = make_digits_imagenet(data_dir, image_size=32)
    print(f"[1/4] digits as ImageNet folders in {data_dir}: {summary['train']} train / {summary['val']} val "
          f"images, {summary['num_classes']} classes")
    cfg = load_classification_config(config_path, ["--data_dir", data_dir, "--ckpt_save_dir",
                                                   os.path.join(output_dir, "pretrain")])
    print(f"[2/4] pretraining {cfg.model} for {cfg.epoch_size} epochs ({config_path})")
    train_classifier(cfg)
    best = os.path.join(cfg.ckpt_save_dir, f"{cfg.model}_best.ckpt")
    result = validate_classifier(load_classification_config(config_path, [
        "--data_dir", data_dir, "--ckpt_path", best]))
    print(f"      validation of {best}: top-1 {result['top1']:.1f}% (chance: {100 / cfg.num_classes:.0f}%), "
          f"top-5 {result['top5']:.1f}%")
    return cfg.model, best, result


DENSE_TASKS = ("detection", "segmentation")


def run_demo(output_dir="outputs/demo", short_side=320, max_long_side=512, tasks=DENSE_TASKS):
    import mindspore as ms

    from .data.samples import sample_images
    from .features import export_features
    from .models import create_backbone
    from .models.pvt import parameter_count

    os.makedirs(output_dir, exist_ok=True)
    model_name, ckpt, _ = pretrain_on_digits(output_dir)
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    backbone = create_backbone(model_name, pretrained=ckpt)
    print(f"[3/4] {model_name} backbone from {ckpt}: {parameter_count(backbone):,} parameters, "
          f"channels {backbone.out_channels}, strides {backbone.strides}")
    images = sample_images(os.path.join(output_dir, "samples"))

    start = time.perf_counter()
    summary = export_features(backbone, os.path.join(output_dir, "samples"), os.path.join(output_dir, "features"),
                              short_side=short_side, max_long_side=max_long_side)
    elapsed = time.perf_counter() - start
    print(f"[4/4] stage maps of {len(images)} sample photographs ({elapsed:.1f} s, graph mode):")
    print("\n".join("  " + line for line in summary.lines()))
    for path in sorted(summary.exported + summary.skipped_existing):
        with np.load(path) as npz:
            shapes = " ".join("x".join(map(str, npz[f"stage{i + 1}"].shape)) for i in npz["out_indices"])
            print(f"  {os.path.basename(path)}: {tuple(npz['original_size'])} -> padded "
                  f"{tuple(npz['padded_size'])}; maps {shapes}")
    results = {"features": summary}
    if "detection" in tasks:
        from .detection.demo import run_detection_demo
        results["detection"] = run_detection_demo(ckpt, output_dir)
    if "segmentation" in tasks:
        from .segmentation.demo import run_segmentation_demo
        results["segmentation"] = run_segmentation_demo(ckpt, output_dir)
    return results
