"""A size-bounded LRU cache of verified objects on disk.

Entries are files named by their sha256 under `ROOT/objects/`. A fill streams
the source's chunks through a digest check into an unnamed temp inode and links
it into place only once verified, so a partial or corrupt download is never
visible (not even after `kill -9`). Concurrent requests for one object share a
single transfer. Used bytes plus bytes reserved by running downloads never
exceed `max_bytes`; pinned entries (in use by a caller) are never evicted.
One process owns a cache directory at a time (an flock guards it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from daemon.exceptions import DigestMismatch, ResourceExhausted, Unavailable
from daemon.storage.atomic_file import AtomicFile
from daemon.storage.digest import DigestCheck
from daemon.storage.source import ObjectReader

Opener = Callable[[], AbstractAsyncContextManager[ObjectReader]]

_DIGEST_NAME = re.compile(r"[0-9a-f]{64}")
# A fill is retried this often when its entry is evicted before the caller pins it.
_PIN_ATTEMPTS = 3


@dataclass(frozen=True, kw_only=True, slots=True)
class CachedObject:
    """A verified local copy; valid while the `DiskCache.get` block that yielded it runs."""

    path: Path
    sha256: str
    size: int


@dataclass(kw_only=True, slots=True)
class _Entry:
    size: int
    pins: int = 0


@dataclass(kw_only=True, slots=True)
class _Flight:
    task: asyncio.Task[str]
    waiters: int = 0


class DiskCache:
    """LRU of verified objects under `root`; `close()` releases the directory."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.root = root
        self.max_bytes = max_bytes
        self._objects = root / "objects"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_directory(root)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._aliases: dict[str, str] = {}
        self._inflight: dict[str, _Flight] = {}
        self._used = 0
        self._reserved = 0
        self._load()

    @property
    def used_bytes(self) -> int:
        """Bytes held by complete entries."""
        return self._used

    @property
    def reserved_bytes(self) -> int:
        """Bytes set aside for downloads in progress."""
        return self._reserved

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self._entries

    @contextlib.asynccontextmanager
    async def get(
        self,
        key: str,
        opener: Opener,
        *,
        expected_sha256: str | None = None,
        known_sha256: str | None = None,
        remember: bool = True,
    ) -> AsyncIterator[CachedObject]:
        """Yield a verified local copy of an object, pinned while the block runs.

        `expected_sha256` is what the bytes must hash to (from the ref);
        `known_sha256` is what the source said they hash to (a hint that finds
        a cached copy without any transfer). Without either, `key` (with
        `remember`) names the object across calls. Concurrent calls for one
        object share one transfer through `opener`. Raises DigestMismatch
        (nothing cached), ResourceExhausted (does not fit), and the source's
        errors.
        """
        digest = expected_sha256 or known_sha256 or (self._aliases.get(key) if remember else None)
        flight_key = expected_sha256 or known_sha256 or key
        for _ in range(_PIN_ATTEMPTS):
            if digest is not None and digest in self._entries:
                break
            digest = await self._join(flight_key, key, opener, expected_sha256, remember)
        else:
            raise ResourceExhausted(f"cache {self.root}: {key} was evicted before use; too small")
        entry = self._entries[digest]
        entry.pins += 1
        self._entries.move_to_end(digest)
        path = self._objects / digest
        with contextlib.suppress(OSError):
            os.utime(path)  # the LRU order survives a restart through mtimes
        try:
            yield CachedObject(path=path, sha256=digest, size=entry.size)
        finally:
            entry.pins -= 1

    def close(self) -> None:
        """Release the directory lock; entries stay on disk for the next owner."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _join(
        self, flight_key: str, key: str, opener: Opener, expected: str | None, remember: bool
    ) -> str:
        """Wait for the one transfer of `flight_key`, starting it if none runs."""
        flight = self._inflight.get(flight_key)
        if flight is None:
            task = asyncio.create_task(self._fill(key, opener, expected, remember))
            flight = _Flight(task=task)
            self._inflight[flight_key] = flight
            task.add_done_callback(lambda _: self._land(flight_key, flight))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            # The last waiter gone (cancelled): nobody needs the bytes any more.
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()

    def _land(self, flight_key: str, flight: _Flight) -> None:
        if self._inflight.get(flight_key) is flight:
            del self._inflight[flight_key]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved: waiters re-raise it themselves

    async def _fill(self, key: str, opener: Opener, expected: str | None, remember: bool) -> str:
        async with opener() as reader:
            info = reader.info
            if expected is not None and info.sha256 is not None and info.sha256 != expected:
                raise DigestMismatch(
                    f"{key}: the source holds sha256 {info.sha256}, expected {expected}"
                )
            check = DigestCheck(
                what=f"download of {key}",
                expected_sha256=expected or info.sha256,
                expected_size=info.size,
            )
            self._reserve(info.size, key)
            try:
                digest = await self._stream(reader, check)
            finally:
                self._reserved -= info.size
        if remember:
            self._aliases[key] = digest
        return digest

    async def _stream(self, reader: ObjectReader, check: DigestCheck) -> str:
        with AtomicFile(self._objects) as out:
            async for chunk in reader.chunks:
                await asyncio.to_thread(_write, out, check, chunk)
            digest = check.finish()
            if digest not in self._entries:
                commit = asyncio.ensure_future(
                    asyncio.to_thread(out.commit, self._objects / digest, overwrite=True)
                )
                # Registered by callback: a commit finishing after its caller was
                # cancelled still lands in the index, never as an uncounted file.
                commit.add_done_callback(lambda done: self._add(done, digest, check.size))
                await asyncio.shield(commit)
        return digest

    def _add(self, commit: asyncio.Future[bool], digest: str, size: int) -> None:
        if commit.cancelled() or commit.exception() is not None:
            return
        if digest not in self._entries:  # a fill under another key may have landed first
            self._entries[digest] = _Entry(size=size)
            self._used += size

    def _reserve(self, size: int, key: str) -> None:
        """Set `size` bytes aside, evicting unpinned LRU entries; raises ResourceExhausted."""
        if size > self.max_bytes:
            raise ResourceExhausted(
                f"{key} has {size} bytes, more than the cache's bound of {self.max_bytes}"
            )
        for digest in list(self._entries):
            if self._used + self._reserved + size <= self.max_bytes:
                break
            if self._entries[digest].pins == 0:
                self._evict(digest)
        if self._used + self._reserved + size > self.max_bytes:
            raise ResourceExhausted(
                f"cache {self.root} cannot make room for {key} ({size} bytes):"
                " the rest is in use or being downloaded"
            )
        self._reserved += size

    def _evict(self, digest: str) -> None:
        entry = self._entries.pop(digest)
        self._used -= entry.size
        (self._objects / digest).unlink(missing_ok=True)
        for alias in [k for k, d in self._aliases.items() if d == digest]:
            del self._aliases[alias]

    def _load(self) -> None:
        """Index the entries a previous owner left, oldest first; drop anything else."""
        found: list[tuple[float, str, int]] = []
        for path in self._objects.iterdir():
            stat = path.lstat()
            if _DIGEST_NAME.fullmatch(path.name) and path.is_file():
                found.append((stat.st_mtime, path.name, stat.st_size))
            else:
                path.unlink(missing_ok=True)  # named temps from a non-O_TMPFILE filesystem
        for _, digest, size in sorted(found):
            self._entries[digest] = _Entry(size=size)
            self._used += size
        for digest in list(self._entries):
            if self._used <= self.max_bytes:
                break
            self._evict(digest)


def _write(out: AtomicFile, check: DigestCheck, chunk: bytes) -> None:
    check.update(chunk)
    out.write(chunk)


def _lock_directory(root: Path) -> int:
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Unavailable(f"cache directory {root} is in use by another process") from None
    return fd
