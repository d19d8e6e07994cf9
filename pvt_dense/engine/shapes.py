"""Run one inference Cell on inputs of many shapes, compiling a graph only for the shapes where that pays.

MindSpore's graph mode compiles one graph per input signature (shapes and dtypes) and reuses it when the signature
comes back (the Cell keeps one phase per graph in `cell.compile_cache`). A folder of photos of many sizes, each
padded only to a multiple of 32 (the reference protocol of mmdet/mmseg test pipelines), pays one compilation per
distinct padded size: PVT-Tiny, one thread, ~3-5 s per compilation on an idle machine, against a graph forward of
~0.2 s at 97x131 and ~0.6 s at 224x320.

What else was tried (MindSpore 2.10, CPU):
- One dynamic-shape graph (`cell.set_inputs(Tensor(shape=[1, 3, None, None], dtype=ms.float32))`) compiles, but
  the fused aot kernels of `pvt_dense.models.fast_ops` then fail at run time ("The pointer[value] is null": their
  output shapes are inferred by Python functions, which a dynamic graph cannot call per run), and the attention's
  query-chunk loop and the position embedding's "same grid" shortcut branch on shapes. With those three changed
  (MindSpore's own operators, no chunking, always resizing the embedding, which is exact at the same size) the
  dynamic graph compiled once, matched the static graph exactly and ran the forward about 1.1-3x slower than a
  static graph of the same operators (PVT-Tiny, 96x128 to 224x320), itself slower than the fused kernels.
- Padding to a few bucket sizes: PVT attention is global, so plain padding changes every output. With every
  layer told where the padding is (masked keys, resized position embeddings, zeroed conv inputs, replicated
  edges: `pvt_dense.models.buckets`) it does not, and `BucketedForward` below runs PVT detectors, segmentors and
  backbones that way: a few bucket graphs for all sizes. This class remains the engine below it, and the path of
  models that cannot be bucketed (v2 "-li").
- PyNative (eager) gives exactly the graph's outputs (max difference 0.0 measured) with no compilation, but each
  forward costs more than a graph forward: run synchronously (`eager_inference`), a Semantic FPN-PVT-Tiny forward
  at 512x704 took 0.46-0.60 s against 0.33-0.40 s as a graph whose compilation costs ~3 s, so a size that comes
  back fewer than ~15 times is cheaper eager.

So the choice is made per signature from measured costs, keeping results exactly those of the model at the
image's own size. Costs are learned on the fly per Cell: the seconds of a first graph call (compilation and one
forward), and eager and graph seconds per input element. A signature without a graph:
1. the first one seen is compiled (this measures a compilation); the next new one runs eagerly once (this measures
   the eager speed);
2. when one eager forward of it is predicted to cost at least a first graph call, it is compiled at once;
3. otherwise it runs eagerly until the eager time spent on it reaches the cost of a compilation, then it is
   compiled (the "ski rental" rule: a shape seen once never pays a compilation, a recurring one costs at most
   about twice what compiling it at once would have).
A caller that knows its inputs ahead (a list of images) can say how often each signature will come with `expect`;
once a compilation and the eager speed are measured (the first signature is compiled, the first call of the next
one runs eagerly), such a signature with k calls left is compiled when k eager forwards are predicted to cost at
least a compilation plus k graph forwards, and otherwise runs eagerly, without the ski-rental detour.
"""
import contextlib
import math
import time
import weakref
from dataclasses import dataclass, field
from collections import OrderedDict
from typing import Dict, List

import mindspore as ms
import numpy as np
from mindspore.graph.api import _cell_graph_executor  # releases compiled graphs (Cell.__del__ does the same)

from ..models.buckets import plan_buckets

POLICIES = ("auto", "graph", "eager")
# Compiled graphs kept alive per Cell (least recently used released first): memory stays bounded whatever the
# number of input sizes, and a size bucket plan (`BucketedForward`) never needs more.
DEFAULT_MAX_GRAPHS = 4


def input_signature(args):
    """The part of the arguments a compiled graph is specialised on: shape and dtype of each tensor (tensors in
    nested tuples included), else the value itself."""
    return tuple(input_signature(arg) if isinstance(arg, (tuple, list)) else
                 (tuple(arg.shape), str(arg.dtype)) if hasattr(arg, "shape") and hasattr(arg, "dtype") else arg
                 for arg in args)


def tensor_signature(*shapes, dtype=ms.float32):
    """The signature of a call with tensors of these shapes (all of `dtype`), for `ShapeFlexibleForward.expect`."""
    return tuple((tuple(int(n) for n in shape), str(dtype)) for shape in shapes)


def input_elements(args):
    """Elements in all tensor arguments: the size measure costs are scaled by."""
    return sum(math.prod(arg.shape) for arg in args if hasattr(arg, "shape")) or 1


