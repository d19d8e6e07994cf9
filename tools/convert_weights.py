"""Convert a PVT v1/v2 checkpoint (official PyTorch, HuggingFace, MindCV, pvt_dense; v2 also timm, mmdetection)
into a pvt_dense .ckpt.

    python tools/convert_weights.py pvt_tiny.pth pvt_tiny.ckpt [--model pvt_tiny] [--no-strict]
"""
import argparse
import sys

from pvt_dense.checkpoint import convert_checkpoint
from pvt_dense.errors import PVTDenseError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to convert (.pth, .bin, .safetensors or .ckpt)")
    parser.add_argument("dst", help="native MindSpore checkpoint to write (.ckpt)")
    parser.add_argument("--model", default=None,
                        help="pvt_tiny|..|pvt_large|pvt_v2_b0..b5|pvt_v2_b2_li (default: inferred)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="write the matching tensors even if some keys are missing or mismatched")
    args = parser.parse_args(argv)
    try:
        report = convert_checkpoint(args.src, args.dst, model_name=args.model, strict=args.strict)
    except PVTDenseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
