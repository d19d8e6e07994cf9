"""Whole files or nothing: every file pvt_dense writes for a user goes through a temporary file in the same folder
and one `os.replace`, so a crash or a kill never leaves a half-written file under the final name: `write_atomic`
when pvt_dense writes the bytes, `publish` when a library writes the temporary by name (MindSpore's checkpoints
and exports)."""
import glob
import os
import uuid

TEMP_PREFIX = ".tmp-"


def fsync_file(path):
    # Read-only descriptors are enough for fsync on POSIX (MindSpore leaves checkpoints 0400).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory):
    """Make a rename durable; filesystems that cannot fsync a directory lose only that durability."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path, prefix=TEMP_PREFIX, suffix=""):
    """A fresh hidden name beside `path` (same filesystem, so the final rename is atomic)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{prefix}{uuid.uuid4().hex[:12]}-{name}{suffix}")


def write_atomic(path, data=None, writer=None, durable=True, prefix=TEMP_PREFIX, suffix=""):
    """Write `data` (bytes), or whatever `writer(handle)` writes to a binary handle, to `path` atomically.

    `durable=False` skips the fsyncs, for callers that sync a whole batch of files at once.
    """
    temp = temp_path_for(path, prefix, suffix)
    try:
        with open(temp, "xb") as handle:
            if writer is not None:
                writer(handle)
            else:
                handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    if durable:
        fsync_directory(os.path.dirname(os.path.abspath(path)))
    return path


def remove_temporaries(temp_path):
    """Remove a temporary and whatever MindSpore derived from its name (it writes `<stem>.tmp`, then renames)."""
    stem = os.path.splitext(temp_path)[0]
    for leftover in glob.glob(glob.escape(stem) + ".*"):
        try:
            os.remove(leftover)
        except OSError:
            pass


def publish(temp_path, final_path):
    """Make a finished temporary (one that a library wrote by name, e.g. MindSpore's `save_checkpoint`) visible
    under its final name: fsync, `os.replace`, fsync the folder; on failure the temporary is removed."""
    try:
        fsync_file(temp_path)
        os.replace(temp_path, final_path)
    except BaseException:
        remove_temporaries(temp_path)
        raise
    fsync_directory(os.path.dirname(os.path.abspath(final_path)))
