"""Export PVT stage maps of images to one .npz per image (see pvt_dense.features.export_features for the format).

    python tools/export_features.py --backbone pvt_large --ckpt pvt_large.ckpt --input photos/ --output feats/
        [--short-side 800 --max-long-side 1333 --batch-size 1 --out-indices 0 1 2 3]

--input is an image, a directory (searched recursively) or a .txt list of image paths. Re-running skips images
whose .npz exists. Exit status: 0 when anything was exported or already there, 1 when every image failed,
2 for usage errors.
"""
import argparse
import sys

import mindspore as ms

from pvt_dense import list_models
from pvt_dense.cli import ensure_output_dir, run_tool
from pvt_dense.features import export_features


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, choices=list_models())
    parser.add_argument("--ckpt", default=None,
                        help="checkpoint (.pth, .bin, .safetensors or .ckpt); without it the weights are random")
    parser.add_argument("--input", required=True, help="image file, directory or .txt list of image paths")
    parser.add_argument("--output", required=True, help="directory for the .npz files")
    parser.add_argument("--short-side", type=positive_int, default=800)
    parser.add_argument("--max-long-side", type=positive_int, default=1333)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--out-indices", type=int, nargs="+", default=[0, 1, 2, 3], choices=range(4),
                        metavar="{0,1,2,3}", help="stages to export (default: all four)")
    parser.add_argument("--max-pixels", type=positive_int, default=None,
                        help="refuse images above this many pixels (default: $PVT_DENSE_MAX_PIXELS or 100e6)")
    parser.add_argument("--device", default="CPU", choices=("CPU", "GPU", "Ascend"), help="MindSpore device target")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    ensure_output_dir(args.output)
    ms.set_device(args.device)
    # Graph mode runs far faster than PyNative once compiled; export_features compiles only the input sizes where
    # that pays and runs the others eagerly (pvt_dense.engine.shapes).
    ms.set_context(mode=ms.GRAPH_MODE)
    if not args.ckpt:
        print("warning: no --ckpt given: the features come from randomly initialised weights", file=sys.stderr)
    summary = export_features(args.backbone, args.input, args.output, ckpt=args.ckpt,
                              short_side=args.short_side, max_long_side=args.max_long_side,
                              batch_size=args.batch_size, out_indices=args.out_indices,
                              progress=args.progress, max_pixels=args.max_pixels)
    print(summary)
    return 0 if summary.exported or summary.skipped_existing else 1


if __name__ == "__main__":
    # run_tool: user errors print one `error:` line (exit 2); Ctrl-C exits 130 with a resume hint (finished files
    # are complete, written atomically, so the same command picks up where this one stopped).
    sys.exit(run_tool(main))
