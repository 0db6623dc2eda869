"""A worker's /output: a tmpfs whose bounds the kernel enforces while the guest runs.

Each worker mounts a tmpfs on its own `output` folder, in its own mount
namespace (`mount_ns`), sized from the run's limits: output_bytes plus a small
slack (`limits.output_fs_bytes`, at most 64 MiB more) and output_files plus a
few folders (`limits.output_fs_inodes`; tmpfs counts every name, hard links
too). A guest writing past either gets ENOSPC from the kernel, however large
its writes; nothing it writes ever reaches the peer's disk on its own.

/output is therefore memory-backed: a worker holds at most output_bytes (plus
the slack) of memory in it while a guest runs, and its files are copied to
disk, into the run's output folder, only when the run succeeded within the
limits. Whatever else a run ends with, the tmpfs is emptied and no output is
reported, so nothing of a failed attempt can be uploaded.

The bound is the mount. `OutputWatcher` only makes the end prompt: while a
guest runs it checks the tmpfs every 50 ms and ends a guest that crossed a
limit, even one that ignores ENOSPC and loops, or sleeps in a host call.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from daemon.exceptions import InvalidArgument
from daemon.executors import result as results
from daemon.executors import staging
from daemon.executors.result import ExecutionResult, OutputFile
from daemon.executors.wasm.limits import OUTPUT_FOLDERS, Limits, output_fs_bytes, output_fs_inodes
from daemon.executors.wasm.mount_ns import PrivateMounts, mount_tmpfs, unmount

PAGE = os.sysconf("SC_PAGESIZE")
_REMOVE_AT_MOST = 8  # names; past this a fresh tmpfs is cheaper than removing them


@dataclass(frozen=True, slots=True)
class Usage:
    """What statvfs says of the tmpfs."""

    bytes_used: int  # whole pages
    names_used: int  # files, folders and links, the root folder not counted
    full: bool  # not one free page: a write was (or would be) refused
    out_of_names: bool


@dataclass(frozen=True, slots=True)
class Found:
    """The regular files in the tmpfs (relative name, size), or why they are over a limit."""

    files: tuple[tuple[str, int], ...]
    over: ExecutionResult | None


class OutputMount:
    """The tmpfs on one worker's output folder. Use from one thread, except `crossed`."""

    def __init__(self, mounts: PrivateMounts, path: Path, limits: Limits) -> None:
        """Mount it, bounded for `limits`. Raises Unavailable when the kernel refuses."""
        self._mounts = mounts
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._bounds = _bounds(limits)
        mount_tmpfs(mounts, path, size=self._bounds[0], inodes=self._bounds[1])
        self._mounted = True

    def close(self) -> None:
        if self._mounted:
            self._mounted = False
            unmount(self._mounts, self.path)

    def prepare(self, limits: Limits) -> None:
        """Bound the (empty) tmpfs for `limits`: a remount only when they differ from the last."""
        bounds = _bounds(limits)
        if bounds != self._bounds:
            mount_tmpfs(self._mounts, self.path, size=bounds[0], inodes=bounds[1], remount=True)
            self._bounds = bounds

    def usage(self) -> Usage:
        info = os.statvfs(self.path)
        return Usage(
            bytes_used=(info.f_blocks - info.f_bfree) * info.f_frsize,
            names_used=info.f_files - info.f_ffree - 1,
            full=info.f_bfree == 0,
            out_of_names=info.f_ffree == 0,
        )

    def crossed(self, limits: Limits) -> ExecutionResult | None:
        """Why what the running guest wrote so far crosses a limit; None while it does not.

        Safe from another thread. One statvfs; the files are listed only when
        the pages or names in use exceed a limit (partly used pages and
        folders may explain that).
        """
        usage = self.usage()
        if usage.full:
            return results.output_bytes_exceeded(limits.output_bytes)
        if (
            usage.out_of_names
            or usage.bytes_used > limits.output_bytes
            or usage.names_used > limits.output_files
        ):
            return self.find(limits, usage).over
        return None

    def find(self, limits: Limits, usage: Usage | None = None) -> Found:
        """The files the guest left, or why they cross a limit. One statvfs when it left nothing.

        A full tmpfs crosses output_bytes; names all used up cross
        output_files. The listing stops at the first file past a limit.
        """
        usage = usage or self.usage()
        if usage.names_used <= 0:
            return Found((), None)
        if usage.full:
            return Found((), results.output_bytes_exceeded(limits.output_bytes))
        files: list[tuple[str, int]] = []
        total = 0
        for name, size in _regular_files(self.path):
            files.append((name, size))
            total += size
            if len(files) > limits.output_files:
                return Found((), results.output_files_exceeded(limits.output_files))
            if total > limits.output_bytes:
                return Found((), results.output_bytes_exceeded(limits.output_bytes))
        if usage.out_of_names:
            return Found((), results.output_names_exceeded(limits.output_files, OUTPUT_FOLDERS))
        return Found(tuple(sorted(files)), None)

    def copy_out(
        self, files: tuple[tuple[str, int], ...], output_dir: Path, *, given: bool
    ) -> tuple[OutputFile, ...]:
        """Copy `files` (from `find`) to `output_dir`, made here unless `given`.

        Raises InvalidArgument when they cannot be written (nothing of them is left then).
        """
        if not files:
            return ()
        outputs = []
        try:
            if not given:
                output_dir.mkdir()
            made = {output_dir}
            for name, size in files:
                target = output_dir / name
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                shutil.copyfile(self.path / name, target, follow_symlinks=False)
                outputs.append(OutputFile(name=name, path=target, size=size))
        except OSError as exc:
            if given:
                staging.empty_dir(output_dir)
            else:
                shutil.rmtree(output_dir, ignore_errors=True)
            raise InvalidArgument(f"cannot copy outputs to {output_dir}: {exc}") from exc
        return tuple(outputs)

    def empty(self) -> None:
        """Leave the tmpfs empty: one statvfs when it is; a few names are removed
        (~15 us each), more get a fresh tmpfs instead (~100 us, whatever is in it)."""
        names = self.usage().names_used
        if names <= 0:
            return
        if names <= _REMOVE_AT_MOST:
            staging.empty_dir(self.path)
            if self.usage().names_used <= 0:
                return
        unmount(self._mounts, self.path)
        mount_tmpfs(self._mounts, self.path, size=self._bounds[0], inodes=self._bounds[1])


