"""Convert a PVT v1/v2 checkpoint (official PyTorch, HuggingFace, MindCV, pvt_dense; v2 also timm, mmdetection)
into a pvt_dense .ckpt.

    python tools/convert_weights.py pvt_tiny.pth pvt_tiny.ckpt [--model pvt_tiny] [--no-strict]

Whole RetinaNet / Semantic FPN checkpoints (official PVT releases, mmdetection 3.x / mmsegmentation 1.x) become a
native detector / segmentor checkpoint that eval/infer/export and --load_from read:

    python tools/convert_weights.py retinanet_pvt_t_fpn_1x_coco.pth retinanet_pvt_tiny.ckpt [--config CFG.yaml]

The other way, a backbone or classifier (any readable format, e.g. one trained here) into another library's names
(v1: official, huggingface, mindcv; v2 also timm, mmdetection), as .safetensors (no torch needed), .pth (torch)
or .ckpt (MindSpore, for MindCV):

    python tools/convert_weights.py runs/pvt_v2_b2/best.ckpt pvt_v2_b2_timm.safetensors --to timm
"""
import argparse
import sys

from pvt_dense.cli import run_tool


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to convert (.pth, .bin, .safetensors or .ckpt)")
    parser.add_argument("dst", help="checkpoint to write: native MindSpore .ckpt; with --to .safetensors, .pth "
                        "or .ckpt")
    parser.add_argument("--model", default=None,
                        help="pvt_tiny|..|pvt_large|pvt_v2_b0..b5|pvt_v2_b2_li (default: inferred)")
    parser.add_argument("--config", default=None,
                        help="whole models: the detection/segmentation config to build (default: the recipe with "
                             "the checkpoint's PVT size and class count)")
    parser.add_argument("--to", default=None, metavar="FORMAT",
                        help="write in this library's names instead of pvt_dense's: official, huggingface, mindcv, "
                             "timm (v2), mmdetection (v2 backbone)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="backbones: write the matching tensors even if some keys are missing or mismatched")
    args = parser.parse_args(argv)
    from pvt_dense.checkpoint.whole_model import is_whole_model_checkpoint
    from pvt_dense.conversion import convert_checkpoint, convert_whole_model, write_checkpoint_as
    if args.to is not None:
        report = write_checkpoint_as(args.src, args.dst, args.to, model_name=args.model, strict=args.strict)
    elif is_whole_model_checkpoint(args.src):
        report = convert_whole_model(args.src, args.dst, config=args.config)
    else:
        report = convert_checkpoint(args.src, args.dst, model_name=args.model, strict=args.strict)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
