"""Exact GELU, LayerNorm and Linear for MindSpore on the CPU, as fused C++ kernels (`ops.Custom`, func_type="aot").

Why: in MindSpore 2.10 graph mode on the CPU, exact (erf) `nn.GELU` becomes Erf, Div, Mul and Add kernels that
take ~45% of the PVT-Tiny forward (batch 8, 224x224: ~290 of ~650 ms of op time); on the stage-1 MLP activation
(25088, 512) it costs ~200 ms where PyTorch's GELU costs ~30 ms. An element-wise composite accurate to 1e-6 needs
about as many passes (one multiply on that tensor: ~10 ms), so it cannot win. One fused pass can: the GELU kernel
below takes ~23 ms there (~11 ms inside the model graph), its backward ~13 ms. `nn.LayerNorm` is already cheap in
a graph's forward; the LayerNorm kernel's gain is in the backward (~7 vs ~78 ms on (8, 3136, 64), op level).

Linear (`Dense`): oneDNN's sgemm from the libdnnl inside MindSpore's CPU wheel, with the bias fused and the rows
split over this library's threads; backward gives dx, dW and db (summed in double) in one kernel. Single-threaded
PVT-Tiny forward CPU time, MatMul + BiasAdd -> this kernel: 117 -> 107 ms at batch 1, 1192 -> 992 ms at batch 8
(224x224). Attention (`PvtAttention`): per head softmax(scale q k^T) v in blocks of 64 query rows with the same
sgemm, so the score matrix is never stored (800x1344 has 67200 x 1050 scores per stage-1 block). It reads q (B, N, C)
and kv (B, M, 2C) as the q and kv Linear layers write them, so no head transpose, key/value split or scaling pass
runs around it. Its backward (`PvtAttentionGrad`) recomputes each block's probabilities the same way and
accumulates dq, dk and dv without an N x M tensor. Single-threaded CPU time vs BatchMatMul + Softmax (before the
token layouts): PVT-Tiny forward 758 -> 702 ms (224x224, batch 8), 3554 -> 3239 ms (800x1344). Without libdnnl
only GELU and LayerNorm are compiled.

Accuracy (float32; measured against float64 references, see tests/test_fast_ops.py and tests/test_fast_dense.py):
- GELU(x) = x/2 * erfc(-x/sqrt 2), with erfc(a) = t * exp(-a^2 + P(t)), t = 1/(1 + a/2) and P a degree-9
  polynomial fitted for this file (relative error of erfc ~1e-7 down to the float range). Max abs error 4e-7
  on |x| <= 12 (PyTorch's own CPU GELU: 4e-7), exact 0/x tails, NaN/inf as PyTorch. The gradient
  Phi(x) + x phi(x) has max abs error 2e-7.
- LayerNorm: two-pass mean and biased variance per row, eps inside the square root, as `nn.LayerNorm`.
  The backward recomputes the row statistics instead of storing them and sums dgamma/dbeta in double.

The kernels' source is `pvt_dense/models/kernels/fast_ops.cc`. It is compiled with the system C++ compiler (`$CXX`,
else g++) when the first Cell is built, into this user's cache: `$PVT_DENSE_CACHE_DIR`, or
`$XDG_CACHE_HOME/pvt_dense`, or `~/.cache/pvt_dense`, created 0700 and refused (with a fallback) if it, or a file
in it, belongs to another user or is writable by others. The file name is keyed by a hash of the source's content,
MindSpore's version, the compiler, the flags and the machine; a build that fails leaves a `.failed` marker so other
processes do not retry it until one of those changes. A build records the library's size and SHA-256 beside it
(`<name>.record`, written before the library is published); a library that no longer matches its record
(truncated, replaced, damaged) is removed and built again, and any library, recorded or not, must have every
segment its ELF headers name inside the file before it is loaded: mapping a truncated library would kill the
process with SIGBUS, which no fallback can catch. Before any Cell uses it, the library is loaded with ctypes and
every kernel symbol is resolved, so that a library that cannot load (noexec mount, unresolved symbol, a file that is
not a library) costs speed, never the model. When the kernels are unavailable for any reason (that, no compiler, a
device target other than CPU, a non-float32 input, or `PVT_DENSE_FAST_OPS=0`), the Cells fall back to MindSpore's
own operators with the same semantics, warning once per process saying why. Shapes are checked where MindSpore
infers them and again in the kernels, so a misuse is an error, never an out-of-bounds read.

Threads: one pool per process. `PVT_DENSE_NUM_THREADS` sets its size; by default it is the CPUs this process may
use divided among the processes msrun (MS_WORKER_NUM) or mpirun started on the machine. A graph exported with
`mindspore.export` refers to the compiled library by path: export with `PVT_DENSE_FAST_OPS=0` for a MINDIR that
runs elsewhere.
"""
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import warnings

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