def _bounds(limits: Limits) -> tuple[int, int]:
    return output_fs_bytes(limits, PAGE), output_fs_inodes(limits)


def _regular_files(root: Path) -> Iterator[tuple[str, int]]:
    """(name relative to `root`, size) of each regular file below it; links are never
    followed. Entries that vanish while a guest runs are skipped."""
    pending = [""]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(root / folder if folder else root) as entries:
                for entry in entries:
                    name = f"{folder}/{entry.name}" if folder else entry.name
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(info.st_mode):
                        yield name, info.st_size
                    elif stat.S_ISDIR(info.st_mode):
                        pending.append(name)
        except (FileNotFoundError, NotADirectoryError):
            continue


@dataclass(slots=True)
class Watch:
    """One run under watch: its limits, how to end its guest, and what crossed."""

    limits: Limits
    interrupt: Callable[[], None]  # ends the guest at its next epoch check
    abandon: Callable[[ExecutionResult], None]  # reports the result, then the worker exits
    began: float
    exceeded: ExecutionResult | None = None
    interrupted_at: float = 0.0


class OutputWatcher:
    """A thread that ends a guest soon after it crosses an /output limit.

    Every `interval_s` while a run is watched: `OutputMount.crossed`. On a
    crossing it interrupts the guest (an epoch increment, as for a full
    stdout; it never touches the Store); a guest still running `grace_s`
    later is blocked in a host call, and the run is abandoned: its result
    is reported and the worker exits. Only the mount bounds the bytes; this
    only bounds the time.
    """

    def __init__(
        self, output: OutputMount, *, interval_s: float = 0.05, grace_s: float = 0.3
    ) -> None:
        self._output = output
        self._interval_s = interval_s
        self._grace_s = grace_s
        self._lock = threading.Lock()  # held to act on a run and to end its watch
        self._watch: Watch | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="output-watcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def watching(
        self,
        limits: Limits,
        *,
        interrupt: Callable[[], None],
        abandon: Callable[[ExecutionResult], None],
    ) -> Iterator[Watch]:
        """Watch the run inside the block; once it ends, nothing acts on that run any more."""
        watch = Watch(limits, interrupt, abandon, began=time.perf_counter())
        self._watch = watch  # no wake-up: the next tick sees it
        try:
            yield watch
        finally:
            with self._lock:
                self._watch = None

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            watch = self._watch
            if watch is not None:
                self._check(watch)

    def _check(self, watch: Watch) -> None:
        if watch.exceeded is None:
            crossed = self._output.crossed(watch.limits)
            if crossed is None:
                return
            with self._lock:
                if self._watch is watch:
                    watch.exceeded = crossed
                    watch.interrupted_at = time.perf_counter()
                    watch.interrupt()
        elif time.perf_counter() - watch.interrupted_at >= self._grace_s:
            with self._lock:
                if self._watch is watch:
                    watch.abandon(
                        watch.exceeded.with_capture(
                            stdout=b"",
                            stderr=b"",
                            duration_s=time.perf_counter() - watch.began,
                            fuel_consumed=None,
                        )
                    )
