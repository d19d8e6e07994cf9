"""The segmentation part of `make demo`: Semantic FPN fine-tuned from the demo's digits-pretrained PVT-Tiny on a
generated digits-on-canvas segmentation set, evaluated, with overlays of validation images.

    from pvt_dense.segmentation.demo import run_segmentation_demo
    run_segmentation_demo("outputs/demo/pretrain/pvt_tiny_best.ckpt", "outputs/demo")

Re-running resumes the training from its last checkpoint (or skips it when finished) and rewrites nothing else
that is already there.
"""
import os
import time

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                           "demo", "semfpn_pvt_tiny_digits.yaml")


# The data the demo config is fitted to: 1-3 digits of 48-88 px on 128x128 canvases, drawn at the size the config
# trains and tests at. The masks must follow thin strokes, and most wrong pixels lie within a pixel of a stroke's
# edge: drawn at 128 px rather than 64, strokes are twice as thick in pixels, and the same schedule's digit IoU rose
# from 80.9% (64 px canvases upsampled to 128) to 84.7% (measured; the config lists every variant tried).
DEMO_DATA = {"canvas_size": 128, "digit_size": (48, 88), "train_images": 240, "val_images": 40,
             "merge_digits": True}


def run_segmentation_demo(backbone_ckpt, output_dir="outputs/demo", config_path=DEMO_CONFIG, overrides=(),
                          overlay_count=8, data=None):
    """Returns {"config", "result" (evaluation of the best checkpoint), "overlays" (folder)}."""
    from ..atomic import write_atomic
    from ..data.digits_segmentation import make_digits_segmentation
    from .ade20k import list_samples
    from .evaluation import Predictor, evaluate_segmentor, format_results
    from .infer import infer_images
    from .build import load_trained_segmentor
    from .config import class_names_of, load_segmentation_config, predictor_options
    from .segmentor import SegmentorInference
    from .train import train_segmentor

    data_dir = os.path.join(output_dir, "digits_segmentation")
    summary = make_digits_segmentation(data_dir, **(data or DEMO_DATA))
    size = summary["parameters"]["canvas_size"]
    print(f"[seg 1/3] digits segmentation set in {data_dir}: {summary['train']} train / {summary['val']} val "
          f"{size}x{size} canvases, {summary['num_classes']} classes ({', '.join(summary['class_names'])})")
    cfg = load_segmentation_config(config_path, ["--data_dir", data_dir, "--pretrained", backbone_ckpt or "",
                                                 "--ckpt_save_dir", os.path.join(output_dir, "segmentation"),
                                                 *overrides])
    started = time.perf_counter()
    print(f"[seg 2/3] training Semantic FPN on {cfg.backbone} for {cfg.total_iters} iterations "
          f"(from {backbone_ckpt or 'random weights'})")
    state = train_segmentor(cfg)
    best = os.path.join(cfg.ckpt_save_dir, f"semfpn_{cfg.backbone}_best.ckpt")
    samples = list_samples(data_dir, cfg.val_split)
    result = state["metrics"]
    if result and state.get("best_metric") == result["mIoU"]:
        # The run's last evaluation made its best checkpoint: the weights in memory are those, already compiled
        # for the test scale (reloading and validating again cost ~8 s of the demo and gave the same table).
        inference, source = state["inference"], f"iteration {state['iteration']}'s validation"
    else:  # resumed after the training had finished, or an earlier evaluation was better
        inference = SegmentorInference(load_trained_segmentor(cfg, best), upsample=False)
        result = evaluate_segmentor(inference, samples, cfg.num_classes, cfg.reduce_zero_label,
                                    predictor_options(cfg))
        source = "validation"
    print(f"          {time.perf_counter() - started:.0f} s; {best} ({source}):")
    print("\n".join("          " + line for line in format_results(result, class_names_of(cfg)).splitlines()))

    overlay_dir = os.path.join(output_dir, "segmentation_overlays")
    # A list file beside the validation images names them by file name alone, so outputs are overlay/val_00000.jpg.
    listing = os.path.join(os.path.dirname(samples[0].image), "demo_overlay_inputs.txt")
    write_atomic(listing, "".join(os.path.basename(s.image) + "\n" for s in samples[:overlay_count]).encode())
    predicted = infer_images(Predictor(inference, **predictor_options(cfg)), listing, overlay_dir, cfg.num_classes,
                             progress=False)
    print(f"[seg 3/3] masks and overlays of {len(predicted['written']) + len(predicted['existing'])} validation "
          f"images in {overlay_dir}/{{masks,color,overlay}}")
    return {"config": cfg, "result": result, "overlays": overlay_dir}