ENV_SWITCH = "PVT_DENSE_FAST_OPS"
ENV_CACHE_DIR = "PVT_DENSE_CACHE_DIR"
ENV_NUM_THREADS = "PVT_DENSE_NUM_THREADS"

KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "fast_ops.cc")
# What the Custom ops below name: every one must resolve in the loaded library before a Cell uses it.
BASIC_KERNELS = ("PvtGelu", "PvtGeluGrad", "PvtLayerNorm", "PvtLayerNormGrad")
DENSE_KERNELS = ("PvtDense", "PvtDenseGrad", "PvtGeluDense", "PvtGeluDenseGrad", "PvtAttention",
                 "PvtAttentionGrad", "PvtAttentionBias", "PvtConv2dStride1", "PvtConv2dStride2",
                 "PvtConv2dStride4")
CONV_STRIDES = (1, 2, 4)  # the strides the convolution kernel has an entry for, each with "same" padding
# Called through ctypes on the host, not as MindSpore ops.
CONTROL_SYMBOLS = ("PvtSetThreadCount", "PvtThreadCount", "PvtArgmaxChannels")

_BASE_FLAGS = ("-std=c++17", "-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=fast", "-fopenmp-simd",
               "-fno-math-errno", "-fno-trapping-math")
# Every symbol resolved at link time (-z defs) and at load time (-z now): a library that would fail on its first
# call fails to build or to load instead, where it can still fall back.
_LINK_FLAGS = ("-Wl,-z,defs", "-Wl,-z,now")


class KernelLibraryError(RuntimeError):
    """The kernel library cannot be built, trusted or loaded; the Cells use MindSpore's operators instead."""


def _x86_flags():
    """-mavx2 -mfma where the CPU has them (checked, not assumed: the library is built on the machine it runs on)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return ("-mavx2", "-mfma") if {"avx2", "fma"} <= flags else ()
    except OSError:
        pass
    return ()


def cache_dir():
    """Where this user's compiled kernels live: `$PVT_DENSE_CACHE_DIR`, `$XDG_CACHE_HOME/pvt_dense` or
    `~/.cache/pvt_dense`. Never a shared temporary directory, where another user could plant a library."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "pvt_dense")


def _refuse_unless_private(path, info, what):
    """A file or folder another user could have written is never loaded from or built into."""
    if info.st_uid != os.geteuid():
        raise KernelLibraryError(f"refusing {what} {path}: owned by uid {info.st_uid}, not by this user "
                                 f"(uid {os.geteuid()})")
    if info.st_mode & 0o022:
        raise KernelLibraryError(f"refusing {what} {path}: writable by its group or by everyone (mode "
                                 f"{stat.S_IMODE(info.st_mode):o})")


def private_cache_dir(folder):
    """`folder`, created 0700 if missing, after checking that it is a real directory owned by this user and not
    writable by anyone else."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError as err:
        raise KernelLibraryError(f"cannot create the kernel cache {folder}: {err}") from err
    if not stat.S_ISDIR(info.st_mode):
        raise KernelLibraryError(f"refusing the kernel cache {folder}: not a directory (a symbolic link?)")
    _refuse_unless_private(folder, info, "the kernel cache")
    return folder


def _trusted_file(path):
    """Whether `path` exists, raising if it exists but is not a regular file of this user's that only they can write."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode):
        raise KernelLibraryError(f"refusing {path}: not a regular file")
    _refuse_unless_private(path, info, "the cached file")
    return True


def _compiler():
    """Absolute path of the C++ compiler: `$CXX`, else g++ or c++ on PATH."""
    named = os.environ.get("CXX") or "g++"
    found = shutil.which(named) or (None if os.environ.get("CXX") else shutil.which("c++"))
    if not found:
        raise KernelLibraryError(f"no C++ compiler found ({named!r} is not on PATH; set CXX, or install g++)")
    return os.path.abspath(found)


def _compiler_identity(compiler):
    """The compiler's resolved path, size and modification time: a new compiler means a new key, without running it."""
    real = os.path.realpath(compiler)
    try:
        info = os.stat(real)
        return f"{real}:{info.st_size}:{info.st_mtime_ns}"
    except OSError:
        return real


