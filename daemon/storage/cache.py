"""A size-bounded LRU cache of verified objects on disk.

Entries are files named by their sha256 under `ROOT/objects/`. A fill streams
the source's chunks through a digest check into an unnamed temp inode and links
it into place only once verified, so a partial or corrupt download is never
visible (not even after `kill -9`). Every hit re-hashes the entry before it is
handed out (a disk that flips a bit must not feed a guest wrong bytes); callers
pinning one entry at once share that check while the file is unchanged, and a
corrupt entry is dropped and fetched again. Concurrent requests for one object
share a single transfer. Used bytes plus bytes reserved by running downloads
never exceed `max_bytes`; pinned entries (in use by a caller) are never evicted.
One process owns a cache directory at a time (an flock guards it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from daemon import metrics
from daemon.exceptions import DigestMismatch, ResourceExhausted, Unavailable
from daemon.storage.atomic_file import AtomicFile
from daemon.storage.digest import DigestCheck, file_matches
from daemon.storage.source import ObjectReader

log = logging.getLogger(__name__)

Opener = Callable[[], AbstractAsyncContextManager[ObjectReader]]
# What tells a file was not rewritten or replaced since it was hashed.
Stamp = tuple[int, int, int, int, int]

_DIGEST_NAME = re.compile(r"[0-9a-f]{64}")
# A fill is retried this often when its entry is evicted before the caller pins it.
_PIN_ATTEMPTS = 3
# A corrupt entry is fetched again once; corrupt again, the get fails.
_CORRUPT_ATTEMPTS = 2


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
    # The hash of the bytes shared by the callers pinning the entry now: the
    # file's stamp when it matched its digest, None when it did not. Forgotten
    # when the last pin goes, so the next hit hashes again.
    check: asyncio.Future[Stamp | None] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class _Filled:
    digest: str
    stamp: Stamp | None  # the new file's stamp, None if an entry was already there


@dataclass(kw_only=True, slots=True)
class _Flight:
    task: asyncio.Task[_Filled]
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
        object share one transfer through `opener`. A cached copy is re-hashed
        before it is yielded; one that no longer matches its digest is dropped
        and fetched again. Raises DigestMismatch (the bytes fetched do not
        match, or the copy rotted again), ResourceExhausted (does not fit), and
        the source's errors.
        """
        flight_key = expected_sha256 or known_sha256 or key
        for _ in range(_CORRUPT_ATTEMPTS):
            digest, fresh = await self._present(
                flight_key,
                key,
                opener,
                expected=expected_sha256,
                known=known_sha256,
                remember=remember,
            )
            entry = self._entries[digest]
            entry.pins += 1
            self._entries.move_to_end(digest)
            try:
                intact = await self._check(digest, entry, fresh)
            except BaseException:
                self._unpin(entry)
                raise
            if intact:
                break
            self._unpin(entry)
            self._drop_corrupt(digest, entry, key)
        else:
            raise DigestMismatch(
                f"cache {self.root}: {key} (sha256 {digest}) was corrupt on disk again"
                " after it was fetched anew"
            )
        try:
            yield CachedObject(path=self._objects / digest, sha256=digest, size=entry.size)
        finally:
            self._unpin(entry)

    def close(self) -> None:
        """Release the directory lock; entries stay on disk for the next owner."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _present(
        self,
        flight_key: str,
        key: str,
        opener: Opener,
        *,
        expected: str | None,
        known: str | None,
        remember: bool,
    ) -> tuple[str, Stamp | None]:
        """The digest of an entry holding the object, filling it if none does.

        Also the stamp of the file when this call waited for the fill that wrote
        it (those bytes were hashed on their way in), else None.
        """
        digest = expected or known or (self._aliases.get(key) if remember else None)
        fresh: Stamp | None = None
        for _ in range(_PIN_ATTEMPTS):
            if digest is not None and digest in self._entries:
                return digest, fresh
            filled = await self._join(flight_key, key, opener, expected, remember)
            digest, fresh = filled.digest, filled.stamp
        raise ResourceExhausted(f"cache {self.root}: {key} was evicted before use; too small")

    async def _check(self, digest: str, entry: _Entry, fresh: Stamp | None) -> bool:
        """Whether the pinned entry's file still holds the bytes its name says.

        Hashes the file in a thread, unless a check made while the entry stayed
        pinned (or the fill this caller waited for) vouches for the file as it
        is now. Concurrent callers share one running check.
        """
        path = self._objects / digest
        check = entry.check
        if check is not None and check.done():
            stamp = check.result()
            if stamp is None or stamp != await asyncio.to_thread(_stamp, path):
                check = None  # rewritten since (or already found bad): hash it again
        if check is None and fresh is not None and fresh == await asyncio.to_thread(_stamp, path):
            check = asyncio.get_running_loop().create_future()
            check.set_result(fresh)
        if check is None:
            check = asyncio.ensure_future(asyncio.to_thread(_hash_entry, path, digest, entry.size))
        entry.check = check
        return await asyncio.shield(check) is not None

    def _unpin(self, entry: _Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0:
            entry.check = None

    def _drop_corrupt(self, digest: str, entry: _Entry, key: str) -> None:
        """Forget an entry whose file does not match its digest (whoever pins it)."""
        if self._entries.get(digest) is not entry:
            return  # another caller of the same check dropped it already
        log.warning(
            "cache entry %s (for %s) does not match its sha256: dropped, fetching it again",
            digest,
            key,
        )
        metrics.cache_entry_corrupt()
        self._remove(digest)

    async def _join(
        self, flight_key: str, key: str, opener: Opener, expected: str | None, remember: bool
    ) -> _Filled:
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

    async def _fill(
        self, key: str, opener: Opener, expected: str | None, remember: bool
    ) -> _Filled:
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
                filled = await self._stream(reader, check)
            finally:
                self._reserved -= info.size
        if remember:
            self._aliases[key] = filled.digest
        return filled

    async def _stream(self, reader: ObjectReader, check: DigestCheck) -> _Filled:
        with AtomicFile(self._objects) as out:
            async for chunk in reader.chunks:
                await asyncio.to_thread(_write, out, check, chunk)
            digest = check.finish()
            if digest in self._entries:
                return _Filled(digest=digest, stamp=None)
            commit = asyncio.ensure_future(asyncio.to_thread(_commit, out, self._objects / digest))
            # Registered by callback: a commit finishing after its caller was
            # cancelled still lands in the index, never as an uncounted file.
            commit.add_done_callback(lambda done: self._add(done, digest, check.size))
            return _Filled(digest=digest, stamp=await asyncio.shield(commit))

    def _add(self, commit: asyncio.Future[Stamp | None], digest: str, size: int) -> None:
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
                self._remove(digest)
        if self._used + self._reserved + size > self.max_bytes:
            raise ResourceExhausted(
                f"cache {self.root} cannot make room for {key} ({size} bytes):"
                " the rest is in use or being downloaded"
            )
        self._reserved += size

    def _remove(self, digest: str) -> None:
        """Forget an entry and its aliases and delete its file."""
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
            self._remove(digest)


def _write(out: AtomicFile, check: DigestCheck, chunk: bytes) -> None:
    check.update(chunk)
    out.write(chunk)


def _commit(out: AtomicFile, dest: Path) -> Stamp | None:
    out.commit(dest, overwrite=True)
    return _stamp(dest)


def _stamp(path: Path) -> Stamp | None:
    """Identity and change times of a file (None if it is gone): a rewrite changes them."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_entry(path: Path, digest: str, size: int) -> Stamp | None:
    """Touch the entry (the LRU order survives a restart through mtimes), then hash it.

    Returns the stamp taken before hashing if the bytes match, else None.
    """
    try:
        os.utime(path)
    except FileNotFoundError:
        return None
    stamp = _stamp(path)
    if stamp is None or not file_matches(path, sha256=digest, size=size):
        return None
    return stamp


def _lock_directory(root: Path) -> int:
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Unavailable(f"cache directory {root} is in use by another process") from None
    return fd
