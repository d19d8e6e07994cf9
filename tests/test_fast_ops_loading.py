"""How the fused-kernel library is built, trusted, loaded (pvt_dense/models/kernel_library.py) and called
(pvt_dense/models/fast_ops.py): a library it
cannot trust or load falls back to MindSpore's operators with one warning, a failed build is not retried, shapes
that do not fit are refused before and inside the kernels, and the thread pool gives the same numbers from any
thread."""
import ctypes
import os
import shutil
import stat
import subprocess
import threading
import warnings

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from pvt_dense.models import fast_ops, kernel_library

NOBODY = 65534  # the uid of `nobody`: "another user" for a test that runs as root
needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A process state with no kernels looked up yet, and an empty private cache under tmp_path."""
    monkeypatch.setattr(fast_ops, "_STATE", {})
    monkeypatch.delenv(fast_ops.ENV_SWITCH, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv(kernel_library.ENV_CACHE_DIR, str(cache))
    return cache


@pytest.fixture
def counting_compiler(tmp_path, monkeypatch):
    """$CXX set to a script that counts its calls and fails: (path of the count file)."""
    count = tmp_path / "compiler_calls"
    script = tmp_path / "fake-cxx"
    script.write_text(f"#!/bin/sh\necho call >> '{count}'\necho 'fake-cxx: no' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    return count


def calls(count_file):
    return len(count_file.read_text().splitlines()) if count_file.exists() else 0


def lookup_with_one_warning():
    """fast_ops.kernels() in a fresh state: (result, the one warning's text)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fast_ops.kernels()
        assert fast_ops.kernels() is result  # looked up once per process, warned once
    messages = [str(w.message) for w in caught if "kernels unavailable" in str(w.message)]
    assert len(messages) == 1, messages
    return result, messages[0]


def candidates(cache):
    return kernel_library.library_candidates(kernel_library.read_kernel_sources(), kernel_library._compiler(),
                                             str(cache))


def assert_cells_fall_back_with_correct_numbers():
    x = ms.Tensor(np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32))
    gelu, norm, dense = fast_ops.GELU(), fast_ops.LayerNorm(16), fast_ops.Dense(16, 4)
    assert not (gelu.use_kernel or norm.use_kernel or dense.use_kernel)
    reference = nn.Dense(16, 4)
    reference.weight.set_data(dense.weight.value())
    reference.bias.set_data(dense.bias.value())
    np.testing.assert_allclose(gelu(x).asnumpy(), nn.GELU(approximate=False)(x).asnumpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(norm(x).asnumpy(), nn.LayerNorm((16,), epsilon=1e-5)(x).asnumpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(dense(x).asnumpy(), reference(x).asnumpy(), rtol=0, atol=1e-6)


# --- the cache folder and the files in it ------------------------------------------------------------------------

@pytest.mark.bad_input("kernel cache", "a kernel cache folder owned by another user, holding a planted library",
                       "refused: one warning naming the owner, MindSpore's operators, nothing loaded or compiled")
def test_a_cache_folder_owned_by_another_user_is_refused(fresh, counting_compiler, pynative):
    fresh.mkdir(mode=0o700)
    (fresh / "fast_ops-planted.so").write_bytes(b"\x7fELF planted")
    os.chown(fresh, NOBODY, NOBODY)
    result, message = lookup_with_one_warning()
    assert result is None
    assert f"owned by uid {NOBODY}" in message and str(fresh) in message
    assert calls(counting_compiler) == 0
    assert_cells_fall_back_with_correct_numbers()


@pytest.mark.bad_input("kernel cache", "a world-writable kernel cache folder",
                       "refused: one warning saying it is writable by others, MindSpore's operators")
def test_a_world_writable_cache_folder_is_refused(fresh, counting_compiler, pynative):
    fresh.mkdir()
    fresh.chmod(0o777)
    result, message = lookup_with_one_warning()
    assert result is None and "writable by its group or by everyone" in message
    assert calls(counting_compiler) == 0


@needs_compiler
@pytest.mark.bad_input("kernel cache", "a library at the cached name owned by another user, or group-writable",
                       "refused: one warning, the library is not loaded, MindSpore's operators")
@pytest.mark.parametrize("tamper", ["foreign owner", "group writable"])
def test_a_planted_library_in_the_cache_is_refused(fresh, counting_compiler, pynative, tamper):
    kernel_library.private_cache_dir(str(fresh))
    target = candidates(fresh)[0][0]
    with open(target, "wb") as handle:
        handle.write(b"\x7fELF planted")
    if tamper == "foreign owner":
        os.chown(target, NOBODY, NOBODY)
    else:
        os.chmod(target, 0o770)
    result, message = lookup_with_one_warning()
    assert result is None and f"refusing the cached file {target}" in message
    assert calls(counting_compiler) == 0


def test_a_new_cache_folder_is_private(fresh, counting_compiler, pynative):
    lookup_with_one_warning()  # the build fails (fake compiler) but the folder is made first
    info = os.lstat(fresh)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()


def test_the_cache_is_never_the_shared_temporary_directory(monkeypatch):
    import tempfile
    monkeypatch.delenv(kernel_library.ENV_CACHE_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-cache-home")
    assert kernel_library.cache_dir() == "/nonexistent-cache-home/pvt_dense"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert not kernel_library.cache_dir().startswith(tempfile.gettempdir() + os.sep)


# --- loading -------------------------------------------------------------------------------------------------------

@pytest.mark.bad_input("kernel library", "a corrupt file (not an ELF library) at the cached library's name",
                       "not loaded: one warning, MindSpore's operators with the same results, no crash")
def test_a_corrupt_library_falls_back_with_one_warning(fresh, counting_compiler, pynative):
    kernel_library.private_cache_dir(str(fresh))
    target = candidates(fresh)[0][0]
    with open(target, "wb") as handle:
        handle.write(b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 8)
    result, message = lookup_with_one_warning()
    assert result is None and "cannot load" in message and target in message
    assert calls(counting_compiler) == 0  # a library that exists is not rebuilt over
    assert_cells_fall_back_with_correct_numbers()


@needs_compiler
@pytest.mark.bad_input("kernel library", "a valid shared library at the cached name that lacks kernel symbols",
                       "not used: one warning naming the missing symbols, MindSpore's operators")
def test_a_library_missing_a_kernel_symbol_falls_back(fresh, monkeypatch, tmp_path, pynative):
    kernel_library.private_cache_dir(str(fresh))
    target = candidates(fresh)[0][0]
    stub = tmp_path / "stub.cc"
    stub.write_text('extern "C" int PvtGelu() { return 0; }\n')
    subprocess.run([kernel_library._compiler(), "-shared", "-fPIC", "-o", target, str(stub)], check=True)
    os.chmod(target, 0o700)
    result, message = lookup_with_one_warning()
    assert result is None and "lacks the kernel symbols" in message
    assert "PvtLayerNorm" in message and "PvtGelu," not in message
    assert_cells_fall_back_with_correct_numbers()


def test_load_library_resolves_every_symbol_the_custom_ops_name():
    compiled = fast_ops.kernels()
    if compiled is None:
        pytest.skip(f"kernels unavailable here: {fast_ops.fast_ops_status()[1]}")
    names = kernel_library.BASIC_KERNELS + kernel_library.CONTROL_SYMBOLS + (
        kernel_library.DENSE_KERNELS if compiled.dense is not None else ())
    kernel_library.load_library(compiled.library, names)
    with pytest.raises(kernel_library.KernelLibraryError, match="lacks the kernel symbols PvtNoSuchKernel"):
        kernel_library.load_library(compiled.library, names + ("PvtNoSuchKernel",))


# --- building -------------------------------------------------------------------------------------------------------

@pytest.mark.bad_input("kernel build", "a C++ compiler that fails ($CXX), in two processes in turn",
                       "one warning each, MindSpore's operators; the failure is remembered in a .failed marker so "
                       "the second does not run the compiler; a new MindSpore version builds again")
def test_a_failed_build_is_remembered_until_the_key_changes(fresh, counting_compiler, monkeypatch, pynative):
    result, message = lookup_with_one_warning()
    assert result is None and "fake-cxx: no" in message
    # each attempt runs the compiler once per compilation unit (side by side), then stops
    units = min(len(kernel_library.KERNEL_SOURCES), kernel_library.usable_cpus())
    attempts = len(kernel_library._build_attempts()) * units
    assert calls(counting_compiler) == attempts
    assert len(list(fresh.glob("*.failed"))) == attempts // units
    assert not list(fresh.glob("*.tmp")) and not list(fresh.glob("*.src"))  # no leftovers

    monkeypatch.setattr(fast_ops, "_STATE", {})  # as in a second process
    result, message = lookup_with_one_warning()
    assert result is None and "an earlier build failed" in message
    assert calls(counting_compiler) == attempts

    monkeypatch.setattr(ms, "__version__", "99.0.0")
    monkeypatch.setattr(fast_ops, "_STATE", {})
    lookup_with_one_warning()
    assert calls(counting_compiler) == 2 * attempts


def test_the_cache_key_covers_every_source_mindspore_compiler_and_flags(monkeypatch):
    sources, compiler = (("common.h", b"int h;"), ("a.cc", b"int x;")), "/usr/bin/g++"
    key = kernel_library.library_key(sources, compiler, ("-O3",), ())
    assert key == kernel_library.library_key(sources, compiler, ("-O3",), ())
    assert key != kernel_library.library_key((("common.h", b"int h;"), ("a.cc", b"int y;")), compiler, ("-O3",), ())
    assert key != kernel_library.library_key((("common.h", b"int g;"), ("a.cc", b"int x;")), compiler, ("-O3",), ())
    assert key != kernel_library.library_key((("common.h", b"int h;"), ("b.cc", b"int x;")), compiler, ("-O3",), ())
    assert key != kernel_library.library_key(sources + (("c.cc", b""),), compiler, ("-O3",), ())
    assert key != kernel_library.library_key(sources, "/usr/bin/clang++", ("-O3",), ())
    assert key != kernel_library.library_key(sources, compiler, ("-O2",), ())
    monkeypatch.setattr(ms, "__version__", "99.0.0")
    assert key != kernel_library.library_key(sources, compiler, ("-O3",), ())


def test_the_sources_are_real_files_shipped_with_the_package():
    folder = os.path.join("pvt_dense", "models", "kernels")
    assert kernel_library.KERNEL_DIR.endswith(folder)
    # every source and header in the folder is compiled and hashed: a family left out of KERNEL_SOURCES fails here
    on_disk = sorted(name for name in os.listdir(kernel_library.KERNEL_DIR) if name.endswith((".cc", ".h")))
    assert sorted(kernel_library.KERNEL_SOURCES + kernel_library.KERNEL_HEADERS) == on_disk
    sources = kernel_library.read_kernel_sources()
    assert [name for name, _ in sources] == list(kernel_library.KERNEL_HEADERS + kernel_library.KERNEL_SOURCES)
    text = "".join(data.decode() for _, data in sources)
    for name in kernel_library.BASIC_KERNELS + kernel_library.DENSE_KERNELS + kernel_library.CONTROL_SYMBOLS:
        assert f"{name}" in text
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"))
    shipped = [pattern.strip() for pattern in cfg["options.package_data"]["pvt_dense.models"].split(",")]
    assert "kernels/*.cc" in shipped and "kernels/*.h" in shipped


# --- threads --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("environ,cpus,expected", [
    ({}, 16, 16),
    ({"MS_WORKER_NUM": "4"}, 16, 4),  # msrun --local_worker_num=4 on one machine
    ({"MS_WORKER_NUM": "4", "MSRUN_CPU_LIST": "0-3"}, 4, 4),  # msrun --bind_core: already 4 CPUs each
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3", "RANK_SIZE": "6"}, 16, 5),
    ({"MS_WORKER_NUM": "32"}, 16, 1),
    ({"PVT_DENSE_NUM_THREADS": "3", "MS_WORKER_NUM": "8"}, 16, 3),
])
def test_thread_count_per_process(environ, cpus, expected):
    assert kernel_library.default_thread_count(environ, cpus=cpus) == expected


def test_a_bad_thread_count_warns_and_is_chosen_automatically():
    with pytest.warns(RuntimeWarning, match="not a positive integer"):
        assert kernel_library.default_thread_count({"PVT_DENSE_NUM_THREADS": "many"}, cpus=2) == 2


# --- calling the kernels directly: shapes and the thread pool ------------------------------------------------------

def library_or_skip():
    compiled = fast_ops.kernels()
    if compiled is None:
        pytest.skip(f"kernels unavailable here: {fast_ops.fast_ops_status()[1]}")
    return compiled


def call(handle, name, arrays, shapes=None):
    """Call one aot entry point as MindSpore does: (status, arrays). `shapes` overrides what it is told."""
    shapes = [a.shape for a in arrays] if shapes is None else shapes
    n = len(arrays)
    params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * n)(*[len(s) for s in shapes])
    dims = [(ctypes.c_int64 * max(1, len(s)))(*s) for s in shapes]
    shape_ptrs = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
    dtypes = (ctypes.c_char_p * n)(*[b"float32"] * n)
    function = getattr(handle, name)
    function.restype = ctypes.c_int
    return function(n, params, ndims, shape_ptrs, dtypes, None, None)


