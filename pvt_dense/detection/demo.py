"""The detection part of `make demo`: RetinaNet on the demo's pretrained PVT-Tiny, on digits pasted onto canvases.

1. write the digits detection set (COCO layout) under `output_dir/digits_detection`;
2. train RetinaNet + FPN from the pretrained backbone (configs/demo/retinanet_pvt_tiny_digits.yaml, resumable);
3. evaluate on the val canvases with pycocotools (the 12 numbers);
4. draw the detections of a few val canvases into `output_dir/detections`.
"""
import os

DEMO_DET_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "configs", "demo", "retinanet_pvt_tiny_digits.yaml")


# The data the demo config is fitted to (its anchors): 3-4 digits of 24-32 px per 64x64 canvas (the pretraining's
# image size), 640 training canvases (~1,390 digits, 2.2 a canvas). Telling the digits apart on a canvas is what the
# detector has to learn (see the config), and an iteration costs the same however many digits a canvas holds, so the
# canvases are packed: 1-3 digits of 24-40 px left 1.24 a canvas, and AP 0.36 after the same schedule.
DEMO_DATA = {"train_images": 640, "val_images": 64, "canvas_size": 64, "digit_sizes": (24, 32), "min_digits": 3,
             "max_digits": 4}
DRAW_THRESHOLD = 0.5  # the detections a person would keep
DRAW_SCALE = 6        # 64x64 canvases drawn at 384x384 so the labels are readable


def write_image_list(list_path, image_dir, names):
    """The list file of the images to draw: absolute paths, which `pvt_dense.output_names` turns into their file
    names, so the drawn canvases land flat in the output folder (`detections/000000.png`)."""
    from ..atomic import write_atomic
    folder = os.path.abspath(image_dir)
    write_atomic(list_path, "".join(os.path.join(folder, name) + "\n" for name in names).encode())


def run_detection_demo(backbone_ckpt, output_dir="outputs/demo", config_path=DEMO_DET_CONFIG, overrides=(),
                       num_drawn=6, data=None):
    """Run steps 1-4; returns the val metrics (dict of the 12 COCO numbers)."""
    import time

    from ..data.digits_detection import make_digits_detection
    from .infer import infer_images
    from .config import inference_settings, load_detection_config
    from .data import open_dataset
    from .evaluation import evaluate_on
    from .train import train_detector

    started = time.perf_counter()
    data_dir = os.path.join(output_dir, "digits_detection")
    summary = make_digits_detection(data_dir, **(data or DEMO_DATA))
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
    write_image_list(list_path, summary["val_images"], val_images)
    val_set = open_dataset(cfg, "val")
    result = infer_images(detector, list_path, drawn_dir, val_set.class_names, inference_settings(cfg), cfg.img_scale,
                          cfg.size_divisor, cfg.mean, cfg.std, draw_thr=DRAW_THRESHOLD,
                          category_ids=val_set.category_ids, progress=False, draw_scale=DRAW_SCALE)
    print(f"[det 4/4] {len(result['written'])} val canvases with their detections of score >= {DRAW_THRESHOLD} "
          f"(after class-wise NMS) drawn in {drawn_dir} "
          f"({result['json']}); detection demo took {time.perf_counter() - started:.0f} s")
    return metrics
