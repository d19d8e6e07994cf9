"""The benchmark's workers: each task (one model, case and framework) runs in a fresh Python process, so its peak
resident memory is its own (`run_worker`); `worker_main` is that process's entry."""
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

from pvt_dense.models.factory import MODEL_SPECS

from .bench_cases import OURS, THEIRS, BenchCase, BenchmarkError
from .hf_reference import NUM_CLASSES, hf_classifier, official_dense_hf_backbone
from .timing import current_rss_mb, peak_rss_mb, set_mindspore_threads, time_calls


REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULT_MARK = "PVT_BENCH_RESULT "


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
    if task.get("cache_dir"):
        env["PVT_DENSE_CACHE_DIR"] = task["cache_dir"]
    # the worker imports this module, which lives outside the installed package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (REPOSITORY_ROOT, env.get("PYTHONPATH"))))
    command = [sys.executable, "-c", "import sys; from devtools.bench_workers import worker_main; "
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
