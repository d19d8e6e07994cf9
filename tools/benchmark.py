"""Benchmark pvt_dense (MindSpore, graph mode) against the torch implementations users would otherwise run, on this
CPU.

    python tools/benchmark.py                                   # pvt_tiny and pvt_small, every case
    python tools/benchmark.py --models pvt_tiny --cases fwd224_b8 train224_b8 --repeats 5 --output outputs/bench
    python tools/benchmark.py --models pvt_v2_b0 pvt_v2_b2_li --cases fwd224_b8 fwd512_b1 train224_b8
    python tools/benchmark.py --cases det_folder seg_folder --quick       # a rough look at two pipeline cases

Backbone and classifier cases, against HuggingFace transformers' PVT / PVT v2 (PvtModel, PvtV2Model):
fwd224_b1, fwd224_b8, fwd512_b1, fwd800x1344_b1 (dense backbone forward) and train224_b8 (classifier forward +
backward + AdamW); PVT v1 and v2 sizes (--models), with achieved GFLOP/s from a FLOP count of the spec.

Pipeline cases, for the first model of --models (a v1 size; RetinaNet-PVT-Tiny / Semantic FPN-PVT-Tiny by default),
against OpenMMLab on torch (mmcv's compiled NMS replaced by torchvision's, as mmcv-lite ships none):
- det_train: one RetinaNet training step (batch 2, padded 800x1216, synthetic boxes; loss, backward, AdamW) against
  mmdetection 3.3's RetinaNet with mmdet's PyramidVisionTransformer.
- det_folder: RetinaNet inference on a folder of 20 photos of varied sizes (portrait and landscape, JPEG and PNG)
  made from scikit-image's samples: read, resize to (1333, 800), pad, forward, decode, NMS (and, ours, drawing and
  the JSON), against mmdet's init_detector + inference_detector with the same checkpoint file.
- seg_folder: Semantic FPN inference on the same kind of folder (test scale (2048, 512)) against mmseg 1.2's
  init_model + inference_model with the same checkpoint file.
- export_folder: pvt_dense.features.export_features over 30 photos (short side 800, long side <= 1333) against
  the official dense backbone (HF's PVT adapted) over the same files.
The folder cases count everything from building the model and loading its weights to the last result, graph
compilations included; the report gives images/s over that total, the per-image times and where the time went.
Each starts with empty caches (a fresh PVT_DENSE_CACHE_DIR: the kernel library is built in the run, as in a user's
first run); det_folder_again, seg_folder_again and export_folder_again run the same again with the caches the first
run left (the torch side, which keeps none, simply runs again).

Every case runs in a fresh subprocess, so the peak memory is that case's own. Writes results.md / .csv / .json /
.png and profile_<model>_<case>.md to --output (default outputs/benchmark). Needs the [bench] extra (torch,
torchvision, transformers, mmdet, mmsegmentation, scikit-image): pip install -e .[bench]
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
