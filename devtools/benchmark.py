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
import csv
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from pvt_dense.atomic import write_atomic
from pvt_dense.errors import PVTDenseError

from pvt_dense.models.factory import MODEL_SPECS
from pvt_dense.models.layers_v2 import LINEAR_POOL_SIZE
from pvt_dense.models.pvt_v2 import PVTv2Spec

from .hf_reference import NUM_CLASSES, hf_classifier, official_dense_hf_backbone
from .timing import current_rss_mb, peak_rss_mb, set_mindspore_threads, time_calls

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULT_MARK = "PVT_BENCH_RESULT "
OURS, THEIRS = "mindspore", "torch_hf"
FRAMEWORK_LABELS = {OURS: "pvt_dense (MindSpore)",
                    THEIRS: "torch (HF transformers; mmdet / mmseg in the pipeline cases)"}


class BenchmarkError(PVTDenseError):
    """A benchmark argument is invalid or a benchmark worker failed."""


@dataclass(frozen=True)
class BenchCase:
    """One measured workload at a fixed size.

    kind: "forward" (dense backbone, eval), "train" (classifier, forward + backward + AdamW), or one of the whole
    pipelines of `devtools.pipeline_bench`: "det_train" (RetinaNet training step on a synthetic batch padded to
    height x width), "det_folder" / "seg_folder" / "export_folder" (a folder of `images` photos, each resized with
    height x width as (short side, long side limit), from model loading to the last result).
    """

    name: str
    kind: str
    batch: int
    height: int
    width: int
    images: int = 0  # folder cases: photos in the folder

    @property
    def is_pipeline(self):
        return self.kind in PIPELINE_KINDS

    @property
    def is_folder(self):
        return self.kind in FOLDER_KINDS

    @property
    def label(self):
        if self.kind == "train":
            return f"train step {self.height}x{self.width} b{self.batch}"
        if self.kind == "det_train":
            return f"RetinaNet train step {self.height}x{self.width} b{self.batch}"
        if self.is_folder:
            what = FOLDER_KINDS[self.kind]
            return f"{what}, {self.images} photos at {self.height}/{self.width} (whole process)"
        return f"forward {self.height}x{self.width} b{self.batch}"


FOLDER_KINDS = {"det_folder": "RetinaNet folder inference", "seg_folder": "Semantic FPN folder inference",
                "export_folder": "feature export of a folder"}
PIPELINE_KINDS = ("det_train",) + tuple(FOLDER_KINDS)

CASES = {case.name: case for case in (
    BenchCase("fwd224_b1", "forward", 1, 224, 224),
    BenchCase("fwd224_b8", "forward", 8, 224, 224),
    BenchCase("fwd512_b1", "forward", 1, 512, 512),
    BenchCase("fwd800x1344_b1", "forward", 1, 800, 1344),
    BenchCase("train224_b8", "train", 8, 224, 224),
    # The 1x recipe's training batch: 2 images padded to 800 x 1216 (the second one narrower inside it).
    BenchCase("det_train", "det_train", 2, 800, 1216),
    # The same batch at half the side: what fits our im2col head's memory on a 24 GB machine (see docs/speed.md).
    BenchCase("det_train_half", "det_train", 2, 400, 608),
    # The test scales of the recipes: RetinaNet (1333, 800), Semantic FPN (2048, 512), feature export 800 / 1333.
    BenchCase("det_folder", "det_folder", 1, 800, 1333, images=32),
    BenchCase("seg_folder", "seg_folder", 1, 512, 2048, images=32),
    BenchCase("export_folder", "export_folder", 1, 800, 1333, images=30),
)}
DEFAULT_MODELS = ("pvt_tiny", "pvt_small")


# ---------------------------------------------------------------------------------------------------------------
# FLOP count from the model spec

