"""The built-in store on real files: atomic writes, versions, corruption caught on read."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from daemon.exceptions import DataLoss, DigestMismatch, InvalidArgument, ObjectNotFound
from daemon.storage.atomic_file import TEMP_PREFIX
from daemon.storage.local_store import LocalStore

CHUNK = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def flip_bit(path: Path, offset: int) -> None:
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def read_all(store: LocalStore, bucket: str, key: str) -> bytes:
    with store.open(bucket, key, chunk_size=CHUNK) as reader:
        return b"".join(reader)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "data")


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 7])
def test_round_trip(store: LocalStore, size: int) -> None:
    data = os.urandom(size)
    info = store.put_bytes(data, bucket="b", key="dir/k", content_type="text/plain")
    assert (info.size, info.sha256, info.content_type) == (size, sha(data), "text/plain")
    assert store.head("b", "dir/k") == info
    assert read_all(store, "b", "dir/k") == data
    blob = store.blob_path(sha(data))
    assert blob.read_bytes() == data
    assert blob.stat().st_mode & 0o777 == 0o444


def test_put_file_streams_a_file(store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 << 20))
    info = store.put_file(src, bucket="b", key="k")
    assert info.sha256 == sha(src.read_bytes())
    assert read_all(store, "b", "k") == src.read_bytes()


def test_versions_latest_wins_and_old_ones_stay_readable(store: LocalStore) -> None:
    first = store.put_bytes(b"one", bucket="b", key="k")
    second = store.put_bytes(b"two", bucket="b", key="k")
    assert first.version_id != second.version_id
    assert store.head("b", "k") == second
    assert store.head("b", "k", first.version_id) == first
    with store.open("b", "k", first.version_id) as reader:
        assert b"".join(reader) == b"one"
    with pytest.raises(ObjectNotFound, match="version nope"):
        store.head("b", "k", "nope")


def test_missing_object(store: LocalStore) -> None:
    with pytest.raises(ObjectNotFound, match="no object b/nothing"):
        store.open("b", "nothing")
    with pytest.raises(ObjectNotFound):
        store.open_blob("00" * 32)


def test_identical_content_is_stored_once(store: LocalStore) -> None:
    store.put_bytes(b"same", bucket="b", key="one")
    store.put_bytes(b"same", bucket="c", key="two")
    blobs = [p for p in (store.root / "sha256").rglob("*") if p.is_file()]
    assert [p.name for p in blobs] == [sha(b"same")]


def test_blob_by_digest(store: LocalStore) -> None:
    store.put_bytes(b"content", bucket="b", key="k")
    with store.open_blob(sha(b"content").upper()) as reader:
        assert b"".join(reader) == b"content"


def test_wrong_expected_digest_stores_nothing(store: LocalStore) -> None:
    before = files_under(store.root)
    with pytest.raises(DigestMismatch, match="expected " + "0" * 64):
        store.put_bytes(b"data", bucket="b", key="k", sha256="0" * 64)
    with pytest.raises(ObjectNotFound):
        store.head("b", "k")
    assert files_under(store.root) == before


def test_aborted_writer_leaves_nothing(store: LocalStore) -> None:
    before = files_under(store.root)
    with store.writer(bucket="b", key="k") as writer:
        writer.write(b"x" * 10_000)
        assert files_under(store.root) == before  # the bytes live in an unnamed inode
    with pytest.raises(ObjectNotFound):
        store.head("b", "k")
    assert files_under(store.root) == before


@pytest.mark.parametrize(("bucket", "key"), [("", "k"), ("b", ""), ("a/b", "k"), ("b", "a\nb")])
def test_bad_names_are_rejected_before_any_write(store: LocalStore, bucket: str, key: str) -> None:
    with pytest.raises(InvalidArgument):
        store.writer(bucket=bucket, key=key)


@pytest.mark.parametrize("offset_from_end", [1, 5 * CHUNK])
def test_flipped_bit_is_detected_and_the_object_never_served_whole(
    store: LocalStore, offset_from_end: int
) -> None:
    data = os.urandom(10 * CHUNK)
    store.put_bytes(data, bucket="b", key="k")
    flip_bit(store.blob_path(sha(data)), len(data) - offset_from_end)
    served: list[bytes] = []
    with (
        store.open("b", "k", chunk_size=CHUNK) as reader,
        pytest.raises(DigestMismatch, match="content has sha256"),
    ):
        served.extend(reader)
    assert sum(map(len, served)) == len(data) - CHUNK  # only the last chunk withheld


def test_flipped_bit_in_a_one_chunk_object_serves_nothing(store: LocalStore) -> None:
    store.put_bytes(b"hello world", bucket="b", key="k")
    flip_bit(store.blob_path(sha(b"hello world")), 3)
    with store.open("b", "k") as reader, pytest.raises(DigestMismatch):
        reader.next_chunk()


def test_truncated_and_missing_blobs_are_data_loss(store: LocalStore) -> None:
    data = os.urandom(3 * CHUNK)
    store.put_bytes(data, bucket="b", key="k")
    blob = store.blob_path(sha(data))
    blob.chmod(0o644)
    os.truncate(blob, 2 * CHUNK)
    with store.open("b", "k", chunk_size=CHUNK) as reader, pytest.raises(DigestMismatch):
        list(reader)
    blob.unlink()
    with pytest.raises(DataLoss, match="missing"):
        store.open("b", "k")


def test_putting_the_same_bytes_again_heals_a_rotten_blob(store: LocalStore) -> None:
    data = os.urandom(2 * CHUNK)
    store.put_bytes(data, bucket="b", key="k")
    flip_bit(store.blob_path(sha(data)), 0)
    store.put_bytes(data, bucket="b", key="again")
    assert read_all(store, "b", "k") == data


def test_stale_named_temps_are_removed_on_open(tmp_path: Path) -> None:
    LocalStore(tmp_path / "data")
    tmp_dir = tmp_path / "data" / "objects" / "tmp"
    stale, fresh = tmp_dir / f"{TEMP_PREFIX}old", tmp_dir / f"{TEMP_PREFIX}new"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"someone is writing this")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    LocalStore(tmp_path / "data")
    assert not stale.exists()
    assert fresh.exists()


def test_two_store_handles_share_the_index(tmp_path: Path) -> None:
    one, two = LocalStore(tmp_path / "d"), LocalStore(tmp_path / "d")
    info = one.put_bytes(b"shared", bucket="b", key="k")
    assert two.head("b", "k") == info
    with contextlib.closing(sqlite3.connect(tmp_path / "d" / "objects" / "index.sqlite3")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_latest_pages_through_each_keys_newest_version(store: LocalStore) -> None:
    for i in range(5):
        store.put_bytes(f"v1-{i}".encode(), bucket="b", key=f"k{i}")
    store.put_bytes(b"v2-1", bucket="b", key="k1")  # k1's newest is now this one
    store.put_bytes(b"other", bucket="c", key="k1")  # same key, other bucket
    seen: list[tuple[str, str, str]] = []
    after = 0
    while page := store.latest(after_seq=after, limit=2):
        assert len(page) <= 2
        after = page[-1][0]
        seen += [(info.bucket, info.key, info.sha256 or "") for _, info in page]
    digest = {data: hashlib.sha256(data).hexdigest() for data in [b"v2-1", b"other"]}
    assert len(seen) == 6
    assert ("b", "k1", digest[b"v2-1"]) in seen
    assert ("c", "k1", digest[b"other"]) in seen
    assert {(b, k) for b, k, _ in seen} == {("b", f"k{i}") for i in range(5)} | {("c", "k1")}
