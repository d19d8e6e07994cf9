"""Run the pvt_dense demo on bundled sample images (what `make demo` runs)."""
import argparse
import sys

from pvt_dense.demo import run_demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="outputs/demo", help="folder for samples, checkpoint and features")
    args = parser.parse_args(argv)
    summary = run_demo(args.output)
    return 1 if summary.failed and not (summary.exported or summary.skipped_existing) else 0


if __name__ == "__main__":
    sys.exit(main())