@pytest.mark.bad_input("kernel call", "LayerNorm/Dense/attention kernels given tensors whose shapes do not fit "
                       "(gamma for another width, a weight for another input size, k and v of different lengths)",
                       "ValueError naming the kernel and the shapes before anything runs; the C++ entry points "
                       "refuse the same shapes (status 1) instead of reading out of bounds")
@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_shapes_that_do_not_fit_are_refused(mode):
    compiled = library_or_skip()
    x = ms.Tensor(np.ones((4, 8), np.float32))
    ms.set_context(mode=mode)
    try:
        with pytest.raises(ValueError, match="LayerNorm kernel: expected gamma and beta of shape"):
            fast_ops.LayerNorm(6)(x)
        if compiled.dense is not None:
            with pytest.raises(ValueError, match=r"Dense kernel: .*\(4, 8\), \(3, 6\), \(3,\)"):
                fast_ops.Dense(6, 3)(x)
            q, k, v = (ms.Tensor(np.ones(s, np.float32)) for s in ((2, 5, 4), (2, 7, 4), (2, 6, 4)))
            with pytest.raises(ValueError, match="attention kernel"):
                compiled.attention(q, k, v)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_the_entry_points_check_the_shapes_they_are_given():
    handle = library_or_skip().handle
    rng = np.random.default_rng(0)
    x, gamma, beta = rng.standard_normal((4, 8), np.float32), np.ones(8, np.float32), np.zeros(8, np.float32)
    eps, y = np.array([1e-5], np.float32), np.zeros((4, 8), np.float32)
    assert call(handle, "PvtLayerNorm", [x, gamma, beta, eps, y]) == 0
    np.testing.assert_allclose(y, (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5),
                               atol=1e-5)
    lying = [x.shape, (16,), (16,), eps.shape, y.shape]  # gamma "longer" than the rows: an out-of-bounds read
    assert call(handle, "PvtLayerNorm", [x, gamma, beta, eps, y], lying) == 1
    assert call(handle, "PvtGelu", [x, y], [(4, 8), (4, 9)]) == 1
    assert call(handle, "PvtGelu", [x, y], [(4, -8), (4, -8)]) == 1
    if hasattr(handle, "PvtDense"):
        w, b, out = np.ones((3, 8), np.float32), np.zeros(3, np.float32), np.zeros((4, 3), np.float32)
        assert call(handle, "PvtDense", [x, w, b, out]) == 0
        np.testing.assert_allclose(out, x @ w.T, atol=1e-5)
        assert call(handle, "PvtDense", [x, w, b, out], [(4, 8), (3, 9), (3,), (4, 3)]) == 1
        assert call(handle, "PvtDense", [x, w, b, out], [(4, 8), (3, 8), (3,), (5, 3)]) == 1
        # the whole MLP: a second weight for another hidden width, an output with more rows
        w1, b1, w2, b2 = np.ones((6, 8), np.float32), np.zeros(6, np.float32), np.ones((3, 6), np.float32), b
        assert call(handle, "PvtMlp", [x, w1, b1, w2, b2, out]) == 0
        assert call(handle, "PvtMlp", [x, w1, b1, w2, b2, out], [(4, 8), (6, 8), (6,), (3, 7), (3,), (4, 3)]) == 1
        assert call(handle, "PvtMlp", [x, w1, b1, w2, b2, out], [(4, 8), (6, 8), (6,), (3, 6), (3,), (5, 3)]) == 1
        # convolution: each entry takes only its own stride and "same" padding, and an output of the size they give
        image, weight = rng.standard_normal((1, 2, 5, 6), np.float32), np.ones((3, 2, 3, 3), np.float32)
        same, half = np.zeros((1, 3, 5, 6), np.float32), np.zeros((1, 3, 3, 3), np.float32)
        meta = np.array([1, 1, 0], np.float32)
        assert call(handle, "PvtConv2dStride1", [image, weight, b, meta, same]) == 0
        assert call(handle, "PvtConv2dStride2", [image, weight, b, np.array([2, 1, 0], np.float32), half]) == 0
        assert call(handle, "PvtConv2dStride1", [image, weight, b, meta, half]) == 1  # output of another size
        assert call(handle, "PvtConv2dStride2", [image, weight, b, meta, half]) == 1  # meta says stride 1
        assert call(handle, "PvtConv2dStride1", [image, weight, b, np.array([1, 0, 0], np.float32), same]) == 1
        assert call(handle, "PvtConv2dStride1", [image, weight, b, meta, same],
                    [(1, 2, 5, 6), (3, 4, 3, 3), (3,), (3,), (1, 3, 5, 6)]) == 1  # weight for 4 input channels


