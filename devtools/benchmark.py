"""Side-by-side CPU benchmark of pvt_dense's PVT (MindSpore, graph mode) and HuggingFace transformers' PVT (torch).

One run measures, for each model and case, on the same machine and with the same thread count:
- forward images/s of the dense backbone (four stage maps) at 224x224 (batch 1 and 8), 512x512 and 800x1344;
- a training step (forward + backward + AdamW) of the ImageNet classifier at 224x224, batch 8;
- peak resident memory (every case runs in a fresh subprocess, so the peak is that case's alone);
- achieved GFLOP/s from a FLOP count of the model spec (`forward_flops`: convolutions, linear layers and the two
  attention products; element-wise work is not counted, as in `torch.utils.flop_counter`);
- ours/theirs ratios of throughput and memory;
and a per-operator profile of one forward of each model (MindSpore's Profiler on the CPU; torch.profiler for HF).

The HF side is made to compute what the official dense backbone computes (no cls token, every position
embedding bilinearly resized from the 224 grid, as in tests/test_parity_hf.py), because HF's own resize only works
at 224. torch and transformers are the `[bench]` extra: they are imported only inside the torch worker
subprocess, never by `import pvt_dense`.

Outputs in the output folder: results.md (the table), results.csv, results.json (numbers plus machine, versions,
thread counts and load average), results.png (bar chart), profile_<model>_<case>.md; each written atomically after
every finished case, so an interrupted run keeps what it measured.
"""
import dataclasses
import os
import shutil
import tempfile

from pvt_dense.atomic import write_atomic
from pvt_dense.models.factory import MODEL_SPECS
from pvt_dense.models.pvt_v2 import PVTv2Spec

from .bench_cases import (CASES, DEFAULT_MODELS, FRAMEWORK_LABELS, OURS, THEIRS, BenchCase, BenchmarkError,
                          case_flops, forward_flops, resolve_cases)
from .bench_reports import (load_average, machine_info, markdown_table, profile_markdown, ratios, result_row,
                            write_reports)
from .bench_workers import run_worker
from .timing import current_rss_mb, peak_rss_mb, summarize_times, time_calls


def prepare_pipeline_inputs(workdir, model, cases, threads, frameworks):
    """The photo folders and reference checkpoints the pipeline cases read, made once per run in `workdir`:
    {"folders": {count: path}, "checkpoints": {"det"/"seg": path}}."""
    from .pipeline_bench import write_photo_folder
    folders = {}
    for case in cases:
        if case.is_folder and case.images not in folders:
            folders[case.images] = os.path.join(workdir, f"photos_{case.images}")
            write_photo_folder(folders[case.images], case.images)
    which = [kind for kind, case_kind in (("det", "det_folder"), ("seg", "seg_folder"))
             if any(c.kind == case_kind for c in cases)]
    checkpoints = {}
    if which:
        raw = run_worker({"job": "prepare", "framework": THEIRS, "model": model, "folder": workdir,
                          "which": which, "threads": threads})
        if "error" in raw:
            raise BenchmarkError(f"could not write the reference checkpoints: {raw['error']}")
        checkpoints = raw["checkpoints"]
    return {"folders": folders, "checkpoints": checkpoints}


def prepare_caches(task, case, workdir):
    """Point a folder case's worker at its caches (`PVT_DENSE_CACHE_DIR`): for a first run an empty folder, for a
    second run the one the first run of the same pipeline filled (made now, untimed, if that did not run)."""
    task["cache_dir"] = os.path.join(workdir, f"caches_{case.kind}_{task['framework']}")
    if case.run == 1:
        shutil.rmtree(task["cache_dir"], ignore_errors=True)
    elif not os.path.isdir(task["cache_dir"]):
        first = dataclasses.replace(case, run=1)
        run_worker(dict(task, case_spec=dataclasses.asdict(first), scratch=tempfile.mkdtemp(dir=workdir)))


