"""Timing and memory readings shared by the benchmark's cases (`benchmark`) and pipelines (`pipeline_bench`)."""
import os
import resource
import statistics
import time

import numpy as np


def time_calls(call, warmup, repeats, max_seconds=None, min_repeats=3):
    """Per-call wall times of `call()` after `warmup` untimed calls (the first one compiles, timed separately).

    Stops early once `min_repeats` calls are done and `max_seconds` of timed calls have passed, so the large cases
    stay bounded. Returns (first_call_seconds, [seconds per timed call]).
    """
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        call()
    times, spent = [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        spent += times[-1]
        if max_seconds is not None and spent > max_seconds and len(times) >= min_repeats:
            break
    return first, times


def peak_rss_mb():
    """This process's peak resident set size in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb():
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return float("nan")


def set_mindspore_threads(threads):
    import mindspore as ms
    try:
        from mindspore.device_context.cpu.op_tuning import threads_num
        threads_num(threads)
    except (ImportError, AttributeError, RuntimeError):
        ms.set_context(runtime_num_threads=threads)


def summarize_times(seconds):
    """Median, min, max, interquartile range and relative spread ((p75 - p25) / median) of per-call times."""
    if not seconds:
        raise ValueError("no timings to summarize")  # a bug of the caller: every case times at least one call
    values = sorted(float(s) for s in seconds)
    median = statistics.median(values)
    p25, p75 = (float(v) for v in np.percentile(values, [25, 75]))
    return {"median_s": median, "min_s": values[0], "max_s": values[-1], "p25_s": p25, "p75_s": p75,
            "spread": (p75 - p25) / median if median > 0 else 0.0, "repeats": len(values)}
