"""Files that appear under their final name complete or not at all.

Bytes go to an unnamed inode (`O_TMPFILE`), so a process killed mid-write
leaves nothing behind; `commit` fsyncs and links it into place. Where the
filesystem lacks `O_TMPFILE`, a hidden `.tmp-*` file stands in and
`remove_stale_temps` clears what a crash left.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
import time
from pathlib import Path
from types import TracebackType

from daemon.exceptions import ResourceExhausted

TEMP_PREFIX = ".tmp-"
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}


class AtomicFile:
    """A write-only file made visible by `commit`; `abort` (or an exception) discards it.

    Methods may be called from worker threads: a lock keeps `abort` (say, from a
    cancelled task) from closing the descriptor under a write still running.
    """

    def __init__(self, directory: Path, *, mode: int = 0o444) -> None:
        self.directory = directory
        self.mode = mode
        self._temp_path: Path | None = None
        try:
            self._fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE or not directory.is_dir():
                raise
            self._temp_path = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._fd = os.open(self._temp_path, flags, 0o600)
        self._closed = False
        self._synced = False
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        """Append `data`; raises ResourceExhausted when the disk is full."""
        view = memoryview(data)
        with self._lock:
            self._check_open()
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhausted(f"no space left in {self.directory}") from exc
                raise

    def sync(self) -> None:
        """Make the bytes durable (still invisible); `commit` then only links them."""
        with self._lock:
            self._check_open()
            self._sync()

    def commit(self, dest: Path, *, overwrite: bool = True) -> bool:
        """Make the bytes durable and visible at `dest` (same filesystem).

        With `overwrite=False` an existing `dest` is kept and False returned,
        which suits content-addressed names. The file is closed either way.
        """
        with self._lock:
            self._check_open()
            try:
                self._sync()
                linked = self._link(dest, overwrite=overwrite)
                _fsync_dir(dest.parent)
                return linked
            finally:
                self._close()

    def abort(self) -> None:
        """Discard the bytes unless already committed; idempotent."""
        with self._lock:
            self._close()

    def _sync(self) -> None:
        if not self._synced:
            os.fchmod(self._fd, self.mode)
            os.fsync(self._fd)
            self._synced = True

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("AtomicFile already committed or aborted")

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._fd)
        if self._temp_path is not None:
            self._temp_path.unlink(missing_ok=True)

    def _link(self, dest: Path, *, overwrite: bool) -> bool:
        target = dest.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}" if overwrite else dest
        try:
            if self._temp_path is not None:
                os.link(self._temp_path, target)
            else:
                # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names the unnamed inode.
                proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.link(str(self._fd), target, src_dir_fd=proc_fd, follow_symlinks=True)
                finally:
                    os.close(proc_fd)
        except FileExistsError:
            return False
        if overwrite:
            try:
                os.replace(target, dest)
            except BaseException:
                target.unlink(missing_ok=True)  # say `dest` is a directory: leave no temp
                raise
        return True

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


def remove_stale_temps(directory: Path, *, older_than: float = 0.0) -> int:
    """Delete `.tmp-*` leftovers older than `older_than` seconds; returns how many."""
    removed = 0
    cutoff = time.time() - older_than
    for path in directory.glob(f"{TEMP_PREFIX}*"):
        try:
            if path.lstat().st_mtime <= cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