def run_benchmark(models=DEFAULT_MODELS, cases=tuple(CASES), output="outputs/benchmark", repeats=10, warmup=3,
                  threads=None, frameworks=(OURS, THEIRS), profile_cases=("fwd224_b8",), max_seconds=60.0,
                  progress=True):
    """Measure every (model, case, framework) in a fresh subprocess and write the reports; returns the rows.

    The pipeline cases (RetinaNet, Semantic FPN, feature export) run for the first model of `models` only, which
    must be a PVT v1 size (mmdetection's PVT is v1's)."""
    unknown = [m for m in models if m not in MODEL_SPECS]
    if unknown:
        raise BenchmarkError(f"unknown model(s) {unknown}; valid: {', '.join(MODEL_SPECS)}")
    cases = resolve_cases(cases)
    profile_cases = resolve_cases(profile_cases)
    bad_profiles = [c.name for c in profile_cases if c.kind != "forward"]
    if bad_profiles:
        raise BenchmarkError(f"only forward cases can be profiled, got {bad_profiles}")
    bad_frameworks = [f for f in frameworks if f not in (OURS, THEIRS)]
    if bad_frameworks:
        raise BenchmarkError(f"unknown framework(s) {bad_frameworks}; valid: {OURS}, {THEIRS}")
    if repeats < 1 or warmup < 1:
        raise BenchmarkError(f"repeats and warmup must be >= 1, got {repeats} and {warmup}")
    pipeline_cases = [c for c in cases if c.is_pipeline]
    if pipeline_cases and isinstance(MODEL_SPECS[models[0]], PVTv2Spec):
        raise BenchmarkError(f"the pipeline cases ({', '.join(c.name for c in pipeline_cases)}) compare with "
                             f"mmdetection's PVT v1: put a v1 model (pvt_tiny ...) first in models, not "
                             f"{models[0]}")
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = machine_info(threads)
    info["load_start"] = load_average()
    info["repeats"], info["warmup"], info["max_seconds_per_case"] = repeats, warmup, max_seconds
    jobs = [(m, c, f, "time") for m in models for c in cases for f in frameworks
            if not c.is_pipeline or m == models[0]]
    jobs += [(m, c, f, "profile") for m in models for c in profile_cases for f in frameworks]
    rows, profiles = [], {}
    workdir = tempfile.mkdtemp(prefix="pvt_dense_bench_") if pipeline_cases else None
    bar = None
    try:
        inputs = prepare_pipeline_inputs(workdir, models[0], pipeline_cases, threads, frameworks) if workdir \
            else None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(jobs), desc="benchmark", unit="case")
        for model, case, framework, job in jobs:
            if bar is not None:
                bar.set_postfix_str(f"{model} {case.name} {framework} {job}")
            task = {"model": model, "case": case.name, "case_spec": dataclasses.asdict(case), "framework": framework,
                    "job": job, "threads": threads, "repeats": repeats, "warmup": warmup, "max_seconds": max_seconds}
            if case.is_pipeline:
                scratch = tempfile.mkdtemp(prefix=f"{case.name}_{framework}_", dir=workdir)
                task.update(folder=inputs["folders"].get(case.images), checkpoints=inputs["checkpoints"],
                            scratch=scratch)
            if case.is_folder:
                prepare_caches(task, case, workdir)
            raw = run_worker(task)
            if job == "time":
                rows.append(result_row(model, case, framework, raw))
            else:
                profiles.setdefault(f"{model}_{case.name}", {})[framework] = raw
                os.makedirs(output, exist_ok=True)
                write_atomic(os.path.join(output, f"profile_{model}_{case.name}.md"),
                             profile_markdown(model, case, profiles[f"{model}_{case.name}"]).encode())
            info["load_end"] = load_average()
            write_reports(output, info, rows, profiles)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


# The benchmark's face for tools/benchmark.py and the tests: the pieces live in bench_cases, bench_workers,
# bench_reports and timing.
__all__ = ["CASES", "DEFAULT_MODELS", "FRAMEWORK_LABELS", "OURS", "THEIRS", "BenchCase", "BenchmarkError",
           "case_flops", "current_rss_mb", "forward_flops", "machine_info", "markdown_table", "peak_rss_mb",
           "ratios", "result_row", "run_benchmark", "summarize_times", "time_calls", "write_reports"]
