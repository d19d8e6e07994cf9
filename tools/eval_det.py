"""Evaluate a RetinaNet checkpoint on the COCO val set: pycocotools' 12 box metrics.

    python tools/eval_det.py --config configs/detection/retinanet_pvt_tiny_fpn_1x_coco.yaml \
        --data_dir /path/to/coco --ckpt_path runs/retinanet_pvt_tiny/retinanet_pvt_tiny_best.ckpt \
        [--results_json detections.json]

--results_json also writes the detections in COCO's results format. Any config key can be overridden as --key
value (--max_eval_images 500 for a quick look, --score_thr, --nms_iou, --mode 1 for PyNative).
--ckpt_path may also be an official PVT RetinaNet release or an mmdetection 3.x checkpoint (.pth).
"""
import sys

from pvt_dense.cli import run_tool, tool_config


def main(argv=None):
    from pvt_dense.detection.config import EVAL_FIELDS, load_detection_config
    from pvt_dense.detection.evaluation import evaluate_checkpoint
    cfg = tool_config(argv, __doc__, load_detection_config, EVAL_FIELDS)
    if cfg is None:
        return 0
    metrics = evaluate_checkpoint(cfg, cfg.ckpt_path, results_json=cfg.results_json or None)
    print(f"box AP {metrics['AP']:.4f} on {metrics['images']} images"
          + (f" ({metrics['unreadable']} unreadable, skipped)" if metrics["unreadable"] else "")
          + (f"; results written to {cfg.results_json}" if cfg.results_json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