def wait_for(outputs):
    """Block until (nested tuples of) `outputs` are computed: MindSpore may return before an eager op finished.
    Reading the last output suffices, operators run in order."""
    while isinstance(outputs, (tuple, list)) and outputs:
        outputs = outputs[-1]
    if hasattr(outputs, "asnumpy"):
        outputs.asnumpy()


@dataclass
class ShapeStats:
    """What a `ShapeFlexibleForward` did: graph compilations and the seconds of each first graph call (compilation
    plus one forward), calls through an already compiled graph, calls run eagerly (PyNative)."""

    compilations: int = 0
    compile_seconds: List[float] = field(default_factory=list)
    graph_calls: int = 0
    eager_calls: int = 0
    released: int = 0

    def summary(self):
        return (f"{self.compilations} graph compilations ({sum(self.compile_seconds):.1f} s), "
                f"{self.graph_calls} calls through compiled graphs, {self.eager_calls} eager calls"
                + (f", {self.released} graphs released" if self.released else ""))


@dataclass
class Rate:
    """Seconds per input element, from the calls measured so far."""

    seconds: float = 0.0
    elements: int = 0

    def add(self, seconds, elements):
        self.seconds += seconds
        self.elements += elements

    def predict(self, elements):
        return self.seconds / self.elements * elements if self.elements else None


@dataclass
class _CellRecord:
    """What is known about one Cell, shared by all its wrappers (so a second export with the same backbone reuses
    the first one's graphs and measurements)."""

    compiled: "OrderedDict[tuple, frozenset]" = field(default_factory=OrderedDict)  # signature -> its phases,
    # least recently used first
    first_graph_calls: List[tuple] = field(default_factory=list)  # (seconds, input elements)
    graph: Rate = field(default_factory=Rate)
    eager: Rate = field(default_factory=Rate)
    eager_seconds: Dict[tuple, float] = field(default_factory=dict)  # per signature without a graph
    expected: Dict[tuple, int] = field(default_factory=dict)  # calls announced with `expect` and not made yet

    def compile_seconds(self):
        """Mean seconds of a compilation alone: first graph calls less a graph forward (when that is known)."""
        if not self.first_graph_calls:
            return None
        costs = [seconds - (self.graph.predict(elements) or 0.0) for seconds, elements in self.first_graph_calls]
        return max(sum(costs) / len(costs), 0.0)


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


@contextlib.contextmanager
def eager_inference():
    """PyNative for the block, its operators launched synchronously (then as before). MindSpore's asynchronous
    PyNative queue spins a thread waiting for work (25% of the samples of a Semantic FPN forward), which on a 2-CPU
    machine takes a core from the kernels: a PVT-Tiny Semantic FPN forward at 512x704 took 0.80-1.05 s that way,
    0.46-0.60 s synchronously (0.33-0.40 s as a compiled graph)."""
    synchronous = ms.get_context("pynative_synchronize")
    with execution_mode(ms.PYNATIVE_MODE):
        if not synchronous:
            ms.set_context(pynative_synchronize=True)
        try:
            yield
        finally:
            if not synchronous:
                ms.set_context(pynative_synchronize=False)


