r"""Segment images with a Semantic FPN checkpoint: colour-coded masks and overlays.

    python tools/infer_seg.py --config configs/segmentation/semfpn_pvt_tiny_ade20k_40k.yaml \
        --ckpt_path runs/semfpn_pvt_tiny/semfpn_pvt_tiny_best.ckpt --input IMAGE_OR_DIR_OR_LIST --output DIR

Writes DIR/masks/<name>.png (class indices), DIR/color/<name>.png and DIR/overlay/<name>.jpg; --opacity 0.5 sets
the overlay blend, --overwrite True redoes images whose outputs exist. Other config keys work as in train_seg.py.
--ckpt_path may also be an official PVT Semantic FPN release or an mmsegmentation 1.x checkpoint (.pth); class
names then come from its meta (else ADE20K's). Exit status: 0 when every image was segmented, already done or
unreadable (skipped, and listed); 2 with an 'error:' line when outputs could not be written (e.g. DIR/masks is a
symlink out of DIR).
"""
import sys

from pvt_dense.cli import ensure_output_dir, run_tool, tool_config


def main(argv=None):
    from pvt_dense.class_names import printable
    from pvt_dense.errors import PVTDenseError
    from pvt_dense.segmentation.evaluation import Predictor
    from pvt_dense.segmentation.build import load_trained_segmentor_with_report
    from pvt_dense.segmentation.config import (INFER_FIELDS, checkpoint_class_names, load_segmentation_config,
                                               predictor_options)
    from pvt_dense.segmentation.infer import check_output_folders, infer_images
    from pvt_dense.segmentation.segmentor import SegmentorInference
    cfg = tool_config(argv, __doc__, load_segmentation_config, INFER_FIELDS,
                      {key: f"--{key} is required" for key in ("ckpt_path", "input", "output")},
                      defaults={"distribute": False})
    if cfg is None:
        return 0
    ensure_output_dir(cfg.output)
    check_output_folders(cfg.output)  # before minutes of loading: an output subfolder may lead elsewhere
    net, report = load_trained_segmentor_with_report(cfg, cfg.ckpt_path)
    predictor = Predictor(SegmentorInference(net, upsample=False), **predictor_options(cfg))
    summary = infer_images(predictor, cfg.input, cfg.output, cfg.num_classes, cfg.opacity,
                           cfg.overwrite, progress=cfg.progress_bar)
    names = checkpoint_class_names(cfg, report)
    seen = [f"{printable(names[c], 40)} {100 * n / max(summary['class_pixels'].sum(), 1):.1f}%"
            for c, n in sorted(enumerate(summary["class_pixels"]), key=lambda item: -item[1]) if n][:8]
    print(f"{len(summary['written'])} images segmented into {cfg.output} (masks/, color/, overlay/)"
          + (f", {len(summary['existing'])} already done" if summary["existing"] else "")
          + (f", {len(summary['unreadable'])} unreadable skipped" if summary["unreadable"] else "")
          + (f", {len(summary['failed'])} not written" if summary["failed"] else ""))
    if seen:
        print("most frequent classes: " + ", ".join(seen))
    if predictor.stats is not None:
        print(f"forward: {predictor.stats.summary()}")
    for name, reason in list(summary["unreadable"].items())[:10]:
        print(f"skipped {printable(name)}: {reason}", file=sys.stderr)
    if summary["failed"]:
        name, reason = next(iter(summary["failed"].items()))
        more = f" (and {len(summary['failed']) - 1} more)" if len(summary["failed"]) > 1 else ""
        raise PVTDenseError(f"the outputs of {printable(name)} could not be written{more}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
