"""The benchmark's reports: the machine it ran on, one row per (model, case, framework), ours/theirs ratios,
and results.md / .csv / .json / .png and the per-operator profiles, written atomically."""
import csv
import io
import json
import os
import platform

import numpy as np

from pvt_dense.atomic import write_atomic
from pvt_dense.models.factory import MODEL_SPECS

from .bench_cases import FRAMEWORK_LABELS, OURS, THEIRS, case_flops
from .timing import summarize_times


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
            "- GFLOP/s: `devtools.bench_cases.forward_flops` (convs, linears, attention products; a training step "
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
