"""Resolve an object ref through the right backend into the verified disk cache."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from daemon import metrics
from daemon.exceptions import FailedPrecondition, ObjectNotFound
from daemon.storage.atomic_file import TEMP_PREFIX, AtomicFile
from daemon.storage.cache import CachedObject, DiskCache
from daemon.storage.local_store import LocalSource, LocalStore
from daemon.storage.refs import ObjectRef, Scheme, parse_ref
from daemon.storage.source import CHUNK_SIZE, ObjectInfo, ObjectReader, ObjectSource


class Fetcher:
    """Fetches `anvil://`, `s3://` and `sha256:` refs into a DiskCache.

    `anvil://` refs go to `anvil` (a real cluster or a peer's store) when given,
    else to the `local` store; `s3://` refs to `s3`; `sha256:` refs are found
    in the cache or among the local store's blobs.
    """

    def __init__(
        self,
        cache: DiskCache,
        *,
        local: LocalStore | None = None,
        anvil: ObjectSource | None = None,
        s3: ObjectSource | None = None,
    ) -> None:
        self.cache = cache
        self._local = LocalSource(local) if local is not None else None
        self._anvil = anvil or self._local
        self._s3 = s3

    @contextlib.asynccontextmanager
    async def open(self, ref: ObjectRef | str) -> AsyncIterator[CachedObject]:
        """Yield a verified cached copy of `ref`, safe from eviction inside the block.

        Raises InvalidArgument (bad ref), ObjectNotFound, DigestMismatch (the
        bytes or the source's digest differ from the ref's; nothing cached),
        ResourceExhausted, Unavailable, FailedPrecondition (no backend for the
        ref's scheme).
        """
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        source = self._source(ref)
        opener = metrics.MeteredOpener(functools.partial(source.open, ref), source=source)
        if ref.sha256 is not None:
            async with self.cache.get(ref.location, opener, expected_sha256=ref.sha256) as obj:
                opener.count_lookup()
                yield obj
            return
        info = await source.head(ref)
        # Without a digest, the version (or etag) tells a cached copy is current.
        stamp = ref.version or info.version_id or info.etag
        async with self.cache.get(
            f"{ref.location}@{stamp}",
            opener,
            known_sha256=info.sha256,
            remember=bool(stamp),
        ) as obj:
            opener.count_lookup()
            yield obj

    async def fetch_to(self, ref: ObjectRef | str, dest: Path) -> CachedObject:
        """Place a verified copy at `dest` atomically (a hard link when possible).

        The copy is read-only; the returned object's `path` is `dest`.
        """
        async with self.open(ref) as obj:
            await _link_or_copy(obj.path, dest)
            return CachedObject(path=dest, sha256=obj.sha256, size=obj.size)

    async def pin(self, ref: ObjectRef | str) -> ObjectRef:
        """`ref` with the version and sha256 its object has now, so later reads get these
        bytes or fail. A ref that carries a digest already is returned as it is.

        Raises ObjectNotFound, Unavailable, FailedPrecondition (no backend), InvalidArgument.
        """
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.sha256 is not None:
            return ref
        info = await self._source(ref).head(ref)
        if not info.sha256:
            raise FailedPrecondition(f"{ref} has no sha256 to pin it by")
        return replace(ref, version=ref.version or info.version_id or None).with_sha256(info.sha256)

    def _source(self, ref: ObjectRef) -> ObjectSource:
        if ref.scheme is Scheme.SHA256:
            return self._local or _CacheOnly()
        source = self._anvil if ref.scheme is Scheme.ANVIL else self._s3
        if source is None:
            raise FailedPrecondition(f"no {ref.scheme.value}:// backend is configured for {ref}")
        return source


class _CacheOnly:
    """Where digest refs come from without a local store: only the cache has them."""

    async def head(self, ref: ObjectRef) -> ObjectInfo:
        raise ObjectNotFound(f"{ref} is not cached and no local store is configured")

    def open(self, ref: ObjectRef) -> contextlib.AbstractAsyncContextManager[ObjectReader]:
        raise ObjectNotFound(f"{ref} is not cached and no local store is configured")


async def _link_or_copy(src: Path, dest: Path) -> None:
    await asyncio.to_thread(_link_or_copy_sync, src, dest)


def _link_or_copy_sync(src: Path, dest: Path) -> None:
    temp = dest.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    try:
        os.link(src, temp)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        with AtomicFile(dest.parent) as out, src.open("rb", buffering=0) as data:
            while chunk := data.read(CHUNK_SIZE):
                out.write(chunk)
            out.commit(dest)
        return
    try:
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