def forward_flops(spec, batch, height, width, classifier=False, num_classes=NUM_CLASSES):
    """Floating-point operations (2 per multiply-add) of one forward pass of PVT (v1) or PVT v2.

    Counts the patch-embedding and spatial-reduction convolutions, the q/kv/proj/fc1/fc2 linear layers, the two
    attention products (q k^T and attn v) and, for the classifier, the head; for v2 also the MLP's depth-wise 3x3
    conv and, for the linear "-li" sizes, the 1x1 reduction conv on the 7x7 pooled grid (keys and values then come
    from 49 tokens at any input size). Biases, norms, pooling, softmax, GELU and additions are not counted (the
    convention of `torch.utils.flop_counter` and of published FLOP figures). `classifier=True` counts v1's extra
    cls token in the last stage (v2 has none; it mean-pools).
    """
    if isinstance(spec, PVTv2Spec):
        return _v2_forward_flops(spec, batch, height, width, classifier, num_classes)
    macs = 0
    grid_h, grid_w, in_channels = height, width, 3
    last = len(spec.depths) - 1
    for stage, depth in enumerate(spec.depths):
        patch, dim = spec.patch_sizes[stage], spec.embed_dims[stage]
        grid_h, grid_w = grid_h // patch, grid_w // patch
        macs += grid_h * grid_w * dim * in_channels * patch * patch
        tokens = grid_h * grid_w + (1 if classifier and stage == last else 0)
        ratio = spec.sr_ratios[stage]
        kv_tokens = (grid_h // ratio) * (grid_w // ratio) if ratio > 1 else tokens
        hidden = int(dim * spec.mlp_ratios[stage])
        per_block = ((kv_tokens * dim * dim * ratio * ratio if ratio > 1 else 0)  # spatial-reduction conv
                     + tokens * dim * dim         # q
                     + kv_tokens * dim * 2 * dim  # kv
                     + 2 * tokens * kv_tokens * dim  # q k^T and attn v over all heads
                     + tokens * dim * dim         # proj
                     + 2 * tokens * dim * hidden)  # fc1, fc2
        macs += depth * per_block
        in_channels = dim
    if classifier:
        macs += spec.embed_dims[-1] * num_classes
    return 2 * macs * batch


def _v2_forward_flops(spec, batch, height, width, classifier, num_classes):
    macs, in_channels = 0, 3
    for stage, ((grid_h, grid_w), depth) in enumerate(zip(spec.stage_grids(height, width), spec.depths)):
        kernel, dim = spec.patch_sizes[stage], spec.embed_dims[stage]
        tokens = grid_h * grid_w
        macs += tokens * dim * in_channels * kernel * kernel  # overlapping patch embedding
        ratio = spec.sr_ratios[stage]
        if spec.linear:
            kv_tokens = LINEAR_POOL_SIZE * LINEAR_POOL_SIZE
            reduction = kv_tokens * dim * dim  # 1x1 conv on the pooled grid
        elif ratio > 1:
            kv_tokens = (grid_h // ratio) * (grid_w // ratio)
            reduction = kv_tokens * dim * dim * ratio * ratio
        else:
            kv_tokens, reduction = tokens, 0
        hidden = int(dim * spec.mlp_ratios[stage])
        per_block = (reduction
                     + tokens * dim * dim  # q
                     + kv_tokens * dim * 2 * dim  # kv
                     + 2 * tokens * kv_tokens * dim  # q k^T and attn v
                     + tokens * dim * dim  # proj
                     + 2 * tokens * dim * hidden  # fc1, fc2
                     + tokens * hidden * 9)  # depth-wise 3x3 conv
        macs += depth * per_block
        in_channels = dim
    if classifier:
        macs += spec.embed_dims[-1] * num_classes
    return 2 * macs * batch


def case_flops(spec, case):
    """FLOPs of one call of `case`; a training step counts as 3 forwards (backward = input and weight gradients)."""
    if case.kind == "train":
        return 3 * forward_flops(spec, case.batch, case.height, case.width, classifier=True)
    return forward_flops(spec, case.batch, case.height, case.width)


# ---------------------------------------------------------------------------------------------------------------
# Timing statistics

def summarize_times(seconds):
    """Median, min, max, interquartile range and relative spread ((p75 - p25) / median) of per-call times."""
    if not seconds:
        raise BenchmarkError("no timings to summarize")
    values = sorted(float(s) for s in seconds)
    median = statistics.median(values)
    p25, p75 = (float(v) for v in np.percentile(values, [25, 75]))
    return {"median_s": median, "min_s": values[0], "max_s": values[-1], "p25_s": p25, "p75_s": p75,
            "spread": (p75 - p25) / median if median > 0 else 0.0, "repeats": len(values)}


# ---------------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process

def task_case(task):
    """The `BenchCase` a worker task carries (sent whole, so a test can run a case at a tiny size)."""
    return BenchCase(**task["case_spec"])


def _mindspore_worker(task):
    import mindspore as ms
    from mindspore import nn

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    set_mindspore_threads(task["threads"])
    from pvt_dense.models import create_backbone, create_model
    from pvt_dense.models.fast_ops import fast_ops_status
    case = task_case(task)
    rss_after_import = current_rss_mb()
    rng = np.random.default_rng(0)
    pixels = ms.Tensor(rng.standard_normal((case.batch, 3, case.height, case.width)).astype(np.float32))
    if case.kind == "forward":
        net = create_backbone(task["model"])
        net.set_train(False)

        def call():
            outs = net(pixels)
            outs[-1].asnumpy()  # waits for the whole graph
    else:
        from pvt_dense.engine.optim import AdamW
        from pvt_dense.engine.train_step import TrainStep
        net = create_model(task["model"], num_classes=NUM_CLASSES)
        labels = ms.Tensor(rng.integers(0, NUM_CLASSES, case.batch).astype(np.int32))
        optimizer = AdamW(net.trainable_params(), learning_rate=1e-4, weight_decay=0.05)
        step = TrainStep(nn.WithLossCell(net, nn.CrossEntropyLoss()), optimizer, loss_scale=1.0)
        step.set_train(True)

        def call():
            step(pixels, labels)[0].asnumpy()
    first, times = time_calls(call, task["warmup"], task["repeats"], task.get("max_seconds"))
    fast, reason = fast_ops_status()
    return {"first_call_s": first, "times_s": times, "rss_after_import_mb": rss_after_import,
            "fast_ops": fast, "fast_ops_note": reason or ""}


def _torch_worker(task):
    import torch

    torch.set_num_threads(task["threads"])
    torch.manual_seed(0)
    case = task_case(task)
    spec = MODEL_SPECS[task["model"]]
    rss_after_import = current_rss_mb()
    pixels = torch.randn(case.batch, 3, case.height, case.width)
    if case.kind == "forward":
        model = official_dense_hf_backbone(spec)

        def call():
            with torch.inference_mode():
                model(pixel_values=pixels)
    else:
        model = hf_classifier(spec)
        labels = torch.randint(0, NUM_CLASSES, (case.batch,))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

        def call():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
            loss.backward()
            optimizer.step()
    first, times = time_calls(call, task["warmup"], task["repeats"], task.get("max_seconds"))
    return {"first_call_s": first, "times_s": times, "rss_after_import_mb": rss_after_import,
            "torch_threads": torch.get_num_threads()}


def _mindspore_profile_worker(task):
    """Per-operator-type times of one forward under MindSpore's Profiler (CPU), after a warm-up call."""
    import glob
    import tempfile

    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    set_mindspore_threads(task["threads"])
    from pvt_dense.models import create_backbone
    case = task_case(task)
    net = create_backbone(task["model"])
    net.set_train(False)
    pixels = ms.Tensor(np.random.default_rng(0).standard_normal(
        (case.batch, 3, case.height, case.width)).astype(np.float32))
    for _ in range(2):  # compile, then one steady call
        net(pixels)[-1].asnumpy()
    folder = tempfile.mkdtemp(prefix="pvt_dense_profile_")
    profiler = ms.Profiler(output_path=folder)
    start = time.perf_counter()
    net(pixels)[-1].asnumpy()
    wall = time.perf_counter() - start
    profiler.stop()
    profiler.analyse()
    type_files = glob.glob(os.path.join(folder, "**", "cpu_op_type_info_*.csv"), recursive=True)
    detail_files = glob.glob(os.path.join(folder, "**", "cpu_op_detail_info_*.csv"), recursive=True)
    if not type_files:
        raise BenchmarkError(f"MindSpore's Profiler wrote no cpu_op_type_info csv under {folder}")
    by_type = {}
    with open(type_files[0], encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            by_type[row["op_type"]] = {"ms": float(row["total_compute_time"]),
                                       "calls": int(row["type_occurrences"])}
    by_name = {}
    if detail_files:
        with open(detail_files[0], encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                # Group per layer kind (e.g. "mlp-Mlp/fc1-Dense/MatMul"), across stages and blocks.
                parts = row["full_op_name"].split("/")
                key = "/".join(p for p in parts[-3:-1] + [row["op_type"]]
                               if not p.split("-")[0].isdigit() and p != "blocks-CellList")
                entry = by_name.setdefault(key, {"ms": 0.0, "calls": 0})
                entry["ms"] += float(row["op_total_time(ms)"])
                entry["calls"] += int(row["op_occurrences"])
    return {"wall_s": wall, "by_type": by_type, "by_layer": by_name, "profiler_output": folder}


def _torch_profile_worker(task):
    import torch

    torch.set_num_threads(task["threads"])
    case = task_case(task)
    model = official_dense_hf_backbone(MODEL_SPECS[task["model"]])
    pixels = torch.randn(case.batch, 3, case.height, case.width)
    with torch.inference_mode():
        for _ in range(3):  # torch reaches its steady speed after 2-3 calls
            model(pixel_values=pixels)
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(pixel_values=pixels)
        wall = time.perf_counter() - start
    by_type = {}
    for event in prof.key_averages():
        # self time, so nested ops (linear -> addmm) are not counted twice
        if event.self_cpu_time_total > 0:
            by_type[event.key] = {"ms": event.self_cpu_time_total / 1000.0, "calls": event.count}
    return {"wall_s": wall, "by_type": by_type}


WORKERS = {
    (OURS, "time"): _mindspore_worker,
    (THEIRS, "time"): _torch_worker,
    (OURS, "profile"): _mindspore_profile_worker,
    (THEIRS, "profile"): _torch_profile_worker,
}


def worker_main(task_json):
    """Entry of a worker subprocess: run one task, print one result line with the peak RSS."""
    task = json.loads(task_json)
    if task["job"] == "prepare":
        from .pipeline_bench import write_reference_checkpoints
        result = {"checkpoints": write_reference_checkpoints(MODEL_SPECS[task["model"]], task["folder"],
                                                             task["which"])}
    elif task["job"] == "time" and task_case(task).is_pipeline:
        from .pipeline_bench import PIPELINE_WORKERS
        case = task_case(task)
        result = PIPELINE_WORKERS[(task["framework"], case.kind)](task, task["case_spec"])
    else:
        result = WORKERS[(task["framework"], task["job"])](task)
    result["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def run_worker(task, timeout=3600):
    """Run one task in a fresh Python process (so its peak RSS is its own) and return its result dict."""
    env = dict(os.environ)
    threads = str(task["threads"])
    env.update({"GLOG_v": env.get("GLOG_v", "3"), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "PVT_DENSE_NUM_THREADS": threads})
    # the worker imports this module, which lives outside the installed package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (REPOSITORY_ROOT, env.get("PYTHONPATH"))))
    command = [sys.executable, "-c", "import sys; from devtools.benchmark import worker_main; "
               "sys.exit(worker_main(sys.argv[1]))", json.dumps(task)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    process_s = time.perf_counter() - start
    for line in done.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_MARK):
            # the whole process: interpreter start and imports too, as a user's command line pays them
            return dict(json.loads(line[len(RESULT_MARK):]), process_s=process_s)
    tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
    return {"error": f"worker exited with {done.returncode}: " + " | ".join(tail)}


# ---------------------------------------------------------------------------------------------------------------
# Machine description

def machine_info(threads):
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "threads": threads}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cpus"] = os.cpu_count()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="ascii") as handle:
            info["memory_gb"] = round(int(handle.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    from importlib import metadata
    versions = {}
    for package in ("mindspore", "numpy", "torch", "transformers", "mindcv", "pvt_dense"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info["versions"] = versions
    return info


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Running and reporting

def result_row(model, case, framework, raw):
    """One table row: throughput, spread, memory and GFLOP/s of one framework on one case.

    A folder case's throughput is its images over the whole worker process's wall time (interpreter start,
    imports, model loading and compilations included: what a user's command line costs);
    its median, min, max and spread are those of the seconds per image (which vary with each image's size and with
    whether its shape was compiled, run eagerly or found compiled). Pipeline cases have no FLOP count."""
    row = {"model": model, "case": case.name, "label": case.label, "framework": framework,
           "batch": case.batch, "height": case.height, "width": case.width,
           "gflops_per_call": None if case.is_pipeline else case_flops(MODEL_SPECS[model], case) / 1e9}
    if "error" in raw:
        row["error"] = raw["error"]
        return row
    stats = summarize_times(raw["times_s"])
    row.update(stats)
    if case.is_folder:
        row["images_per_s"] = raw["images"] / raw.get("process_s", raw["total_s"])
    else:
        row["images_per_s"] = case.batch / stats["median_s"]
    if row["gflops_per_call"] is not None:
        row["achieved_gflops"] = row["gflops_per_call"] / stats["median_s"]
    for key in ("first_call_s", "peak_rss_mb", "rss_after_import_mb", "fast_ops", "fast_ops_note",
                "torch_threads", "total_s", "process_s", "images", "parts_s", "note"):
        if key in raw:
            row[key] = raw[key]
    row["times_s"] = raw["times_s"]
    return row


def ratios(rows):
    """{(model, case): {"speed": ours/theirs images/s, "memory": ours/theirs peak RSS}} where both were measured."""
    by_key = {(r["model"], r["case"], r["framework"]): r for r in rows if "error" not in r}
    out = {}
    for (model, case, framework), ours in by_key.items():
        theirs = by_key.get((model, case, THEIRS))
        if framework != OURS or theirs is None:
            continue
        out[(model, case)] = {"speed": ours["images_per_s"] / theirs["images_per_s"],
                              "memory": ours["peak_rss_mb"] / theirs["peak_rss_mb"]}
    return out


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows):
    """The side-by-side table: one line per (model, case)."""
    by_key = {(r["model"], r["case"], r["framework"]): r for r in rows}
    pairs = []
    for r in rows:
        if (r["model"], r["case"]) not in pairs:
            pairs.append((r["model"], r["case"]))
    rate = ratios(rows)
    lines = ["| model | case | ours img/s (ms/call: median [min-max]) | HF torch img/s (ms/call) | speed ours/HF "
             "| ours peak MB | HF peak MB | memory ours/HF | ours GFLOP/s | HF GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r):
        if r is None:
            return "-"
        if "error" in r:
            return "error"
        return (f"{r['images_per_s']:.2f} ({r['median_s'] * 1e3:.0f} [{r['min_s'] * 1e3:.0f}-"
                f"{r['max_s'] * 1e3:.0f}])")

    for model, case in pairs:
        ours, theirs = by_key.get((model, case, OURS)), by_key.get((model, case, THEIRS))
        ratio = rate.get((model, case), {})
        ok = lambda r, k: r is not None and "error" not in r and k in r  # noqa: E731
        lines.append(
            f"| {model} | {(ours or theirs)['label']} | {cell(ours)} | {cell(theirs)} | "
            f"{_fmt(ratio.get('speed'), 2)}x | {_fmt(ours['peak_rss_mb'], 0) if ok(ours, 'peak_rss_mb') else '-'} | "
            f"{_fmt(theirs['peak_rss_mb'], 0) if ok(theirs, 'peak_rss_mb') else '-'} | "
            f"{_fmt(ratio.get('memory'), 2)}x | "
            f"{_fmt(ours['achieved_gflops']) if ok(ours, 'achieved_gflops') else '-'} | "
            f"{_fmt(theirs['achieved_gflops']) if ok(theirs, 'achieved_gflops') else '-'} |")
    errors = [f"- {r['model']} {r['case']} {r['framework']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else []))


def machine_lines(info):
    versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items() if v)
    return [f"- Machine: {info.get('cpu', info.get('machine'))}, {info.get('usable_cpus')} usable CPUs, "
            f"{info.get('memory_gb', '?')} GB; {info.get('platform')}, Python {info.get('python')}",
            f"- Threads: {info['threads']} for both frameworks (MindSpore CPU op threads, pvt_dense kernels, "
            f"torch.set_num_threads); graph mode for MindSpore, eager + inference_mode for torch",
            f"- Versions: {versions}",
            f"- Load average (1, 5, 15 min) at start {info.get('load_start')}, at end {info.get('load_end')}: "
            f"other processes on the machine make the numbers noisy",
            "- Memory: peak RSS of a fresh process running only that case (includes the framework itself)",
            "- GFLOP/s: `devtools.benchmark.forward_flops` (convs, linears, attention products; a training step "
            "counts as 3 forwards) / median time"] + ([f"- Note: {info['note']}"] if info.get("note") else [])


def write_reports(folder, info, rows, profiles):
    """results.md, results.csv, results.json and results.png (when matplotlib is available), atomically."""
    os.makedirs(folder, exist_ok=True)
    payload = {"machine": info, "results": rows,
               "ratios": [{"model": m, "case": c, **v} for (m, c), v in ratios(rows).items()],
               "profiles": profiles}
    write_atomic(os.path.join(folder, "results.json"), json.dumps(payload, indent=1).encode())
    columns = ["model", "case", "framework", "batch", "height", "width", "images_per_s", "median_s", "min_s",
               "max_s", "p25_s", "p75_s", "spread", "repeats", "first_call_s", "peak_rss_mb", "rss_after_import_mb",
               "gflops_per_call", "achieved_gflops", "total_s", "process_s", "images", "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_atomic(os.path.join(folder, "results.csv"), text.getvalue().encode())
    markdown = ["# PVT CPU benchmark: pvt_dense (MindSpore) vs HuggingFace transformers (torch)", "",
                *machine_lines(info), "", markdown_table(rows), ""]
    breakdown = pipeline_breakdown(rows)
    if breakdown:
        markdown += ["## Pipeline cases: where the time went", "", *breakdown, ""]
    for name in sorted(profiles):
        markdown.append(f"See `profile_{name}.md` for where the time of one forward goes.")
    write_atomic(os.path.join(folder, "results.md"), ("\n".join(markdown) + "\n").encode())
    plot_throughput(rows, os.path.join(folder, "results.png"))


def plot_throughput(rows, path):
    """Grouped bar chart of images/s, ours next to HF's, for every measured (model, case)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pairs = []
    for r in rows:
        if (r["model"], r["case"]) not in pairs:
            pairs.append((r["model"], r["case"]))
    by_key = {(r["model"], r["case"], r["framework"]): r for r in rows if "error" not in r}
    if not by_key:  # every case failed: the errors are in the tables, there is nothing to plot
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(pairs)), 4))
    x = np.arange(len(pairs))
    for offset, framework in ((-0.2, OURS), (0.2, THEIRS)):
        values = [by_key[(m, c, framework)]["images_per_s"] if (m, c, framework) in by_key else np.nan
                  for m, c in pairs]
        ax.bar(x + offset, values, width=0.4, label=FRAMEWORK_LABELS[framework])
    ax.set_xticks(x)
    labels = {(r["model"], r["case"]): r["label"] for r in rows}
    ax.set_xticklabels([f"{m}\n{labels[(m, c)]}" for m, c in pairs], fontsize=6)
    ax.set_ylabel("images / s (median)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("PVT on the CPU, same machine and thread count")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path


def profile_markdown(model, case, results, top=15):
    """Per-operator-type tables of one forward for both frameworks, largest first."""
    lines = [f"# Where the time of one forward goes: {model}, {case.label}", ""]
    for framework in (OURS, THEIRS):
        result = results.get(framework)
        lines.append(f"## {FRAMEWORK_LABELS[framework]}")
        if result is None or "error" in result:
            lines += ["", f"not measured: {None if result is None else result['error']}", ""]
            continue
        total = sum(v["ms"] for v in result["by_type"].values())
        lines += ["", f"Wall time of the profiled forward {result['wall_s'] * 1e3:.0f} ms (profiler on); "
                  f"sum of operator times {total:.0f} ms.", "", "| operator | calls | ms | share |",
                  "|---|---|---|---|"]
        for name, v in sorted(result["by_type"].items(), key=lambda kv: -kv[1]["ms"])[:top]:
            lines.append(f"| {name} | {v['calls']} | {v['ms']:.1f} | {100 * v['ms'] / total:.1f}% |")
        if result.get("by_layer"):
            layer_total = sum(v["ms"] for v in result["by_layer"].values())
            lines += ["", "By layer (summed over stages and blocks):", "", "| layer/op | calls | ms | share |",
                      "|---|---|---|---|"]
            for name, v in sorted(result["by_layer"].items(), key=lambda kv: -kv[1]["ms"])[:top]:
                lines.append(f"| {name} | {v['calls']} | {v['ms']:.1f} | {100 * v['ms'] / layer_total:.1f}% |")
        lines.append("")
    if OURS in results and "by_type" in results[OURS] and results[OURS]["by_type"].get("Custom"):
        lines.append("`Custom` is pvt_dense's fused exact GELU and LayerNorm kernels (`pvt_dense/models/fast_ops.py`).")
    return "\n".join(lines) + "\n"


def pipeline_breakdown(rows):
    """Markdown lines: for each pipeline case, total time, per-image time and where our time went (and theirs)."""
    lines = []
    for row in rows:
        if row.get("total_s") is None and not row.get("parts_s"):
            continue
        side = FRAMEWORK_LABELS[row["framework"]]
        whole = f" (whole process {row['process_s']:.1f} s)" if row.get("process_s") else ""
        lines.append(f"- {row['model']} {row['case']}, {side}: {row['images']} images in {row['total_s']:.1f} s"
                     f"{whole} "
                     f"({row['total_s'] / max(row['images'], 1):.2f} s per image overall; per image after loading: "
                     f"median {row['median_s']:.2f} s, first {row['first_call_s']:.2f} s)"
                     + (f"; {row['note']}" if row.get("note") else ""))
        parts = row.get("parts_s") or {}
        if parts:
            lines.append("  - " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts.items()))
    return lines


def resolve_cases(cases):
    """BenchCase objects for case names (or cases given whole, as tests do at tiny sizes)."""
    resolved, bad = [], []
    for case in cases:
        if isinstance(case, BenchCase):
            resolved.append(case)
        elif case in CASES:
            resolved.append(CASES[case])
        else:
            bad.append(case)
    if bad:
        raise BenchmarkError(f"unknown case(s) {bad}; valid: {', '.join(CASES)}")
    return resolved


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


def run_benchmark(models=DEFAULT_MODELS, cases=tuple(CASES), output="outputs/benchmark", repeats=10, warmup=3,
                  threads=None, frameworks=(OURS, THEIRS), profile_cases=("fwd224_b8",), max_seconds=60.0,
                  progress=True):
    """Measure every (model, case, framework) in a fresh subprocess and write the reports; returns the rows.

    The pipeline cases (RetinaNet, Semantic FPN, feature export) run for the first model of `models` only, which
    must be a PVT v1 size (mmdetection's PVT is v1's)."""
    import shutil
    import tempfile
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