class ShapeFlexibleForward:
    """`forward(*args)` is `cell(*args)`, run per input signature either through a compiled graph or eagerly
    (PyNative), by the rule of the module docstring; outputs are exactly what the Cell returns in either way.

    Args:
        cell: the inference Cell, in eval mode (`cell.set_train(False)`).
        policy: "auto" (the rule above), "graph" (compile every new signature: MindSpore's own graph mode) or
            "eager" (never compile). Under a global PYNATIVE_MODE context "auto" runs eagerly: whoever chose
            PyNative (to debug, to step through the model) gets no graphs.
        compile_seconds: the assumed seconds of one compilation until one is measured; None (default) compiles
            the first signature at once to measure it.
        max_graphs: compiled graphs kept alive for this Cell; compiling one more first releases the least
            recently used (None: no bound).

    `stats` (`ShapeStats`) counts what this wrapper did. The global execution mode is switched only for the
    duration of a call and restored afterwards; not thread-safe (MindSpore's execution mode is process-wide).
    """

    def __init__(self, cell, policy="auto", compile_seconds=None, max_graphs=DEFAULT_MAX_GRAPHS):
        if max_graphs is not None and int(max_graphs) < 1:
            raise ValueError(f"max_graphs must be at least 1 (or None: no bound), got {max_graphs!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if compile_seconds is not None and not compile_seconds >= 0:
            raise ValueError(f"compile_seconds must be a non-negative number of seconds, got {compile_seconds!r}")
        self.cell = cell
        self.policy = policy
        self.assumed_compile_seconds = compile_seconds
        self.record = _RECORDS.setdefault(cell, _CellRecord())
        self.max_graphs = None if max_graphs is None else int(max_graphs)
        self.stats = ShapeStats()

    def expect(self, signature, count=1):
        """Announce `count` more calls with this signature (see `tensor_signature`), so the choice for it can
        weigh all of them instead of learning by renting."""
        self.record.expected[signature] = self.record.expected.get(signature, 0) + int(count)

    def __call__(self, *args):
        return self.run(args)[0]

    def run(self, args, eager_args=None):
        """(outputs, how) of one call with `args`: how is "graph", "compiled" (this call compiled the graph) or
        "eager". `eager_args`: a function giving what to run instead when the call runs eagerly (the same results by
        other means: an image at its own size rather than padded into a size bucket, where only a graph gains from
        the padding), made only then."""
        signature = input_signature(args)
        compiled = signature in self.record.compiled
        decide_compile = not compiled and self.should_compile(signature, input_elements(args))
        if self.record.expected.get(signature, 0) > 0:
            self.record.expected[signature] -= 1
        if compiled:
            self.record.compiled.move_to_end(signature)
            return self._run_graph(args), "graph"
        if decide_compile:
            return self._compile_and_run(signature, args), "compiled"
        return self._run_eager(signature, args if eager_args is None else eager_args()), "eager"

    def should_compile(self, signature, elements):
        """Whether a signature without a graph gets one now (the rule of the module docstring)."""
        if self.policy != "auto":
            return self.policy == "graph"
        if ms.get_context("mode") == ms.PYNATIVE_MODE:
            return False
        record = self.record
        compile_seconds = record.compile_seconds()
        if compile_seconds is None:
            compile_seconds = self.assumed_compile_seconds
        if compile_seconds is None:
            return True  # nothing measured yet: this compilation is the measurement
        calls_left = record.expected.get(signature, 0)
        eager = record.eager.predict(elements)
        if eager is None:
            # The eager speed is not known yet: this call measures it (at worst one forward's difference), and the
            # signature's next call decides with both speeds known.
            return False
        graph = record.graph.predict(elements) or 0.0
        if calls_left > 0:
            return calls_left * eager >= compile_seconds + calls_left * graph
        if eager >= compile_seconds + graph:
            return True  # even a shape seen once is cheaper compiled
        return record.eager_seconds.get(signature, 0.0) >= compile_seconds

    def _run_graph(self, args):
        with execution_mode(ms.GRAPH_MODE):
            start = time.perf_counter()
            outputs = self.cell(*args)
            wait_for(outputs)
            self.record.graph.add(time.perf_counter() - start, input_elements(args))
        self.stats.graph_calls += 1
        return outputs

    def release_graphs(self, keep):
        """Release the compiled graphs of all but the `keep` most recently used signatures of this Cell: MindSpore
        keeps a graph (and its CPU kernels' tables, ~0.4 GB for RetinaNet-PVT-Tiny) for as long as the Cell
        lives otherwise."""
        while len(self.record.compiled) > keep:
            _, phases = self.record.compiled.popitem(last=False)
            live = {phase for phase in phases if phase in self.cell.compile_cache}
            if live:
                _cell_graph_executor.del_net_res(self.cell, live)
                self.cell.compile_cache.difference_update(live)
            self.stats.released += 1

    def _compile_and_run(self, signature, args):
        if self.max_graphs is not None:
            self.release_graphs(self.max_graphs - 1)
        before = set(self.cell.compile_cache)
        # One call through the Cell (not `cell.compile`), so the Cell's own input checks run first.
        with execution_mode(ms.GRAPH_MODE):
            start = time.perf_counter()
            outputs = self.cell(*args)
            wait_for(outputs)
            seconds = time.perf_counter() - start
        self.record.compiled[signature] = frozenset(set(self.cell.compile_cache) - before)
        self.record.first_graph_calls.append((seconds, input_elements(args)))
        self.record.eager_seconds.pop(signature, None)
        self.stats.compilations += 1
        self.stats.compile_seconds.append(seconds)
        return outputs

    def _run_eager(self, signature, args):
        with eager_inference():
            start = time.perf_counter()
            outputs = self.cell(*args)
            wait_for(outputs)
            seconds = time.perf_counter() - start
        self.record.eager.add(seconds, input_elements(args))
        self.record.eager_seconds[signature] = self.record.eager_seconds.get(signature, 0.0) + seconds
        self.stats.eager_calls += 1
        return outputs


def _tensors(arrays):
    """Nested tuples of numpy arrays -> the same nesting of MindSpore Tensors."""
    if isinstance(arrays, tuple):
        return tuple(_tensors(item) for item in arrays)
    return ms.Tensor(arrays)


class BucketedForward:
    """`forward(images)` -> the Cell's outputs for a (B, 3, h, w) numpy batch, computed in a size bucket: the batch
    zero-padded into a bucket at least its size, the Cell told the valid region (`cell.bucket_inputs`, see
    `pvt_dense.models.buckets`), the outputs cropped back by `crop(outputs, (h, w))` to the region's own. The
    results are those of the batch at its own size (to float32 rounding: tests/test_buckets.py), from far fewer
    compiled graphs.

    The buckets are planned from the sizes announced with `expect_sizes` before the first call (`plan_buckets`:
    compilations against padded pixels); a size never announced goes to the smallest bucket that holds it, or
    becomes a bucket of its own. Each bucket is a signature of a `ShapeFlexibleForward` (`max_graphs` alive at a
    time): compiled when its calls pay for it, else run eagerly, and then, as under a global PyNative context
    where nothing is compiled, each batch runs at its own size (padding only pays in a graph shared by sizes).
    h and w must be multiples of 32 (the test protocols' padding or resizing makes them so).

    Args:
        cell: an inference Cell in eval mode with `bucket_inputs(valid_size, bucket_size)` and a `construct(images,
            valid)`; `supports_buckets` must be true.
        crop: (list of numpy outputs, valid (h, w)) -> the outputs of the valid region alone.
        compile_pixels: what one compilation costs, in pixels of forward computation (the planning's exchange rate).
        max_buckets: at most this many buckets in a plan.
    """

    def __init__(self, cell, crop, compile_pixels=3.0e6, max_buckets=4, policy="auto",
                 max_graphs=DEFAULT_MAX_GRAPHS):
        if not getattr(cell, "supports_buckets", False):
            raise ValueError(f"{type(cell).__name__} cannot run in size buckets (supports_buckets is false)")
        self.cell = cell
        self.crop = crop
        self.compile_pixels = float(compile_pixels)
        self.max_buckets = int(max_buckets)
        self.flexible = ShapeFlexibleForward(cell, policy, max_graphs=max_graphs)
        self.announced = []
        self.plan = None
        self.buckets = []
        self._inputs = OrderedDict()  # (valid, bucket) -> valid-region Tensors, a few most recent

    @property
    def stats(self):
        return self.flexible.stats

    def expect_sizes(self, sizes):
        """Announce one coming single-image call per (h, w) in `sizes` (multiples of 32)."""
        self.announced.extend(tuple(int(n) for n in size) for size in sizes)
        self.plan = None

    def bucket_for(self, size):
        """The bucket (h, w) that a batch of valid size `size` runs in."""
        if self.plan is None and self.announced:
            self.plan = plan_buckets(self.announced, self.compile_pixels, self.max_buckets)
            self.buckets = sorted(set(self.plan.values()) | set(self.buckets))
            per_bucket = {}
            for size_announced in self.announced:
                bucket = self.plan[size_announced]
                per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
            for bucket, count in per_bucket.items():
                self.flexible.expect(self.signature(1, bucket), count)
            self.announced = []
        if self.plan and size in self.plan:
            return self.plan[size]
        fitting = [b for b in self.buckets if b[0] >= size[0] and b[1] >= size[1]]
        if fitting:
            return min(fitting, key=lambda b: b[0] * b[1])
        self.buckets.append(size)
        return size

    def signature(self, batch, bucket):
        return input_signature((ms.Tensor(np.zeros((batch, 3) + bucket, np.float32)),
                                self.valid_inputs(bucket, bucket)))

    def valid_inputs(self, size, bucket):
        key = (size, bucket)
        if key not in self._inputs:
            # mutable: tensors inside a tuple argument are otherwise compile-time constants, and every new valid
            # size (every new Tensor object even) would compile a graph of its own
            self._inputs[key] = ms.mutable(_tensors(self.cell.bucket_inputs(size, bucket)))
            while len(self._inputs) > 8:
                self._inputs.popitem(last=False)
        self._inputs.move_to_end(key)
        return self._inputs[key]

    def __call__(self, images):
        images = np.asarray(images, np.float32)
        size = tuple(int(n) for n in images.shape[2:])
        if ms.get_context("mode") == ms.PYNATIVE_MODE and self.flexible.policy == "auto":
            # nothing is compiled in PyNative: padding would only add work
            return [output.asnumpy() for output in self.flexible(ms.Tensor(images))]
        bucket = self.bucket_for(size)
        padded = images
        if bucket != size:
            padded = np.zeros(images.shape[:2] + bucket, np.float32)
            padded[:, :, :size[0], :size[1]] = images
        outputs, how = self.flexible.run((ms.Tensor(padded), self.valid_inputs(size, bucket)),
                                         eager_args=lambda: (ms.Tensor(images),))
        outputs = [output.asnumpy() for output in outputs]
        return outputs if how == "eager" else self.crop(outputs, size)
