"""Run one inference Cell on inputs of many shapes without paying a graph compilation for every new shape.

MindSpore's graph mode compiles one graph per input signature (shapes and dtypes); a graph already compiled for a
signature is reused (the Cell keeps one per phase in `cell.compile_cache`). A folder of photos of many sizes, where
each image is padded only to a multiple of 32 (the reference protocol of mmdet/mmseg test pipelines), therefore
pays one compilation per distinct padded size: for PVT-Tiny on a 2-core CPU ~4 s per shape, against a forward of
~0.1-0.6 s at 100-320 pixel sides and a few seconds at 800x1333.

Why not one dynamic-shape graph (`cell.set_inputs(Tensor(shape=[1, 3, None, None]))`)? In MindSpore 2.10 it
compiles, but the fused aot kernels of `pvt_dense.models.fast_ops` fail at run time ("The pointer[value] is null":
their shapes are inferred in Python, which a dynamic graph cannot call per run), the attention's query-chunk loop
and the position embedding's "same grid" shortcut branch on shapes, and with those removed and MindSpore's own
operators the dynamic graph ran the PVT-Tiny forward ~1.5-3x slower than the static one (results identical).
Padding to a few bucket sizes is not an option either: PVT attention is global, so padding changes every output.

The policy here keeps results exactly those of the model at the image's own size and bounds the cost of rare
shapes, the "ski rental" rule: a shape that has no graph yet runs eagerly (PyNative: no compilation, slower per
forward); once the eager time spent on that shape reaches the measured cost of one compilation, its graph is
compiled and used from then on. A shape seen once costs one eager forward instead of a compilation; a recurring
shape costs at most about twice what compiling it right away would have. The very first shape is compiled at once,
to measure what a compilation costs on this machine and model (later estimates are the mean of the measured ones).
"""
import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Set

import mindspore as ms

POLICIES = ("auto", "graph", "eager")


def input_signature(args):
    """The part of the arguments a compiled graph is specialised on: shape and dtype of each tensor, else the
    value itself."""
    return tuple((tuple(arg.shape), str(arg.dtype)) if hasattr(arg, "shape") and hasattr(arg, "dtype") else arg
                 for arg in args)


@dataclass
class ShapeStats:
    """What a `ShapeFlexibleForward` did: graph compilations and the seconds of each first graph call (compilation
    plus one forward), calls run through an already compiled graph, calls run eagerly (PyNative)."""

    compilations: int = 0
    compile_seconds: List[float] = field(default_factory=list)
    graph_calls: int = 0
    eager_calls: int = 0

    def summary(self):
        return (f"{self.compilations} graph compilations ({sum(self.compile_seconds):.1f} s), "
                f"{self.graph_calls} calls through compiled graphs, {self.eager_calls} eager calls")


@dataclass
class _CellRecord:
    """What is known about one Cell, shared by all its wrappers (so a second export with the same backbone reuses
    the first one's graphs and cost measurements)."""

    compiled: Set[tuple] = field(default_factory=set)
    first_graph_seconds: List[float] = field(default_factory=list)
    eager_seconds: Dict[tuple, float] = field(default_factory=dict)


_RECORDS = weakref.WeakKeyDictionary()  # Cell -> _CellRecord, dropped with the Cell


@contextlib.contextmanager
def execution_mode(mode):
    """Run the block in MindSpore execution `mode` (GRAPH_MODE or PYNATIVE_MODE), restoring the previous one."""
    previous = ms.get_context("mode")
    if previous != mode:
        ms.set_context(mode=mode)
    try:
        yield
    finally:
        if previous != mode:
            ms.set_context(mode=previous)


class ShapeFlexibleForward:
    """`forward(*args)` is `cell(*args)`, run per input signature either through a compiled graph or eagerly
    (PyNative), by the rule of the module docstring; outputs are exactly what the Cell returns in either way.

    Args:
        cell: the inference Cell, in eval mode (`cell.set_train(False)`).
        policy: "auto" (the rule above), "graph" (compile every new signature: MindSpore's own graph mode) or
            "eager" (never compile). Under a global PYNATIVE_MODE context "auto" runs eagerly: whoever chose
            PyNative (to debug, to step through the model) gets no graphs.
        compile_seconds: the assumed cost of a first graph call (compilation and one forward) before one was
            measured; None (default) compiles the first signature at once and measures it.

    `stats` (`ShapeStats`) counts what this wrapper did. The global execution mode is switched only for the
    duration of a call and restored afterwards. Not thread-safe (MindSpore's execution mode is process-wide).
    """

    def __init__(self, cell, policy="auto", compile_seconds=None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if compile_seconds is not None and not compile_seconds >= 0:
            raise ValueError(f"compile_seconds must be a non-negative number of seconds, got {compile_seconds!r}")
        self.cell = cell
        self.policy = policy
        self.assumed_compile_seconds = compile_seconds
        self.record = _RECORDS.setdefault(cell, _CellRecord())
        self.stats = ShapeStats()

    def __call__(self, *args):
        signature = input_signature(args)
        if signature in self.record.compiled:
            self.stats.graph_calls += 1
            with execution_mode(ms.GRAPH_MODE):
                return self.cell(*args)
        if self.should_compile(signature):
            return self._compile_and_run(signature, args)
        return self._run_eager(signature, args)

    def compile_cost_estimate(self):
        """Seconds a first graph call (compilation and one forward) is expected to take: the mean of those
        measured on this Cell, else the assumed value (None when neither exists)."""
        measured = self.record.first_graph_seconds
        if measured:
            return sum(measured) / len(measured)
        return self.assumed_compile_seconds

    def should_compile(self, signature):
        """Whether a signature without a graph gets one now (see the module docstring)."""
        if self.policy != "auto":
            return self.policy == "graph"
        if ms.get_context("mode") == ms.PYNATIVE_MODE:
            return False
        estimate = self.compile_cost_estimate()
        if estimate is None:
            return True  # nothing measured yet: this compilation is the measurement
        return self.record.eager_seconds.get(signature, 0.0) >= estimate

    def _compile_and_run(self, signature, args):
        # Timed as one call through the Cell (not `cell.compile`), so the Cell's own input checks run first.
        with execution_mode(ms.GRAPH_MODE):
            start = time.perf_counter()
            outputs = self.cell(*args)
            ms.runtime.synchronize()
            seconds = time.perf_counter() - start
        self.record.compiled.add(signature)
        self.record.first_graph_seconds.append(seconds)
        self.record.eager_seconds.pop(signature, None)
        self.stats.compilations += 1
        self.stats.compile_seconds.append(seconds)
        return outputs

    def _run_eager(self, signature, args):
        with execution_mode(ms.PYNATIVE_MODE):
            start = time.perf_counter()
            outputs = self.cell(*args)
            ms.runtime.synchronize()
            seconds = time.perf_counter() - start
        self.record.eager_seconds[signature] = self.record.eager_seconds.get(signature, 0.0) + seconds
        self.stats.eager_calls += 1
        return outputs
