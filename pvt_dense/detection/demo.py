"""The detection part of `make demo`: RetinaNet on the demo's pretrained PVT-Tiny, on digits pasted onto canvases.

1. write the digits detection set (COCO layout) under `output_dir/digits_detection`;
2. train RetinaNet + FPN from the pretrained backbone (configs/demo/retinanet_pvt_tiny_digits.yaml, resumable);
3. evaluate on the val canvases with pycocotools (the 12 numbers);
4. draw the detections of a few val canvases into `output_dir/detections`.
"""
import os

DEMO_DET_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "configs", "demo", "retinanet_pvt_tiny_digits.yaml")


def run_detection_demo(backbone_ckpt, output_dir="outputs/demo", config_path=DEMO_DET_CONFIG, overrides=(),
                       num_drawn=6):
    """Run steps 1-4; returns the val metrics (dict of the 12 COCO numbers)."""
    import time

    from ..data.digits_detection import make_digits_detection
    from .infer import infer_images
    from .recipe import load_detection_config, inference_settings
    from .train import evaluate_on, open_dataset, train_detector

    started = time.perf_counter()
    data_dir = os.path.join(output_dir, "digits_detection")
    summary = make_digits_detection(data_dir)
    params = summary["parameters"]
    print(f"[det 1/4] digits on {params['canvas_size']}x{params['canvas_size']} canvases in {data_dir} (COCO "
          f"layout): {params['train_images']} train / {params['val_images']} val images, boxes {summary['boxes']}")
    cfg = load_detection_config(config_path, ["--data_dir", data_dir, "--pretrained", backbone_ckpt,
                                              "--ckpt_save_dir", os.path.join(output_dir, "detection")]
                                + list(overrides))
    print(f"[det 2/4] training RetinaNet + FPN on {cfg.backbone} from {backbone_ckpt} ({config_path})")
    state = train_detector(cfg)
    detector = state["detector"]
    print("[det 3/4] COCO evaluation on the val canvases (pycocotools):")
    metrics = state["metrics"] or evaluate_on(detector, open_dataset(cfg, "val"), cfg)
    print(f"          box AP {metrics['AP']:.3f}, AP50 {metrics['AP50']:.3f}")
    drawn_dir = os.path.join(output_dir, "detections")
    val_images = sorted(os.listdir(summary["val_images"]))[:num_drawn]
    list_path = os.path.join(output_dir, "detection_inputs.txt")
    with open(list_path, "w", encoding="utf-8") as handle:
        handle.write("".join(os.path.join(summary["val_images"], name) + "\n" for name in val_images))
    val_set = open_dataset(cfg, "val")
    result = infer_images(detector, list_path, drawn_dir, val_set.class_names, inference_settings(cfg), cfg.img_scale,
                          cfg.pad_divisor, cfg.mean, cfg.std, draw_thr=0.3, category_ids=val_set.category_ids,
                          progress=False)
    print(f"[det 4/4] {len(result['written'])} val canvases with their detections drawn in {drawn_dir} "
          f"({result['json']}); detection demo took {time.perf_counter() - started:.0f} s")
    return metrics
