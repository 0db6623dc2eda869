"""The fetcher: refs of each scheme routed to their backend, into the cache."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.exceptions import DigestMismatch, FailedPrecondition, ObjectNotFound
from daemon.storage.cache import DiskCache
from daemon.storage.fetcher import Fetcher
from daemon.storage.local_store import LocalStore
from tests.unit.test_storage_cache import flip_byte

MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "data")


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[DiskCache]:
    with DiskCache(tmp_path / "cache", max_bytes=16 * MiB) as cache:
        yield cache


async def test_anvil_refs_with_and_without_digest(store: LocalStore, cache: DiskCache) -> None:
    data = os.urandom(MiB)
    info = store.put_bytes(data, bucket="b", key="k")
    fetcher = Fetcher(cache, local=store)
    async with fetcher.open("anvil://b/k") as plain:
        assert plain.path.read_bytes() == data
    async with fetcher.open(f"anvil://b/k?sha256={info.sha256}") as pinned:
        assert pinned.path == plain.path
    async with fetcher.open(f"anvil://b/k?version={info.version_id}") as versioned:
        assert versioned.sha256 == info.sha256


async def test_a_new_version_is_fetched_not_served_stale(
    store: LocalStore, cache: DiskCache
) -> None:
    store.put_bytes(b"v1", bucket="b", key="k")
    fetcher = Fetcher(cache, local=store)
    async with fetcher.open("anvil://b/k") as first:
        assert first.path.read_bytes() == b"v1"
    store.put_bytes(b"v2", bucket="b", key="k")
    async with fetcher.open("anvil://b/k") as second:
        assert second.path.read_bytes() == b"v2"


async def test_digest_refs(store: LocalStore, cache: DiskCache, tmp_path: Path) -> None:
    info = store.put_bytes(b"by digest", bucket="b", key="k")
    async with Fetcher(cache, local=store).open(f"sha256:{info.sha256}") as obj:
        assert obj.path.read_bytes() == b"by digest"
    # Without a local store only the cache can answer a digest ref.
    bare = Fetcher(cache)
    async with bare.open(f"sha256:{info.sha256}") as obj:
        assert obj.path.read_bytes() == b"by digest"
    with pytest.raises(ObjectNotFound, match="not cached"):
        async with bare.open("sha256:" + "1" * 64):
            pass


async def test_wrong_digest_in_ref(store: LocalStore, cache: DiskCache) -> None:
    store.put_bytes(b"data", bucket="b", key="k")
    with pytest.raises(DigestMismatch):
        async with Fetcher(cache, local=store).open("anvil://b/k?sha256=" + "0" * 64):
            pass
    assert cache.used_bytes == 0


async def test_schemes_without_a_backend(cache: DiskCache) -> None:
    with pytest.raises(FailedPrecondition, match="no s3:// backend"):
        async with Fetcher(cache).open("s3://b/k"):
            pass
    with pytest.raises(FailedPrecondition, match="no anvil:// backend"):
        async with Fetcher(cache).open("anvil://b/k"):
            pass


async def test_fetch_to_places_a_read_only_copy(
    store: LocalStore, cache: DiskCache, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB)
    store.put_bytes(data, bucket="b", key="k")
    dest = tmp_path / "inputs" / "k.bin"
    dest.parent.mkdir()
    placed = await Fetcher(cache, local=store).fetch_to("anvil://b/k", dest)
    assert placed.path == dest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == placed.sha256
    assert dest.stat().st_mode & 0o222 == 0
    assert os.listdir(dest.parent) == ["k.bin"]


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "plain"])
async def test_a_corrupt_cached_input_is_refetched_not_served(
    store: LocalStore, cache: DiskCache, tmp_path: Path, pinned: bool
) -> None:
    data = os.urandom(MiB)
    info = store.put_bytes(data, bucket="b", key="k")
    ref = f"anvil://b/k?sha256={info.sha256}" if pinned else "anvil://b/k"
    fetcher = Fetcher(cache, local=store)
    async with fetcher.open(ref) as obj:
        entry = obj.path
    flip_byte(entry, offset=MiB // 2)
    (tmp_path / "job").mkdir()
    placed = await fetcher.fetch_to(ref, tmp_path / "job" / "input")
    assert placed.path.read_bytes() == data
    assert entry.read_bytes() == data  # the entry itself was replaced by good bytes


async def test_fetch_to_a_directory_fails_and_leaves_no_temp(
    store: LocalStore, cache: DiskCache, tmp_path: Path
) -> None:
    store.put_bytes(b"data", bucket="b", key="k")
    (tmp_path / "job" / "taken").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        await Fetcher(cache, local=store).fetch_to("anvil://b/k", tmp_path / "job" / "taken")
    assert os.listdir(tmp_path / "job") == ["taken"]
