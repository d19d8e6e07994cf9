"""One run per output folder: a second training run started into a folder another live run writes to is refused.

The lock is an exclusive `flock` on `<run dir>/.run.lock`, held for as long as the run's process lives. The kernel
drops it when that process dies however it dies (kill -9 included), so a lock left by a dead run is taken over by
the next run without anyone deleting files; the file's content (pid, host, start time) only names the owner in the
error message. Within one process the lock is shared: a process resuming its own run in the same folder is the
same run.

The lock file is opened without following a symlink and without blocking, and refused (a PVTDenseError naming it)
unless it is a regular file with one link: its content is rewritten, so a hard link to another file, a FIFO or a
device in its place must never be written through.
"""
import errno
import fcntl
import json
import os
import socket
import stat
import threading
import time
import warnings
import weakref

from ..errors import PVTDenseError

LOCK_NAME = ".run.lock"


class RunDirectoryBusyError(PVTDenseError):
    """Another live run owns the output folder."""


_held = {}  # real path of the folder -> [file descriptor, holders]
_guard = threading.Lock()


def _describe_owner(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"process {int(owner['pid'])} on {str(owner['host'])[:80]}, started {str(owner['started'])[:40]}"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "another process"


class RunLock:
    """Holds the lock on `directory` until `release()` or until this object is garbage collected."""

    def __init__(self, directory):
        self.directory = os.path.realpath(os.fspath(directory))
        self.path = os.path.join(self.directory, LOCK_NAME)
        with _guard:
            if self.directory in _held:
                _held[self.directory][1] += 1
            else:
                _held[self.directory] = [self._acquire(), 1]
        self._finalizer = weakref.finalize(self, _drop, self.directory)

    def _acquire(self):
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                fd = os.open(self.path, flags)  # a lock left by an earlier run: checked below before any write
        except OSError as err:
            raise PVTDenseError(f"cannot create the run lock {self.path}: {err.strerror or err}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise PVTDenseError(f"the run lock {self.path} is not a regular file (a FIFO, device or socket); "
                                    "remove it")
            if info.st_nlink != 1:
                raise PVTDenseError(f"the run lock {self.path} has {info.st_nlink} hard links, so writing it would "
                                    "change another file; remove it")
        except BaseException:
            os.close(fd)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                # A filesystem without locks (some network mounts): run unguarded rather than not at all.
                warnings.warn(f"cannot lock {self.path} ({err.strerror}); nothing stops a second run from writing "
                              "into the same folder", RuntimeWarning, stacklevel=3)
                return fd
            owner = _describe_owner(fd)
            os.close(fd)
            raise RunDirectoryBusyError(
                f"output folder {self.directory} is in use by another run ({owner}); wait for it to finish or "
                "choose another ckpt_save_dir") from None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return fd

    def release(self):
        self._finalizer()


def _drop(directory):
    with _guard:
        entry = _held.get(directory)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[directory]
            os.close(entry[0])  # closing the descriptor releases the flock
