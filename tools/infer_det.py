"""Detect objects in images with a RetinaNet checkpoint: drawn images (boxes, class names, scores) and a JSON.

    python tools/infer_det.py --config configs/detection/retinanet_pvt_tiny_fpn_1x_coco.yaml \
        --ckpt_path runs/retinanet_pvt_tiny/retinanet_pvt_tiny_best.ckpt --input IMAGE_OR_DIR_OR_LIST --output DIR

Writes DIR/<image name> with the detections of score >= --draw_thr (0.3) drawn, and DIR/detections.json with every
detection above score_thr (boxes x1,y1,x2,y2 in the original image's pixels). Class names come from the checkpoint;
the JSON lists them once ("classes": label, name[, category_id]) and each detection gives its label. Exit status:
0 when anything was drawn (unreadable images are skipped and listed), 1 when every image failed, 2 with one
'error:' line for bad input, or when a drawn image could not be written (detections.json is written either way).
--ckpt_path may also be an official PVT RetinaNet release or an mmdetection 3.x checkpoint (.pth): names from its
meta, else COCO's.
"""
import sys

from pvt_dense.cli import ensure_output_dir, run_tool, tool_config


def main(argv=None):
    from pvt_dense.class_names import printable
    from pvt_dense.detection.infer import infer_images
    from pvt_dense.detection.build import load_detector_with_names
    from pvt_dense.detection.config import INFER_FIELDS, inference_settings, load_detection_config
    from pvt_dense.errors import PVTDenseError
    required = "--input (image, directory or .txt list) and --output (folder) are required"
    cfg = tool_config(argv, __doc__, load_detection_config, INFER_FIELDS, {"input": required, "output": required})
    if cfg is None:
        return 0
    ensure_output_dir(cfg.output)
    detector, class_names, category_ids = load_detector_with_names(cfg, cfg.ckpt_path)
    summary = infer_images(detector, cfg.input, cfg.output, class_names, inference_settings(cfg), cfg.img_scale,
                           cfg.size_divisor, cfg.mean, cfg.std, cfg.draw_thr, category_ids,
                           progress=cfg.progress_bar)
    print(f"{len(summary['written'])} images with detections drawn in {cfg.output}; all detections in "
          f"{summary['json']}; {summary['input_shapes']} distinct input shapes"
          + (f"; forward: {summary['forward_stats'].summary()}" if summary["forward_stats"] else ""))
    for name, reason in summary["failed"]:
        print(f"  skipped {printable(name)}: {reason}")
    if summary["unwritten"]:
        more = f" (and {len(summary['unwritten']) - 1} more)" if len(summary["unwritten"]) > 1 else ""
        reason = dict(summary["failed"])[summary["unwritten"][0]]
        raise PVTDenseError(f"the drawn image of {printable(summary['unwritten'][0])} could not be written{more}: "
                            f"{reason}")
    return 1 if summary["failed"] and not summary["written"] else 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
