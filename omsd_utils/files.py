"""File-system helpers shared by the dataset writer, the generators, the training scripts, the behaviour trainer and
the benchmark tools: advisory locks (fcntl), writability checks that create nothing, removal of stale temporary
files, rows appended to a JSONL file."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time


class LockFile:
    """An exclusive `fcntl.flock` lock on `path` (created if needed; it holds the owner's pid).

    The owner removes the file when it releases the lock. A process killed while holding it leaves the file
    behind, but the kernel drops the lock, so the next `acquire` takes it over. Whoever acquires checks that
    the file it locked is still the one at `path` (not one removed meanwhile by the previous owner), so two
    processes never both hold the lock."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def holder(self) -> str:
        """The pid written by the current owner ('' when unknown)."""
        try:
            with open(self.path) as f:
                return f.read().strip()
        except OSError:
            return ""

    def acquire(self, blocking: bool = True, on_wait=None, on_poll=None) -> bool:
        """Take the lock. blocking=False: return False at once if another process holds it. Otherwise wait,
        calling on_wait(holder pid) once first and on_poll() every 0.1 s (it may raise to stop waiting).
        OSError if the lock file cannot be created."""
        waited = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if not blocking:
                            os.close(fd)
                            return False
                        if not waited and on_wait is not None:
                            on_wait(self.holder())
                        waited = True
                        if on_poll is not None:
                            on_poll()
                        time.sleep(0.1)
                st = os.fstat(fd)
                try:
                    now = os.stat(self.path)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # the previous owner removed it while we waited: lock the file now there
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except BaseException:
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise
            self.fd = fd
            return True

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still holding it: see the class docstring
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def lock_path(path: str) -> str:
    """The lock file that guards `path` (a dataset, a stage-1 cache file, a run marker, a checkpoint)."""
    return path[: -len(".pt")] + ".lock" if path.endswith(".pt") else path + ".lock"


def remove_stale(directory: str, pattern: str) -> list[str]:
    """Remove the files in `directory` whose whole name matches the regex `pattern` (temporaries of an
    interrupted write); call it only while holding the lock of the file they belong to, so that no live
    writer's temporary is touched. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return removed
    for name in names:
        if re.fullmatch(pattern, name):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def unwritable_dir(path: str) -> str:
    """Why files could not be created in directory `path` ('' if they can), found without creating anything:
    the nearest existing ancestor must be a directory in which a file can be made."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        return f"{e.strerror or e} in {probe}"
    return ""


def describe_write_error(e: BaseException, directory: str) -> str:
    """A short reason for a failed write into `directory`: the OS error, or for torch's zip writer (whose
    RuntimeError, e.g. 'unexpected pos 704 vs 598', hides it) what the directory says."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    for code in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
        if os.strerror(code) in text:
            return os.strerror(code)
    try:
        if shutil.disk_usage(directory).free < 2**20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    if unwritable_dir(directory):
        return unwritable_dir(directory)
    return f"torch: {text.strip().splitlines()[0][:200]}" if text.strip() else type(e).__name__


def append_row(path, row: dict):
    """`row` as one JSON line, in one write() on an O_APPEND descriptor, so lines of two writers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)