def _dnnl_library():
    """MindSpore's own oneDNN library (shipped in its CPU wheel), whose sgemm the Dense kernels call; or None."""
    folder = os.path.join(os.path.dirname(ms.__file__), "lib")
    for name in ("libdnnl.so.3", "libdnnl.so.2", "libdnnl.so"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _build_attempts():
    """(flags, link, has_dense) from the fastest library to the plainest."""
    simd = [_BASE_FLAGS + _x86_flags()]
    if simd[0] != _BASE_FLAGS:
        simd.append(_BASE_FLAGS)  # an old compiler or assembler without AVX2 support
    dnnl = _dnnl_library()
    attempts = []
    if dnnl:
        folder = os.path.dirname(dnnl)
        link = (f"-L{folder}", f"-l:{os.path.basename(dnnl)}", f"-Wl,-rpath,{folder}") + _LINK_FLAGS
        attempts += [(flags + ("-DPVT_HAVE_DNNL",), link, True) for flags in simd]
    attempts += [(flags, _LINK_FLAGS, False) for flags in simd]  # GELU and LayerNorm only
    return attempts


def library_key(source, compiler, flags, link):
    """The cache name's hash: the source's content, MindSpore's version (the aot interface and its libdnnl), the
    compiler, the flags and the machine, so a change to any of them builds a new library."""
    parts = (hashlib.sha256(source).hexdigest(), ms.__version__, _compiler_identity(compiler), platform.machine(),
             platform.python_version()) + tuple(flags) + tuple(link)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _write_private(folder, suffix, data):
    """A new 0600 file in `folder` holding `data` (bytes): its path."""
    fd, path = tempfile.mkstemp(suffix=suffix, dir=folder)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def record_path(target):
    """The build record beside library `target`: JSON {"size", "sha256"} of the library as it was built."""
    return os.path.splitext(target)[0] + ".record"


def _file_digest(path):
    """(size, SHA-256 hex) of the file at `path`."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _write_record(target, library_file):
    """Record `library_file`'s size and SHA-256 as `target`'s build record (atomically)."""
    size, sha256 = _file_digest(library_file)
    folder = os.path.dirname(target)
    path = _write_private(folder, ".record.tmp", json.dumps({"size": size, "sha256": sha256}).encode())
    os.replace(path, record_path(target))


def _record_mismatch(target):
    """Why the library at `target` differs from its build record, or None when it matches it or has no record."""
    record = record_path(target)
    if not _trusted_file(record):
        return None
    try:
        with open(record, encoding="utf-8") as handle:
            expected = json.loads(handle.read(4096))
        expected_size, expected_sha = int(expected["size"]), str(expected["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"its build record {record} is unreadable"
    size, sha256 = _file_digest(target)
    if size != expected_size:
        return f"it has {size} bytes but {expected_size} were built (truncated or replaced)"
    if sha256 != expected_sha:
        return "its SHA-256 differs from the one recorded when it was built (damaged or replaced)"
    return None


def check_elf_bounds(path):
    """KernelLibraryError unless `path` is an ELF file whose program and section headers, and every segment they
    name, lie inside the file: dlopen maps segments without checking, and touching a page past the end of the file
    raises SIGBUS, which kills the process."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        header = handle.read(64)
        if len(header) < 52 or header[:4] != b"\x7fELF" or header[4] not in (1, 2) or header[5] not in (1, 2):
            raise KernelLibraryError(f"cannot load {path}: not an ELF shared library")
        is64, order = header[4] == 2, "<" if header[5] == 1 else ">"
        if is64 and len(header) < 64:
            raise KernelLibraryError(f"cannot load {path}: its ELF header is truncated")
        if is64:
            phoff, shoff = struct.unpack_from(order + "QQ", header, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", header, 0x36)
        else:
            phoff, shoff = struct.unpack_from(order + "II", header, 0x1C)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", header, 0x2A)
        if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size or phentsize < (56 if is64 else 32):
            raise KernelLibraryError(f"cannot load {path}: its ELF headers lie past its end ({size} bytes: "
                                     "truncated)")
        handle.seek(phoff)
        table = handle.read(phnum * phentsize)
    for index in range(phnum):
        entry = table[index * phentsize:(index + 1) * phentsize]
        if is64:
            offset, filesz = struct.unpack_from(order + "Q", entry, 8)[0], struct.unpack_from(order + "Q", entry, 32)[0]
        else:
            offset, filesz = struct.unpack_from(order + "I", entry, 4)[0], struct.unpack_from(order + "I", entry, 16)[0]
        if offset + filesz > size:
            raise KernelLibraryError(f"cannot load {path}: segment {index} ends at byte {offset + filesz}, past its "
                                     f"end ({size} bytes: truncated)")


def _compile(compiler, source, flags, link, target):
    """Compile `source` (the bytes the key was made from) into `target` atomically: concurrent processes each write
    their own temporary file, then rename. The build record is written before the library is published, so a
    published library always has one."""
    folder = os.path.dirname(target)
    source_path = _write_private(folder, ".cc", source)
    partial = _write_private(folder, ".so.tmp", b"")
    try:
        result = subprocess.run([compiler, *flags, "-o", partial, source_path, *link], capture_output=True,
                                text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise KernelLibraryError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.chmod(partial, 0o700)
        _write_record(target, partial)
        os.replace(partial, target)
    finally:
        for leftover in (source_path, partial):
            if os.path.exists(leftover):
                os.remove(leftover)


def _remember_failure(marker, message):
    """Write the failed build's marker, so other processes skip this build until the key changes."""
    try:
        path = _write_private(os.path.dirname(marker), ".failed.tmp", message.encode("utf-8", "replace"))
        os.replace(path, marker)
    except OSError:
        pass  # only costs a retry in the next process


def load_library(path, symbols):
    """The ctypes handle of `path`, every name in `symbols` resolved: KernelLibraryError if it cannot be loaded
    (not an ELF library for this machine, a noexec mount, an unresolved dependency) or lacks one of them."""
    try:
        handle = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except OSError as err:
        raise KernelLibraryError(f"cannot load {path}: {err}") from err
    missing = [name for name in symbols if not hasattr(handle, name)]
    if missing:
        raise KernelLibraryError(f"{path} lacks the kernel symbols {', '.join(missing)}")
    return handle


def _local_workers(environ):
    """How many processes of this job share this machine's CPUs, from what msrun or mpirun exported."""
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE", "MS_WORKER_NUM",
                 "RANK_SIZE"):
        try:
            value = int(environ.get(name, ""))
        except ValueError:
            continue
        if value > 0:
            return value
    return 1


def default_thread_count(environ=None, cpus=None):
    """Threads for this process's kernels: `$PVT_DENSE_NUM_THREADS` if set, else the CPUs this process may use
    divided among the processes msrun/mpirun started (msrun exports MS_WORKER_NUM; a single node is assumed), or
    all of them when msrun bound each process to its own cores (it then exports MSRUN_CPU_LIST)."""
    environ = os.environ if environ is None else environ
    explicit = environ.get(ENV_NUM_THREADS, "").strip()
    if explicit:
        try:
            if int(explicit) > 0:
                return int(explicit)
        except ValueError:
            pass
        warnings.warn(f"{ENV_NUM_THREADS}={explicit!r} is not a positive integer; choosing the thread count "
                      "automatically", RuntimeWarning, stacklevel=2)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if environ.get("MSRUN_CPU_LIST"):
        return max(1, cpus)
    return max(1, cpus // _local_workers(environ))


def read_kernel_source():
    """The bytes of pvt_dense/models/kernels/fast_ops.cc, the source that is compiled and hashed."""
    try:
        with open(KERNEL_SOURCE, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise KernelLibraryError(f"kernel source missing from the installed package: {err}") from err


def library_candidates(source, compiler, folder):
    """(library path, failed-build marker path, flags, link flags, has_dense) for each build, fastest first."""
    candidates = []
    for flags, link, has_dense in _build_attempts():
        stem = os.path.join(folder, f"fast_ops-{library_key(source, compiler, flags, link)}")
        candidates.append((stem + ".so", stem + ".failed", flags, link, has_dense))
    return candidates


def _build_library():
    """(path, has_dense, ctypes handle) of a loaded, symbol-checked kernel library, compiled into this user's cache
    if it holds none for this source, MindSpore, compiler and flags. A build that failed once is not retried
    (its `.failed` marker says why) until one of those changes."""
    source = read_kernel_source()
    compiler = _compiler()
    folder = private_cache_dir(cache_dir())
    errors = []
    for target, marker, flags, link, has_dense in library_candidates(source, compiler, folder):
        symbols = BASIC_KERNELS + CONTROL_SYMBOLS + (DENSE_KERNELS if has_dense else ())
        mismatch = _record_mismatch(target) if _trusted_file(target) else None
        if mismatch:
            # Ours (the cache is private), built here and since damaged: rebuilt, once, by whoever sees it first.
            errors.append(f"{target} was removed: {mismatch}")
            for stale in (target, record_path(target)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)
        if not _trusted_file(target):
            if _trusted_file(marker):
                with open(marker, encoding="utf-8", errors="replace") as handle:
                    errors.append(f"an earlier build failed ({marker}): {handle.read()[-500:]}")
                continue
            try:
                _compile(compiler, source, flags, link, target)
            except (OSError, KernelLibraryError, subprocess.SubprocessError) as err:
                errors.append(f"{target}: {err}")
                _remember_failure(marker, str(err))
                continue
        # A library that exists but cannot be loaded (corrupt, noexec, a changed dependency) is not rebuilt over:
        # every process would do so again. It falls back instead; deleting the file retries.
        check_elf_bounds(target)
        handle = load_library(target, symbols)
        if mismatch:
            warnings.warn(f"pvt_dense kernel library rebuilt: {errors[-1]}", RuntimeWarning, stacklevel=4)
        return target, has_dense, handle
    raise KernelLibraryError("; ".join(errors))


def _known(*shapes):
    return all(all(d >= 0 for d in shape) for shape in shapes)


def _require(ok, kernel, expected, shapes):
    if not ok:
        raise ValueError(f"pvt_dense {kernel} kernel: expected {expected}, got shapes "
                         f"{', '.join(str(tuple(s)) for s in shapes)}")


def _gelu_shape(*shapes):
    return shapes[0]


def _gelu_grad_shape(x, dy):
    _require(not _known(x, dy) or list(x) == list(dy), "GELU backward", "x and dy of one shape", (x, dy))
    return x


def _layer_norm_shape(x, gamma, beta, eps):
    _require(len(x) >= 1, "LayerNorm", "x with at least one axis", (x,))
    if _known(x, gamma, beta):
        _require(list(gamma) == [x[-1]] and list(beta) == [x[-1]], "LayerNorm",
                 "gamma and beta of shape (C,) for x (..., C)", (x, gamma, beta))
    return x


def _layer_norm_grad_shape(x, gamma, dy, eps):
    _require(len(x) >= 1, "LayerNorm backward", "x with at least one axis", (x,))
    if _known(x, gamma, dy):
        _require(list(gamma) == [x[-1]] and list(dy) == list(x), "LayerNorm backward",
                 "gamma (C,) and dy like x (..., C)", (x, gamma, dy))
    return x, gamma, gamma


def _dense_shape(x, w, b):
    _require(len(x) >= 1 and len(w) == 2 and len(b) == 1, "Dense", "x (..., K), weight (N, K), bias (N,)",
             (x, w, b))
    if _known(x, w, b):
        _require(w[1] == x[-1] and b[0] == w[0], "Dense", "x (..., K), weight (N, K), bias (N,)", (x, w, b))
    return list(x[:-1]) + [w[0]]


def _dense_grad_shape(x, w, dy):
    _require(len(x) >= 1 and len(w) == 2 and len(dy) == len(x), "Dense backward",
             "x (..., K), weight (N, K), dy (..., N)", (x, w, dy))
    if _known(x, w, dy):
        _require(w[1] == x[-1] and list(dy) == list(x[:-1]) + [w[0]], "Dense backward",
                 "x (..., K), weight (N, K), dy (..., N)", (x, w, dy))
    return x, w, [w[0]]


def _attention_shape(q, kv, meta):
    expected = "q (B, N, C), kv (B, M, 2C) and meta [heads, scale]"
    _require(len(q) == 3 and len(kv) == 3 and len(meta) == 1, "attention", expected, (q, kv, meta))
    if _known(q, kv, meta):
        _require(kv[0] == q[0] and kv[2] == 2 * q[2] and meta[0] == 2, "attention", expected, (q, kv, meta))
    return q


def _attention_bias_shape(q, kv, meta, bias):
    _attention_shape(q, kv, meta)
    _require(len(bias) == 2, "attention", "a key bias (B, M)", (kv, bias))
    if _known(kv, bias):
        _require(list(bias) == [kv[0], kv[1]], "attention", "a key bias (B, M) for kv (B, M, 2C)", (kv, bias))
    return q


def _attention_grad_shape(q, kv, meta, dout):
    _attention_shape(q, kv, meta)
    _require(not _known(q, dout) or list(dout) == list(q), "attention backward", "dout shaped like q", (q, dout))
    return q, kv


def _conv_shape(stride):
    """The shape function of the convolution kernel's entry for `stride`, "same" padding (k odd, pad k // 2)."""
    def shape(x, w, b, meta):
        expected = "x (B, C, H, W), weight (O, C, k, k) with k odd, bias (O) and meta [stride, pad, relu]"
        _require(len(x) == 4 and len(w) == 4 and len(b) == 1 and len(meta) == 1, "convolution", expected,
                 (x, w, b, meta))
        if _known(x, w, b, meta):
            _require(w[1] == x[1] and w[2] == w[3] and w[2] % 2 == 1 and b[0] == w[0] and meta[0] == 3,
                     "convolution", expected, (x, w, b, meta))
        return [x[0], w[0], (x[2] - 1) // stride + 1, (x[3] - 1) // stride + 1]
    return shape


def _conv_bprop(stride):
    """Gradients of the convolution kernel through MindSpore's own operators: the weight's from the Im2Col columns,
    the input's by folding (Col2Im) the columns' gradient back onto the image; with meta[2] == 1 (ReLU fused) the
    incoming gradient is first zeroed where the output is."""
    left = ops.BatchMatMul(transpose_a=True)
    right = ops.BatchMatMul(transpose_b=True)

    def bprop(x, w, b, meta, out, dout):
        batch, _, height, width = x.shape
        kernel = w.shape[2]
        pad = kernel // 2
        dout = dout * ops.logical_or(out > 0, meta[2] == 0).astype(dout.dtype)
        weight = w.reshape(w.shape[0], -1)
        grad = dout.reshape(batch, w.shape[0], -1)
        columns = ops.unfold(x, kernel, 1, pad, stride)
        dw = right(grad, columns).sum(0).reshape(w.shape)
        dcolumns = left(ops.broadcast_to(weight, (batch,) + weight.shape), grad)
        dx = ops.fold(dcolumns, ops.tuple_to_array((height, width)), kernel, 1, pad, stride)
        return dx, dw, grad.sum((0, 2)), ops.zeros_like(meta)
    return bprop


def _same_dtype(*dtypes):
    return dtypes[0]


class _Kernels:
    """The Custom primitives, with their bprops, made once per process."""

    def __init__(self, library, has_dense=False, handle=None):
        if ":" in library:
            raise KernelLibraryError(f"the kernel library path must not contain ':' ({library})")
        self.handle = handle  # the ctypes handle: keeps the checked library loaded for MindSpore's own dlopen
        self.library, self.has_dense, self._conv2d = library, has_dense, {}
        self.threads = None
        if handle is not None:
            handle.PvtSetThreadCount.argtypes = [ctypes.c_int]
            handle.PvtSetThreadCount.restype = ctypes.c_int
            self.threads = handle.PvtSetThreadCount(default_thread_count())
            handle.PvtArgmaxChannels.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            handle.PvtArgmaxChannels.restype = ctypes.c_int
        gelu_grad = ops.Custom(f"{library}:PvtGeluGrad", out_shape=_gelu_grad_shape, out_dtype=_same_dtype,
                               func_type="aot")

        def gelu_bprop(x, out, dout):
            return (gelu_grad(x, dout),)

        layer_norm_grad = ops.Custom(f"{library}:PvtLayerNormGrad", out_shape=_layer_norm_grad_shape,
                                     out_dtype=lambda x, g, dy, e: (x, g, g), func_type="aot")

        def layer_norm_bprop(x, gamma, beta, eps, out, dout):
            dx, dgamma, dbeta = layer_norm_grad(x, gamma, dout, eps)
            return dx, dgamma, dbeta, ops.zeros_like(eps)

        self.library = library
        self.dense = self.gelu_dense = self.attention = self.attention_bias = None
        if has_dense:
            dense_grad = ops.Custom(f"{library}:PvtDenseGrad", out_shape=_dense_grad_shape,
                                    out_dtype=lambda x, w, dy: (x, w, w), func_type="aot")

            def dense_bprop(x, weight, bias, out, dout):
                return dense_grad(x, weight, dout)

            gelu_dense_grad = ops.Custom(f"{library}:PvtGeluDenseGrad", out_shape=_dense_grad_shape,
                                         out_dtype=lambda h, w, dy: (h, w, w), func_type="aot")

            def gelu_dense_bprop(h, weight, bias, out, dout):
                return gelu_dense_grad(h, weight, dout)

            self.gelu_dense = ops.Custom(f"{library}:PvtGeluDense", out_shape=_dense_shape,
                                         out_dtype=lambda h, w, b: h, func_type="aot", bprop=gelu_dense_bprop)
            attention_grad = ops.Custom(f"{library}:PvtAttentionGrad", out_shape=_attention_grad_shape,
                                        out_dtype=lambda q, kv, meta, dout: (q, kv), func_type="aot")

            def attention_bprop(q, kv, meta, out, dout):
                dq, dkv = attention_grad(q, kv, meta, dout)
                return dq, dkv, ops.zeros_like(meta)

            self.attention = ops.Custom(f"{library}:PvtAttention", out_shape=_attention_shape,
                                        out_dtype=lambda q, kv, meta: q, func_type="aot", bprop=attention_bprop)
            # inference only (size buckets mask padded keys with it): no bprop
            self.attention_bias = ops.Custom(f"{library}:PvtAttentionBias", out_shape=_attention_bias_shape,
                                             out_dtype=lambda q, kv, meta, bias: q, func_type="aot")
            self.dense = ops.Custom(f"{library}:PvtDense", out_shape=_dense_shape,
                                    out_dtype=lambda x, w, b: x, func_type="aot", bprop=dense_bprop)
        self.gelu = ops.Custom(f"{library}:PvtGelu", out_shape=_gelu_shape, out_dtype=_same_dtype,
                               func_type="aot", bprop=gelu_bprop)
        self.layer_norm = ops.Custom(f"{library}:PvtLayerNorm", out_shape=_layer_norm_shape, out_dtype=_same_dtype,
                                     func_type="aot", bprop=layer_norm_bprop)


    def conv2d(self, kernel_size, stride, pad):
        """The convolution kernel for a k x k convolution with this stride and padding, or None where it has no
        entry (strides other than CONV_STRIDES, padding other than k // 2 with k odd) or no sgemm. One primitive
        per stride, made once. Made for inference; its gradient (for a model in eval mode inside a gradient, as a
        test or a frozen part may take) is the Im2Col + BatchMatMul one."""
        if not self.has_dense or stride not in CONV_STRIDES or kernel_size % 2 != 1 or pad != kernel_size // 2:
            return None
        if stride not in self._conv2d:
            self._conv2d[stride] = ops.Custom(f"{self.library}:PvtConv2dStride{stride}",
                                              out_shape=_conv_shape(stride), out_dtype=lambda x, w, b, meta: x,
                                              func_type="aot", bprop=_conv_bprop(stride))
        return self._conv2d[stride]


_LOCK = threading.Lock()
_STATE = {}


def kernels():
    """The compiled kernels, or None (with one warning per process saying why) when they cannot be used."""
    with _LOCK:
        if "kernels" not in _STATE:
            _STATE["kernels"], _STATE["reason"] = None, None
            if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
                _STATE["reason"] = f"disabled by {ENV_SWITCH}"
            elif platform.system() != "Linux":
                _STATE["reason"] = "MindSpore's aot Custom ops need Linux"
            else:
                try:
                    _STATE["kernels"] = _Kernels(*_build_library())
                except Exception as err:  # any failure here must only cost speed, never the model
                    _STATE["kernels"] = None
                    _STATE["reason"] = f"{type(err).__name__}: {err}"
                    warnings.warn(f"pvt_dense fast GELU/LayerNorm kernels unavailable, using MindSpore's "
                                  f"operators (slower, same results): {_STATE['reason']}", RuntimeWarning,
                                  stacklevel=3)
        return _STATE["kernels"]


_FORCED_OFF = []


@contextlib.contextmanager
def mindspore_ops_only():
    """Cells built inside this block use MindSpore's own operators, whatever the kernels' availability.

    For `mindspore.export`: a graph with the Custom kernels names this machine's compiled library by path, so a
    MINDIR exported from it would not run anywhere else.
    """
    _FORCED_OFF.append(True)
    try:
        yield
    finally:
        _FORCED_OFF.pop()


def kernels_for_new_cell():
    """The kernels a Cell being built now should use: None on a non-CPU target or inside `mindspore_ops_only`."""
    if _FORCED_OFF or ms.get_context("device_target") != "CPU":
        return None
    return kernels()


def channel_argmax(maps):
    """`maps.argmax(axis=0)` (int32) of (K, ...) float32 maps: the first index on ties, NaN counting as the largest,
    as numpy; through the kernel library's threaded loop when it is loaded (measured for 150 x 512 x 683 maps on
    one thread: numpy 145-157 ms), else numpy."""
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    compiled = kernels()
    if compiled is not None and compiled.handle is not None and maps.ndim >= 1 and maps.shape[0] > 0:
        out = np.empty(maps.shape[1:], np.int32)
        if compiled.handle.PvtArgmaxChannels(maps.ctypes.data, maps.shape[0], out.size, out.ctypes.data) == 0:
            return out
    return maps.argmax(axis=0).astype(np.int32)


def fast_ops_status():
    """(available, reason): whether the CPU kernels are in use and, if not, why."""
    available = kernels() is not None
    return available, _STATE.get("reason")


class GELU(nn.Cell):
    """Exact (erf) GELU, elementwise: a drop-in for `nn.GELU(approximate=False)`.

    Input and output: a float tensor of any shape. float32 on the CPU runs the fused kernel; anything else runs
    `nn.GELU(approximate=False)`.
    """

    def __init__(self):
        super().__init__()
        compiled = kernels_for_new_cell()
        self.use_kernel = compiled is not None
        self.kernel = compiled.gelu if self.use_kernel else None
        self.fallback = nn.GELU(approximate=False)

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x)
        return self.fallback(x)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis: a drop-in for `nn.LayerNorm((channels,), epsilon=eps)`.

    Same semantics (biased variance, eps inside the square root) and the same float32 Parameters, `gamma` (ones)
    and `beta` (zeros), so checkpoints written with either load into the other.

    Input (..., channels); output the same shape.
    """

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.channels = int(channels)
        self.eps = float(eps)
        self.gamma = Parameter(initializer("ones", (self.channels,), ms.float32), name="gamma")
        self.beta = Parameter(initializer("zeros", (self.channels,), ms.float32), name="beta")
        compiled = kernels_for_new_cell()
        self.use_kernel = compiled is not None
        self.kernel = compiled.layer_norm if self.use_kernel else None
        self.eps_tensor = Tensor([self.eps], ms.float32)
        self.fallback = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=self.eps)

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x, self.gamma, self.beta, self.eps_tensor)
        y, _, _ = self.fallback(x, self.gamma.astype(x.dtype), self.beta.astype(x.dtype))
        return y

    def extend_repr(self):
        return f"channels={self.channels}, eps={self.eps}, kernel={self.use_kernel}"


class Dense(nn.Cell):
    """y = x W^T + b over the last axis: a drop-in for `nn.Dense(in_channels, out_channels, has_bias=True)`.

    Same float32 Parameters, `weight` (out, in) and `bias` (out,), so checkpoints of either load into the other.
    float32 on the CPU runs one kernel per call (oneDNN's sgemm from MindSpore's own libdnnl, split over this
    library's threads, with the bias fused; backward likewise); anything else runs MatMul + BiasAdd.

    Input (..., in_channels); output (..., out_channels).
    """

    def __init__(self, in_channels, out_channels, weight_init="normal", bias_init="zeros"):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.weight = Parameter(initializer(weight_init, (self.out_channels, self.in_channels), ms.float32),
                                name="weight")
        self.bias = Parameter(initializer(bias_init, (self.out_channels,), ms.float32), name="bias")
        compiled = kernels_for_new_cell()
        self.use_kernel = compiled is not None and compiled.dense is not None
        self.kernel = compiled.dense if self.use_kernel else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x, self.weight, self.bias)
        out_shape = x.shape[:-1] + (self.out_channels,)
        y = self.matmul(x.reshape(-1, self.in_channels), self.weight.astype(x.dtype))
        return self.bias_add(y, self.bias.astype(x.dtype)).reshape(out_shape)

    def extend_repr(self):
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel={self.use_kernel}"


# Cells that stay in float32 under O2: MindSpore's own black list (BatchNorm, nn.LayerNorm) knows nothing of these
# Cells, so `auto_mixed_precision(net, "O2")` would cast them to float16, where they leave the fused kernels for
# MindSpore's float16 LayerNorm and GELU (a LayerNorm over float16 statistics is what O2 exists to avoid).
FLOAT32_UNDER_O2 = (LayerNorm, GELU)


def mixed_precision(network, amp_level):
    """`mindspore.amp.auto_mixed_precision(network, amp_level)`, except that O2 also keeps this module's LayerNorm
    and GELU in float32 (their outputs cast back to float16, as MindSpore does for its black list). Modifies
    `network` in place; returns the Cell to call (O2/O3 wrap it so its outputs are float32)."""
    if amp_level == "O2":
        black_list = ms.amp.get_black_list() + list(FLOAT32_UNDER_O2)
        return ms.amp.custom_mixed_precision(network, black_list=black_list)
    return ms.amp.auto_mixed_precision(network, amp_level)
