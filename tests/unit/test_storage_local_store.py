"""The built-in store on real files: atomic writes, versions, corruption caught on read."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from daemon.exceptions import (
    DataLoss,
    DigestMismatch,
    InvalidArgument,
    ObjectNotFound,
    ResourceExhausted,
)
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


BOUND = 10 * CHUNK


@pytest.fixture
def bounded(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "bounded", max_bytes=BOUND)


def open_temps(store: LocalStore) -> list[str]:
    """Files of this process still open in the store's temp directory (unnamed inodes too)."""
    tmp = str(store.root / "tmp")
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [link for link in links if link.startswith(tmp)]


def test_a_put_past_max_bytes_is_refused_and_leaves_nothing(bounded: LocalStore) -> None:
    bounded.put_bytes(os.urandom(6 * CHUNK), bucket="b", key="first")
    before = files_under(bounded.root)
    with pytest.raises(ResourceExhausted, match=f"max_store_bytes \\({BOUND} bytes"):
        bounded.put_bytes(os.urandom(5 * CHUNK), bucket="b", key="second")
    assert files_under(bounded.root) == before
    assert open_temps(bounded) == []
    with pytest.raises(ObjectNotFound):
        bounded.head("b", "second")
    assert (bounded.used_bytes, bounded.reserved_bytes) == (6 * CHUNK, 0)
    bounded.put_bytes(os.urandom(4 * CHUNK), bucket="b", key="second")  # exactly up to it
    assert bounded.used_bytes == BOUND
    with pytest.raises(ResourceExhausted):
        bounded.put_bytes(b"x", bucket="b", key="third")


def test_no_bound_by_default(store: LocalStore) -> None:
    store.put_bytes(os.urandom(BOUND * 4), bucket="b", key="big")
    assert store.used_bytes == BOUND * 4


def test_every_version_counts_and_the_total_survives_a_restart(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "d", max_bytes=BOUND)
    for _ in range(3):  # one blob, three versions: each holds its bytes
        store.put_bytes(b"v" * 3 * CHUNK, bucket="b", key="k")
    assert store.used_bytes == 9 * CHUNK
    again = LocalStore(tmp_path / "d", max_bytes=BOUND)
    assert again.used_bytes == 9 * CHUNK
    with pytest.raises(ResourceExhausted):
        again.put_bytes(b"x" * (CHUNK + 1), bucket="b", key="k")


def test_a_store_written_before_the_bound_existed_is_counted_at_start(tmp_path: Path) -> None:
    LocalStore(tmp_path / "d").put_bytes(os.urandom(7 * CHUNK), bucket="b", key="old")
    index = tmp_path / "d" / "objects" / "index.sqlite3"
    with contextlib.closing(sqlite3.connect(index)) as db, db:
        db.execute("DROP TABLE usage")  # as an index from before the bound looks
    store = LocalStore(tmp_path / "d", max_bytes=BOUND)
    assert store.used_bytes == 7 * CHUNK
    with pytest.raises(ResourceExhausted):
        store.put_bytes(os.urandom(4 * CHUNK), bucket="b", key="new")


def test_concurrent_writers_reserve_their_bytes(bounded: LocalStore) -> None:
    with bounded.writer(bucket="b", key="a") as a, bounded.writer(bucket="b", key="b") as b:
        a.write(os.urandom(6 * CHUNK))
        # Refused while streaming: the room left is a's until a ends.
        with pytest.raises(ResourceExhausted, match="max_store_bytes"):
            b.write(os.urandom(5 * CHUNK))
        a.commit()
    assert (bounded.used_bytes, bounded.reserved_bytes) == (6 * CHUNK, 0)
    with pytest.raises(ObjectNotFound):
        bounded.head("b", "b")
    assert open_temps(bounded) == []


def test_racing_puts_never_cross_the_bound(bounded: LocalStore) -> None:
    def put(i: int) -> bool:
        try:
            with bounded.writer(bucket="b", key=f"k{i}") as out:
                for _ in range(3):
                    out.write(os.urandom(CHUNK))
                out.commit()
        except ResourceExhausted:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        stored = sum(pool.map(put, range(8)))
    assert 1 <= stored <= 3
    assert bounded.used_bytes == stored * 3 * CHUNK <= BOUND
    assert bounded.reserved_bytes == 0
    assert open_temps(bounded) == []


def test_writers_in_two_processes_cannot_both_take_the_last_room(tmp_path: Path) -> None:
    # Two handles on one directory, as two processes have: neither sees the
    # other's reservation, so publishing checks the index itself.
    one = LocalStore(tmp_path / "d", max_bytes=BOUND)
    two = LocalStore(tmp_path / "d", max_bytes=BOUND)
    with one.writer(bucket="b", key="a") as a, two.writer(bucket="b", key="b") as b:
        a.write(os.urandom(6 * CHUNK))
        b.write(os.urandom(6 * CHUNK))
        a.commit()
        before = files_under(two.root)
        with pytest.raises(ResourceExhausted, match="max_store_bytes"):
            b.commit()
        assert files_under(two.root) == before
    with pytest.raises(ObjectNotFound):
        two.head("b", "b")
    assert one.used_bytes == two.used_bytes == 6 * CHUNK
    assert open_temps(two) == []
