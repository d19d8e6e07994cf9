"""The fused CPU kernels' shared library: compiled from its sources, cached per user, trusted, loaded.

The sources are `pvt_dense/models/kernels/`: `common.h` (the thread pool's interface, the float math, the shape
checks of the entry points) and one `.cc` per kernel family (`KERNEL_SOURCES`), compiled together into one library
with the system C++ compiler (`$CXX`, else g++) when the first Cell of `fast_ops` is built, into this user's
cache: `$PVT_DENSE_CACHE_DIR`, or `$XDG_CACHE_HOME/pvt_dense`, or `~/.cache/pvt_dense`, created 0700 and refused
(with a fallback) if it, or a file in it, belongs to another user or is writable by others. The file name is keyed
by a hash of every source's and header's name and content, MindSpore's version, the compiler, the flags and the
machine; a build that fails leaves a `.failed` marker so other processes do not retry it until one of those
changes. A build records the library's size and SHA-256 beside it (`<name>.record`, written before the library is
published); a library that no longer matches its record (truncated, replaced, damaged) is removed and built again,
and any library, recorded or not, must have every segment its ELF headers name inside the file before it is loaded:
mapping a truncated library would kill the process with SIGBUS, which no fallback can catch. The library is then
loaded with ctypes and every kernel symbol is resolved, so that a library that cannot load (noexec mount,
unresolved symbol, a file that is not a library) raises `KernelLibraryError` here, which costs `fast_ops` speed,
never the model.

Threads: one pool per process. `PVT_DENSE_NUM_THREADS` sets its size; by default it is the CPUs this process may
use divided among the processes msrun (MS_WORKER_NUM) or mpirun started on the machine.
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
import warnings

import mindspore as ms

ENV_CACHE_DIR = "PVT_DENSE_CACHE_DIR"
ENV_NUM_THREADS = "PVT_DENSE_NUM_THREADS"

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
# What the library is compiled from: the header every source includes, and one source per kernel family (compiled
# together into one library; a new family is one more name here, its entry points in the symbol tuples below).
KERNEL_HEADERS = ("common.h",)
KERNEL_SOURCES = ("thread_pool.cc", "gelu.cc", "layer_norm.cc", "dense.cc", "attention.cc", "conv.cc", "winograd.cc",
                  "argmax.cc", "grad_norm.cc", "focal_loss.cc")
# What the Custom ops of fast_ops name: every one must resolve in the loaded library before a Cell uses it.
BASIC_KERNELS = ("PvtGelu", "PvtGeluGrad", "PvtLayerNorm", "PvtLayerNormGrad", "PvtGlobalNorm", "PvtFocalLoss",
                 "PvtFocalLossGrad")
DENSE_KERNELS = ("PvtDense", "PvtDenseGrad", "PvtGeluDense", "PvtGeluDenseGrad", "PvtAttention",
                 "PvtAttentionGrad", "PvtAttentionBias", "PvtConv2dStride1", "PvtConv2dStride2",
                 "PvtConv2dStride4", "PvtConv2dGrad", "PvtMlp")
# Called through ctypes on the host, not as MindSpore ops.
CONTROL_SYMBOLS = ("PvtSetThreadCount", "PvtThreadCount", "PvtArgmaxUpdate")

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


def library_key(sources, compiler, flags, link):
    """The cache name's hash: every source's and header's name and content ((name, bytes) pairs), MindSpore's
    version (the aot interface and its libdnnl), the compiler, the flags and the machine, so a change to any of them
    builds a new library."""
    files = hashlib.sha256()
    for name, data in sources:
        files.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\0".encode())
    parts = (files.hexdigest(), ms.__version__, _compiler_identity(compiler), platform.machine(),
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


def _compile(compiler, sources, flags, link, target):
    """Compile `sources` ((name, bytes) pairs: the bytes the key was made from) into `target` atomically: they are
    written into a private temporary folder and compiled from there, and concurrent processes each write their own
    temporary library, then rename. The build record is written before the library is published, so a published
    library always has one."""
    folder = os.path.dirname(target)
    source_dir = tempfile.mkdtemp(suffix=".src", dir=folder)  # 0700, this process's own
    partial = _write_private(folder, ".so.tmp", b"")
    try:
        compiled = []
        for name, data in sources:
            path = os.path.join(source_dir, name)
            with open(path, "xb") as handle:
                handle.write(data)
            if name.endswith(".cc"):
                compiled.append((len(data), name))
        objects = _compile_units(compiler, flags, source_dir, compiled)
        _run_compiler([compiler, *flags, "-o", partial, *objects, *link])
        os.chmod(partial, 0o700)
        _write_record(target, partial)
        os.replace(partial, target)
    finally:
        shutil.rmtree(source_dir, ignore_errors=True)
        if os.path.exists(partial):
            os.remove(partial)


def usable_cpus():
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run_compiler(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise KernelLibraryError(f"{command[0]} failed: {result.stderr.strip()[-2000:]}")


def _compile_units(compiler, flags, source_dir, sources):
    """Object files of the `.cc` sources ((size, name) pairs in `source_dir`), compiled as one unit per usable CPU
    at once, each unit a file that includes its share of the sources: the standard headers are then parsed once per
    unit instead of once per source. The first run of a user's first model waits for this build: one g++ call over
    the ten sources took 5.0 s here, two units side by side 1.3 s. (So the sources share one namespace per unit:
    their internal names must differ, which a build of them all as one unit checks.)"""
    units = [[] for _ in range(max(1, min(len(sources), usable_cpus())))]
    for size, name in sorted(sources, reverse=True):  # the largest first, each to the unit with the least so far
        min(units, key=lambda unit: sum(item[0] for item in unit)).append((size, name))
    objects, processes = [], []
    for index, unit in enumerate(units):
        source = os.path.join(source_dir, f"unit{index}.cpp")
        with open(source, "x", encoding="utf-8") as handle:
            handle.write("".join(f'#include "{name}"\n' for _, name in sorted(unit, key=lambda item: item[1])))
        objects.append(os.path.join(source_dir, f"unit{index}.o"))
        processes.append(subprocess.Popen([compiler, *flags, "-c", "-o", objects[-1], source],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    failures = []
    for process in processes:
        try:
            _, errors = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            process.kill()
            _, errors = process.communicate()
        if process.returncode != 0:
            failures.append(errors.strip()[-2000:])
    if failures:
        raise KernelLibraryError(f"{compiler} failed: {failures[0]}")
    return objects


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
        cpus = usable_cpus()
    if environ.get("MSRUN_CPU_LIST"):
        return max(1, cpus)
    return max(1, cpus // _local_workers(environ))


def read_kernel_sources():
    """((file name, bytes), ...) of every header and source in pvt_dense/models/kernels: what is compiled and hashed."""
    sources = []
    for name in KERNEL_HEADERS + KERNEL_SOURCES:
        try:
            with open(os.path.join(KERNEL_DIR, name), "rb") as handle:
                sources.append((name, handle.read()))
        except OSError as err:
            raise KernelLibraryError(f"kernel source missing from the installed package: {err}") from err
    return tuple(sources)


def library_candidates(sources, compiler, folder):
    """(library path, failed-build marker path, flags, link flags, has_dense) for each build, fastest first."""
    candidates = []
    for flags, link, has_dense in _build_attempts():
        stem = os.path.join(folder, f"fast_ops-{library_key(sources, compiler, flags, link)}")
        candidates.append((stem + ".so", stem + ".failed", flags, link, has_dense))
    return candidates


def build_library():
    """(path, has_dense, ctypes handle) of a loaded, symbol-checked kernel library, compiled into this user's cache
    if it holds none for these sources, MindSpore, compiler and flags. A build that failed once is not retried
    (its `.failed` marker says why) until one of those changes."""
    sources = read_kernel_sources()
    compiler = _compiler()
    folder = private_cache_dir(cache_dir())
    errors = []
    for target, marker, flags, link, has_dense in library_candidates(sources, compiler, folder):
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
                _compile(compiler, sources, flags, link, target)
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