def test_the_thread_pool_gives_the_same_numbers_from_any_thread():
    handle = library_or_skip().handle
    handle.PvtSetThreadCount.argtypes = [ctypes.c_int]
    before = handle.PvtThreadCount()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4096, 64)).astype(np.float32)  # 2^18 values: split over the pool
    gamma, dy = rng.standard_normal(64).astype(np.float32), rng.standard_normal((4096, 64)).astype(np.float32)
    eps = np.array([1e-6], np.float32)

    def layer_norm_grad():
        dx, dgamma, dbeta = np.zeros_like(x), np.zeros(64, np.float32), np.zeros(64, np.float32)
        assert call(handle, "PvtLayerNormGrad", [x, gamma, dy, eps, dx, dgamma, dbeta]) == 0
        return dx, dgamma, dbeta

    def gelu():
        y = np.zeros_like(x)
        assert call(handle, "PvtGelu", [x, y]) == 0
        return y

    try:
        handle.PvtSetThreadCount(1)
        serial_grad, serial_gelu = layer_norm_grad(), gelu()
        assert handle.PvtSetThreadCount(3) == 3
        pooled = layer_norm_grad()
        # per-thread partial sums in double: equal to float rounding
        for ours, ref in zip(pooled, serial_grad, strict=True):
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
        np.testing.assert_array_equal(layer_norm_grad()[1], pooled[1])  # the pool splits the same way every call
        results = {}

        def worker(i):
            results[i] = [gelu() for _ in range(5)]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for outputs in results.values():  # concurrent callers: pool or own thread, the same bits
            for y in outputs:
                np.testing.assert_array_equal(y, serial_gelu)
    finally:
        handle.PvtSetThreadCount(before)


def test_the_loaded_library_uses_the_chosen_thread_count():
    compiled = library_or_skip()
    assert compiled.threads == kernel_library.default_thread_count()


def test_the_sources_build_as_units_side_by_side_and_as_one(tmp_path, monkeypatch):
    """The build compiles one unit per usable CPU, each including its share of the sources: so the sources must
    build whichever way they are grouped, as one unit (their internal names distinct) as well as one unit each."""
    sources = kernel_library.read_kernel_sources()
    flags, link, _ = kernel_library._build_attempts()[0]
    compiler = kernel_library._compiler()
    for cpus in (1, len(kernel_library.KERNEL_SOURCES)):
        monkeypatch.setattr(kernel_library, "usable_cpus", lambda: cpus)
        target = tmp_path / f"library_{cpus}.so"
        kernel_library._compile(compiler, sources, flags, link, str(target))
        assert os.path.isfile(kernel_library.record_path(str(target)))
        kernel_library.load_library(str(target), kernel_library.BASIC_KERNELS + kernel_library.CONTROL_SYMBOLS
                                    + kernel_library.DENSE_KERNELS)  # every entry point resolves
