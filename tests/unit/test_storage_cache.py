"""The disk cache over a real local store: verification, coalescing, LRU bound, pins."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from daemon import metrics
from daemon.exceptions import (
    DigestMismatch,
    ErrorCode,
    ObjectNotFound,
    ResourceExhausted,
    Unavailable,
)
from daemon.storage.cache import DiskCache
from daemon.storage.local_store import LocalSource, LocalStore
from daemon.storage.refs import ObjectRef, parse_ref
from daemon.storage.source import ObjectInfo, ObjectReader
from tests.eventually import eventually

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CountingSource:
    """A LocalSource that counts transfers and can pause or tamper with the stream."""

    def __init__(
        self,
        store: LocalStore,
        *,
        gate: asyncio.Event | None = None,
        tamper: Callable[[bytes], bytes] | None = None,
        claim_sha256: str | None = None,
    ) -> None:
        self.inner = LocalSource(store, chunk_size=64 * 1024)
        self.opens = 0
        self.gate = gate
        self.tamper = tamper
        self.claim_sha256 = claim_sha256

    async def head(self, ref: ObjectRef) -> ObjectInfo:
        return await self.inner.head(ref)

    @contextlib.asynccontextmanager
    async def open(self, ref: ObjectRef) -> AsyncIterator[ObjectReader]:
        self.opens += 1
        async with self.inner.open(ref) as reader:
            info = reader.info
            if self.claim_sha256 is not None:
                info = ObjectInfo(bucket=info.bucket, key=info.key, size=info.size, sha256=None)
            yield ObjectReader(info=info, chunks=self._chunks(reader.chunks))

    async def _chunks(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if self.gate is not None:
                await self.gate.wait()
            yield self.tamper(chunk) if self.tamper else chunk


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "data")


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[DiskCache]:
    with DiskCache(tmp_path / "cache", max_bytes=4 * MiB) as cache:
        yield cache


def put(store: LocalStore, key: str, data: bytes) -> ObjectRef:
    info = store.put_bytes(data, bucket="b", key=key)
    return parse_ref(f"anvil://b/{key}?sha256={info.sha256}")


def cache_files(cache: DiskCache) -> list[str]:
    return sorted(os.listdir(cache.root / "objects"))


async def test_fetch_verifies_and_caches(store: LocalStore, cache: DiskCache) -> None:
    data = os.urandom(MiB + 3)
    ref = put(store, "k", data)
    source = CountingSource(store)
    async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256) as obj:
        assert obj.path.read_bytes() == data
        assert (obj.sha256, obj.size) == (sha(data), len(data))
    async with cache.get("another key", lambda: source.open(ref), expected_sha256=ref.sha256):
        pass
    assert source.opens == 1
    assert cache.used_bytes == len(data)
    assert cache_files(cache) == [sha(data)]


async def test_empty_object(store: LocalStore, cache: DiskCache) -> None:
    ref = put(store, "empty", b"")
    source = CountingSource(store)
    async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256) as obj:
        assert obj.path.read_bytes() == b""


async def test_wrong_digest_in_ref_fails_before_any_transfer(
    store: LocalStore, cache: DiskCache
) -> None:
    ref = put(store, "k", b"real bytes").with_sha256("0" * 64)
    source = CountingSource(store, gate=asyncio.Event())  # would hang if any chunk were read
    with pytest.raises(DigestMismatch, match="the source holds sha256"):
        async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256):
            pass
    assert cache_files(cache) == []
    assert (cache.used_bytes, cache.reserved_bytes) == (0, 0)


async def test_bytes_not_matching_the_ref_are_never_cached(
    store: LocalStore, cache: DiskCache
) -> None:
    data = os.urandom(2 * MiB)
    ref = put(store, "k", data)
    # The source does not vouch for a digest and corrupts one byte in transit.
    source = CountingSource(store, tamper=lambda c: b"X" + c[1:], claim_sha256="none")
    with pytest.raises(DigestMismatch, match=f"expected {ref.sha256}"):
        async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256):
            pass
    assert cache_files(cache) == []
    assert (cache.used_bytes, cache.reserved_bytes) == (0, 0)


async def test_concurrent_gets_share_one_transfer(store: LocalStore, cache: DiskCache) -> None:
    data = os.urandom(3 * MiB)
    ref = put(store, "k", data)
    gate = asyncio.Event()
    source = CountingSource(store, gate=gate)

    async def fetch() -> str:
        async with cache.get(
            ref.location, lambda: source.open(ref), expected_sha256=ref.sha256
        ) as obj:
            return sha(obj.path.read_bytes())

    tasks = [asyncio.create_task(fetch()) for _ in range(20)]
    await eventually(lambda: source.opens, timeout=10)  # the transfer is held at the gate
    gate.set()
    assert await asyncio.gather(*tasks) == [sha(data)] * 20
    assert source.opens == 1


async def test_one_cancelled_waiter_does_not_stop_the_others(
    store: LocalStore, cache: DiskCache
) -> None:
    ref = put(store, "k", os.urandom(MiB))
    gate = asyncio.Event()
    source = CountingSource(store, gate=gate)

    async def fetch() -> int:
        async with cache.get(
            ref.location, lambda: source.open(ref), expected_sha256=ref.sha256
        ) as obj:
            return obj.size

    first, second = asyncio.create_task(fetch()), asyncio.create_task(fetch())
    await eventually(lambda: source.opens, timeout=10)
    first.cancel()
    gate.set()
    assert await second == MiB
    with pytest.raises(asyncio.CancelledError):
        await first
    assert source.opens == 1


async def test_cancelling_every_waiter_abandons_the_download(
    store: LocalStore, cache: DiskCache
) -> None:
    ref = put(store, "k", os.urandom(2 * MiB))
    gate = asyncio.Event()
    source = CountingSource(store, gate=gate)

    async def fetch() -> None:
        async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256):
            pass

    task = asyncio.create_task(fetch())
    await eventually(lambda: cache.reserved_bytes == 2 * MiB, timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    await eventually(lambda: cache.reserved_bytes == 0, timeout=1)
    assert (cache.used_bytes, cache.reserved_bytes) == (0, 0)
    assert cache_files(cache) == []


async def test_lru_eviction_keeps_the_total_under_the_bound(
    store: LocalStore, cache: DiskCache
) -> None:
    refs = [put(store, f"k{i}", os.urandom(MiB + i)) for i in range(8)]
    source = CountingSource(store)

    async def fetch(ref: ObjectRef) -> None:
        async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256):
            assert cache.used_bytes + cache.reserved_bytes <= cache.max_bytes

    for ref in refs[:3]:
        await fetch(ref)
    await fetch(refs[0])  # touch: refs[1] is now the least recently used
    for ref in refs[3:]:
        await fetch(ref)
        on_disk = sum(p.stat().st_size for p in (cache.root / "objects").iterdir())
        assert on_disk == cache.used_bytes <= cache.max_bytes
    assert refs[1].sha256 not in cache
    assert [ref.sha256 in cache for ref in refs[-3:]] == [True, True, True]


async def test_pinned_entries_are_not_evicted(store: LocalStore, cache: DiskCache) -> None:
    big = [put(store, f"k{i}", os.urandom(2 * MiB - 100 + i)) for i in range(3)]
    source = CountingSource(store)
    async with cache.get(
        big[0].location, lambda: source.open(big[0]), expected_sha256=big[0].sha256
    ) as pinned:
        async with cache.get(
            big[1].location, lambda: source.open(big[1]), expected_sha256=big[1].sha256
        ):
            with pytest.raises(ResourceExhausted, match="cannot make room"):
                async with cache.get(
                    big[2].location, lambda: source.open(big[2]), expected_sha256=big[2].sha256
                ):
                    pass
        async with cache.get(
            big[2].location, lambda: source.open(big[2]), expected_sha256=big[2].sha256
        ):
            assert pinned.path.exists()
    assert big[1].sha256 not in cache
    assert big[0].sha256 in cache


async def test_objects_larger_than_the_cache_are_refused(
    store: LocalStore, cache: DiskCache
) -> None:
    ref = put(store, "huge", os.urandom(4 * MiB + 1))
    source = CountingSource(store)
    with pytest.raises(ResourceExhausted, match="more than the cache's bound"):
        async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256):
            pass
    assert cache_files(cache) == []


async def test_source_errors_pass_through(store: LocalStore, cache: DiskCache) -> None:
    ref = parse_ref("anvil://b/missing")
    source = CountingSource(store)
    with pytest.raises(ObjectNotFound):
        async with cache.get(ref.location, lambda: source.open(ref)):
            pass


async def test_entries_survive_a_restart_in_lru_order(store: LocalStore, tmp_path: Path) -> None:
    refs = [put(store, f"k{i}", os.urandom(MiB)) for i in range(3)]
    source = CountingSource(store)
    with DiskCache(tmp_path / "c", max_bytes=4 * MiB) as cache:
        for ref in [*refs, refs[0]]:
            async with cache.get(
                ref.location, lambda ref=ref: source.open(ref), expected_sha256=ref.sha256
            ):
                await asyncio.sleep(0.01)  # distinct mtimes
        with pytest.raises(Unavailable, match="in use"):
            DiskCache(tmp_path / "c", max_bytes=4 * MiB)
    (tmp_path / "c" / "objects" / ".tmp-leftover").write_bytes(b"x")
    # Reopened smaller: the least recently used entry (refs[1]) goes first.
    with DiskCache(tmp_path / "c", max_bytes=2 * MiB) as cache:
        assert cache.used_bytes == 2 * MiB
        assert [ref.sha256 in cache for ref in refs] == [True, False, True]
        assert cache_files(cache) == sorted([refs[0].sha256 or "", refs[2].sha256 or ""])
        async with cache.get(refs[2].location, lambda: source.open(refs[2])) as obj:
            assert obj.size == MiB
    assert source.opens == 3 + 1  # the last get had no digest to find the copy by


def flip_byte(path: Path, offset: int = 0) -> None:
    """Corrupt one bit of a cache entry in place, as a failing disk would."""
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(offset)
        (byte,) = f.read(1)
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))
    path.chmod(0o444)


def corrupt_count() -> float:
    return metrics.REGISTRY.get_sample_value("anvil_compute_cache_corrupt_entries_total") or 0.0


async def test_a_corrupt_entry_is_dropped_and_fetched_again(
    store: LocalStore, cache: DiskCache, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(MiB + 7)
    ref = put(store, "k", data)
    source = CountingSource(store)
    async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256) as obj:
        entry = obj.path
    flip_byte(entry, offset=MiB)
    before = corrupt_count()
    with caplog.at_level(logging.WARNING, logger="daemon.storage.cache"):
        async with cache.get(
            ref.location, lambda: source.open(ref), expected_sha256=ref.sha256
        ) as obj:
            assert obj.path.read_bytes() == data
    assert source.opens == 2  # fetched anew from the source
    assert corrupt_count() == before + 1
    assert any("does not match its sha256" in r.getMessage() for r in caplog.records)
    assert cache_files(cache) == [sha(data)]
    assert cache.used_bytes == len(data)


async def test_every_hit_verifies_even_by_alias(store: LocalStore, cache: DiskCache) -> None:
    data = os.urandom(64 * 1024)
    ref = parse_ref("anvil://b/plain")
    store.put_bytes(data, bucket="b", key="plain")
    source = CountingSource(store, claim_sha256="none")  # found again only by its key
    for round_ in range(3):
        async with cache.get("b/plain@v1", lambda: source.open(ref)) as obj:
            assert obj.path.read_bytes() == data
            path = obj.path
        flip_byte(path, offset=round_)
    async with cache.get("b/plain@v1", lambda: source.open(ref)) as obj:
        assert obj.path.read_bytes() == data
    assert source.opens == 4  # the first fill, then one per corruption


async def test_a_hit_while_another_caller_holds_the_entry_still_checks_it(
    store: LocalStore, cache: DiskCache
) -> None:
    data = os.urandom(256 * 1024)
    ref = put(store, "k", data)
    source = CountingSource(store)
    async with cache.get(
        ref.location, lambda: source.open(ref), expected_sha256=ref.sha256
    ) as held:
        flip_byte(held.path, offset=10)  # rewritten while pinned: the shared check is void
        async with cache.get(
            ref.location, lambda: source.open(ref), expected_sha256=ref.sha256
        ) as obj:
            assert obj.path.read_bytes() == data
    assert source.opens == 2


async def test_concurrent_hits_on_a_corrupt_entry_share_one_refetch(
    store: LocalStore, cache: DiskCache
) -> None:
    data = os.urandom(2 * MiB)
    ref = put(store, "k", data)
    source = CountingSource(store)
    async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256) as obj:
        path = obj.path
    flip_byte(path, offset=5)
    before = corrupt_count()

    async def fetch() -> str:
        async with cache.get(
            ref.location, lambda: source.open(ref), expected_sha256=ref.sha256
        ) as obj:
            return sha(obj.path.read_bytes())

    assert await asyncio.gather(*(fetch() for _ in range(10))) == [sha(data)] * 10
    assert source.opens == 2
    assert corrupt_count() == before + 1
    assert (cache.used_bytes, cache.reserved_bytes) == (len(data), 0)


async def test_corrupt_in_the_cache_and_at_the_source_is_data_loss(
    store: LocalStore, cache: DiskCache
) -> None:
    data = os.urandom(128 * 1024)
    ref = put(store, "k", data)
    source = CountingSource(store)
    async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256) as obj:
        path = obj.path
    flip_byte(path)
    source.tamper = lambda c: b"Y" + c[1:]
    source.claim_sha256 = "none"
    with pytest.raises(DigestMismatch) as caught:
        async with cache.get(ref.location, lambda: source.open(ref), expected_sha256=ref.sha256):
            pass
    assert caught.value.code is ErrorCode.DATA_LOSS
    assert cache_files(cache) == []
    assert (cache.used_bytes, cache.reserved_bytes) == (0, 0)
