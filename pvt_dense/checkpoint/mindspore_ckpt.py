"""The one door to `mindspore.load_checkpoint`: every read of a MindSpore .ckpt in pvt_dense goes through
`load_mindspore_checkpoint`.

Why a door: MindSpore 2.10 refuses a .ckpt larger than the machine's *free* memory (`os.sysconf("SC_AVPHYS_PAGES")`,
i.e. MemFree). Free memory leaves out the page cache, which the kernel hands back on demand, so after a large copy,
a pip install or a test suite the figure can be a few hundred MB on a 24 GB machine with 20 GB available, and a
200 MB checkpoint is refused ("exceeds current available memory"). The guard itself is sound (the protobuf is read
whole), only its reading is wrong; during our call it reads MemAvailable from /proc/meminfo instead, which is the
kernel's own estimate of what can be allocated without swapping. Where /proc/meminfo or the guard is missing
(another OS, another MindSpore), MindSpore's own check stands unchanged.
"""
import contextlib
import os
import threading

_PATCH_LOCK = threading.Lock()


def mem_available_bytes(meminfo_path="/proc/meminfo"):
    """The kernel's MemAvailable in bytes, or None where it cannot be read."""
    try:
        with open(meminfo_path, "rb") as handle:
            for line in handle:
                if line.startswith(b"MemAvailable:"):
                    fields = line.split()
                    if len(fields) >= 2 and fields[1].isdigit():
                        factor = 1024 if len(fields) < 3 or fields[2].lower() == b"kb" else 1
                        return int(fields[1]) * factor
                    return None
    except OSError:
        return None
    return None


@contextlib.contextmanager
def _guard_reads_mem_available():
    from mindspore.train import serialization
    original = getattr(serialization, "_get_available_memory", None)
    if original is None or mem_available_bytes() is None:
        yield
        return

    def available():
        measured = mem_available_bytes()
        return measured if measured is not None else original()

    # Module-level state: one patched call at a time, and the original is always put back.
    with _PATCH_LOCK:
        serialization._get_available_memory = available
        try:
            yield
        finally:
            serialization._get_available_memory = original


def load_mindspore_checkpoint(path, **kwargs):
    """`mindspore.load_checkpoint(path, **kwargs)` with its memory guard measuring available, not free, memory.
    Errors are MindSpore's (a file too large for the memory gets a short ValueError of ours instead of its
    paragraph); callers turn them into CheckpointError with the file's name."""
    import mindspore as ms
    from mindspore.train import serialization
    too_large = getattr(serialization, "_CheckpointProtobufSizeError", ())
    with _guard_reads_mem_available():
        try:
            return ms.load_checkpoint(path, **kwargs)
        except too_large:
            available = serialization._get_available_memory()
    raise ValueError(f"the file is {os.path.getsize(path) / 1e6:.1f} MB and only {(available or 0) / 1e6:.1f} MB "
                     "of memory is available (MindSpore reads a .ckpt whole)") from None
