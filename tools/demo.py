"""Run the pvt_dense demo (what `make demo` runs): digits pretraining, feature export of sample photographs,
then RetinaNet detection and Semantic FPN segmentation on digits pasted onto canvases.

    python tools/demo.py --output outputs/demo
    python tools/demo.py --tasks detection          # pretraining + features + detection only
    python tools/demo.py --tasks none               # pretraining + features only
"""
import argparse
import sys

from pvt_dense.cli import run_tool


def main(argv=None):
    from pvt_dense.demo import DENSE_TASKS, run_demo
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/demo", help="folder for datasets, checkpoints and outputs")
    parser.add_argument("--tasks", nargs="+", default=list(DENSE_TASKS), choices=list(DENSE_TASKS) + ["none"],
                        help="dense-prediction parts to run after pretraining (default: all)")
    args = parser.parse_args(argv)
    results = run_demo(args.output, tasks=[t for t in args.tasks if t != "none"])
    summary = results["features"]
    return 1 if summary.failed and not (summary.exported or summary.skipped_existing) else 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
