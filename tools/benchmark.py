"""Benchmark pvt_dense's PVT (MindSpore, graph mode) against HuggingFace transformers' PVT (torch) on this CPU.

    python tools/benchmark.py                                   # pvt_tiny and pvt_small, every case
    python tools/benchmark.py --models pvt_tiny --cases fwd224_b8 train224_b8 --repeats 5 --output outputs/bench
    python tools/benchmark.py --quick                           # 3 repeats: a rough look

Cases: fwd224_b1, fwd224_b8, fwd512_b1, fwd800x1344_b1 (dense backbone forward) and train224_b8 (classifier
forward + backward + AdamW). Every case runs in a fresh subprocess, so the peak memory is that case's own. Writes
results.md / .csv / .json / .png and profile_<model>_<case>.md to --output (default outputs/benchmark).
Needs the [bench] extra (torch, transformers): pip install -e .[bench]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # devtools/, not installed
from pvt_dense.cli import run_tool  # noqa: E402


def build_parser():
    from devtools.benchmark import CASES, DEFAULT_MODELS, OURS, THEIRS
    from pvt_dense.models.factory import MODEL_SPECS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODEL_SPECS),
                        help="PVT v1 and v2 sizes; the pipeline cases (det_train, det_folder, seg_folder, "
                        "export_folder) run for the first one only, which must be v1")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--frameworks", nargs="+", default=[OURS, THEIRS], choices=[OURS, THEIRS])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first: the first compiles (MindSpore) "
                        "and torch needs 2-3 calls to reach its steady speed")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop repeating a case after this many timed seconds (at least 3 calls)")
    parser.add_argument("--threads", type=int, default=None, help="threads for both frameworks (default: all "
                        "CPUs this process may use)")
    parser.add_argument("--profile", nargs="*", default=["fwd224_b8"],
                        choices=[name for name, case in CASES.items() if case.kind == "forward"], metavar="CASE",
                        help="forward cases to profile per operator (default fwd224_b8; none: --profile)")
    parser.add_argument("--output", default="outputs/benchmark")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 20 s per case at most")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def main(argv=None):
    from devtools.benchmark import markdown_table, run_benchmark
    args = build_parser().parse_args(argv)
    if args.quick:
        args.repeats, args.max_seconds = min(args.repeats, 3), min(args.max_seconds, 20.0)
    rows = run_benchmark(models=args.models, cases=args.cases, output=args.output, repeats=args.repeats,
                         warmup=args.warmup, threads=args.threads, frameworks=args.frameworks,
                         profile_cases=args.profile, max_seconds=args.max_seconds, progress=args.progress)
    print(markdown_table(rows))
    print(f"reports written to {args.output}/")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
