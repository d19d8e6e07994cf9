"""Run the pvt_dense demo on bundled sample images (what `make demo` runs)."""
import argparse
import sys

from pvt_dense.demo import run_demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="outputs/demo", help="folder for samples, checkpoint and features")
    parser.add_argument("--model", default="pvt_tiny", help="pvt_tiny|pvt_small|pvt_medium|pvt_large")
    args = parser.parse_args(argv)
    summary = run_demo(args.output, model_name=args.model)
    return 1 if summary.failed and not (summary.exported or summary.skipped_existing) else 0


if __name__ == "__main__":
    sys.exit(main())
