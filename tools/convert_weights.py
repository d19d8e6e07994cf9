"""Convert a PVT checkpoint (official PyTorch, HuggingFace, MindCV, pvt_dense) into a pvt_dense .ckpt.

    python tools/convert_weights.py pvt_tiny.pth pvt_tiny.ckpt [--model pvt_tiny] [--no-strict]
"""
import argparse
import sys

from pvt_dense.cli import run_tool


def main(argv=None):
    from pvt_dense.checkpoint import convert_checkpoint
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to convert (.pth, .bin, .safetensors or .ckpt)")
    parser.add_argument("dst", help="native MindSpore checkpoint to write (.ckpt)")
    parser.add_argument("--model", default=None, help="pvt_tiny|pvt_small|pvt_medium|pvt_large (default: inferred)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="write the matching tensors even if some keys are missing or mismatched")
    args = parser.parse_args(argv)
    report = convert_checkpoint(args.src, args.dst, model_name=args.model, strict=args.strict)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
