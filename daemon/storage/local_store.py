"""The built-in store: content-addressed blobs plus a bucket/key index.

Layout under `DATA_DIR/objects/`:
    sha256/ab/abcdef…   immutable blobs named by their sha256, mode 0444
    tmp/                unnamed inodes being written (see atomic_file)
    index.sqlite3       (bucket, key, version) -> digest, size, content type;
                        and the bytes the store holds (every version counted)

A blob is written to an unnamed temp inode, fsync'd and linked into place
before its index row commits, so the index never names a missing or partial
blob. Every read re-hashes the blob and fails with DigestMismatch in place of
its last chunk, so a flipped bit is reported and the whole object never served.
Several processes may share one store (SQLite serialises the index).

With `max_bytes`, the sizes of all versions together stay within it: a writer
reserves its bytes as they arrive (so two concurrent puts cannot both squeeze
into the room left), and publishing re-checks the total in the same SQLite
transaction that indexes the version (other processes write too). A put that
would cross the bound is refused with ResourceExhausted and leaves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from daemon.exceptions import (
    DataLoss,
    DigestMismatch,
    InvalidArgument,
    ObjectNotFound,
    ResourceExhausted,
)
from daemon.storage.atomic_file import AtomicFile, remove_stale_temps
from daemon.storage.digest import DigestCheck
from daemon.storage.refs import (
    ObjectRef,
    Scheme,
    validate_bucket,
    validate_key,
    validate_sha256,
)
from daemon.storage.source import CHUNK_SIZE, DEFAULT_CONTENT_TYPE, ObjectInfo, ObjectReader

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    bucket       TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    version_id   TEXT    NOT NULL,
    sha256       TEXT    NOT NULL,
    size         INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    created_at   REAL    NOT NULL,
    UNIQUE (bucket, key, version_id)
);
CREATE INDEX IF NOT EXISTS objects_by_sha256 ON objects (sha256);
-- The sum of objects.size, kept with every insert: the bound never scans the index.
CREATE TABLE IF NOT EXISTS usage (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO usage (id, bytes) SELECT 1, COALESCE(SUM(size), 0) FROM objects;
"""
_COLUMNS = "bucket, key, version_id, sha256, size, content_type"
# A writer that died without O_TMPFILE support leaves a named temp; anything
# this old cannot belong to a live writer.
_STALE_TEMP_SECONDS = 24 * 3600


class LocalStore:
    """Content-addressed objects under `data_dir/objects`; safe to share between processes.

    `max_bytes` bounds the bytes of all versions held (0: no bound).
    """

    def __init__(self, data_dir: Path, *, max_bytes: int = 0) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be 0 (no bound) or positive")
        self.max_bytes = max_bytes
        self.root = data_dir / "objects"
        self._blobs = self.root / "sha256"
        self._tmp = self.root / "tmp"
        self._index = self.root / "index.sqlite3"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(exist_ok=True)
        remove_stale_temps(self._tmp, older_than=_STALE_TEMP_SECONDS)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        # Bytes this process's writers have received but not yet published.
        self._quota = threading.Lock()
        self._reserved = 0
        self._used = self.used_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes held: the sizes of every stored version, by every process."""
        with self._connect() as db:
            return _usage(db)

    @property
    def reserved_bytes(self) -> int:
        """Bytes this process's writers have received and not yet published or dropped."""
        return self._reserved

    def writer(
        self,
        *,
        bucket: str,
        key: str,
        content_type: str = DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> BlobWriter:
        """Start writing a new version of bucket/key; raises InvalidArgument on bad names."""
        if self.max_bytes:
            self._settle(0, used=self.used_bytes)  # what other processes stored meanwhile
        return BlobWriter(
            self,
            bucket=validate_bucket(bucket),
            key=validate_key(key),
            content_type=content_type or DEFAULT_CONTENT_TYPE,
            sha256=None if not sha256 else validate_sha256(sha256),
        )

    def put_file(
        self,
        path: Path,
        *,
        bucket: str,
        key: str,
        content_type: str = DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Store a file's bytes as a new version; raises DigestMismatch if `sha256` differs."""
        with (
            self.writer(bucket=bucket, key=key, content_type=content_type, sha256=sha256) as out,
            path.open("rb") as src,
        ):
            while chunk := src.read(CHUNK_SIZE):
                out.write(chunk)
            return out.commit()

    def put_bytes(
        self,
        data: bytes,
        *,
        bucket: str,
        key: str,
        content_type: str = DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Store `data` as a new version of bucket/key."""
        with self.writer(bucket=bucket, key=key, content_type=content_type, sha256=sha256) as out:
            out.write(data)
            return out.commit()

    def head(self, bucket: str, key: str, version: str | None = None) -> ObjectInfo:
        """Describe the latest (or the given) version; raises ObjectNotFound."""
        validate_bucket(bucket)
        validate_key(key)
        with self._connect() as db:
            if version is None:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM objects WHERE bucket = ? AND key = ?"
                    " ORDER BY seq DESC LIMIT 1",
                    (bucket, key),
                ).fetchone()
            else:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM objects"
                    " WHERE bucket = ? AND key = ? AND version_id = ?",
                    (bucket, key, version),
                ).fetchone()
        if row is None:
            at = "" if version is None else f" version {version}"
            raise ObjectNotFound(f"no object {bucket}/{key}{at}")
        return _info(row)

    def latest(self, *, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, ObjectInfo]]:
        """(seq, info) of each key's latest version, by seq, for keys whose latest
        version is past `after_seq`: page through the store with the last seq."""
        with self._connect() as db:
            # The (bucket, key, version_id) unique index answers NOT EXISTS per row.
            rows = db.execute(
                f"SELECT seq, {_COLUMNS} FROM objects AS o WHERE seq > ? AND NOT EXISTS"
                " (SELECT 1 FROM objects AS n"
                "  WHERE n.bucket = o.bucket AND n.key = o.key AND n.seq > o.seq)"
                " ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [(row[0], _info(row[1:])) for row in rows]

    def open(
        self, bucket: str, key: str, version: str | None = None, *, chunk_size: int = CHUNK_SIZE
    ) -> BlobReader:
        """Open an object for verified reading; raises ObjectNotFound, DataLoss."""
        info = self.head(bucket, key, version)
        return BlobReader(self.blob_path(info.sha256 or ""), info, chunk_size=chunk_size)

    def open_blob(self, sha256: str, *, chunk_size: int = CHUNK_SIZE) -> BlobReader:
        """Open a blob by digest (a `sha256:` ref); raises ObjectNotFound, DataLoss."""
        digest = validate_sha256(sha256)
        path = self.blob_path(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"no object with sha256 {digest}") from None
        info = ObjectInfo(bucket="", key="", size=size, sha256=digest, etag=digest)
        return BlobReader(path, info, chunk_size=chunk_size)

    def keys(self, bucket: str, *, after: str = "", limit: int = 1000) -> list[str]:
        """The keys of `bucket` held here, in order, after `after`: page with the last key."""
        validate_bucket(bucket)
        with self._connect() as db:
            rows = db.execute(
                "SELECT DISTINCT key FROM objects WHERE bucket = ? AND key > ?"
                " ORDER BY key LIMIT ?",
                (bucket, after, limit),
            ).fetchall()
        return [row[0] for row in rows]

    def delete(self, bucket: str, key: str) -> int:
        """Remove every version of bucket/key held here; return the bytes freed (0: none).

        A blob no other version names is removed with it. The blob is moved
        aside while the index's write lock is held (so no writer can link the
        same digest meanwhile) and removed only once the delete has committed.
        """
        validate_bucket(bucket)
        validate_key(key)
        trash: list[tuple[Path, Path]] = []
        try:
            with self._write_transaction() as db:
                rows = db.execute(
                    "SELECT sha256, size FROM objects WHERE bucket = ? AND key = ?", (bucket, key)
                ).fetchall()
                freed = sum(int(size) for _, size in rows)
                db.execute("DELETE FROM objects WHERE bucket = ? AND key = ?", (bucket, key))
                db.execute("UPDATE usage SET bytes = bytes - ? WHERE id = 1", (freed,))
                for digest in {str(d) for d, _ in rows}:
                    named = db.execute(
                        "SELECT 1 FROM objects WHERE sha256 = ? LIMIT 1", (digest,)
                    ).fetchone()
                    blob = self.blob_path(digest)
                    if named is None and blob.exists():
                        aside = self._tmp / f"deleted-{digest}-{uuid.uuid4().hex}"
                        blob.rename(aside)
                        trash.append((aside, blob))
                used = _usage(db)
        except BaseException:
            for aside, blob in trash:
                aside.rename(blob)
            raise
        for aside, _ in trash:
            aside.unlink(missing_ok=True)
        self._settle(0, used=used)
        return freed

    def blob_path(self, sha256: str) -> Path:
        return self._blobs / sha256[:2] / sha256

    def _reserve(self, size: int, what: str) -> None:
        """Set `size` more bytes aside for a writer; raises ResourceExhausted past the bound."""
        if not self.max_bytes or not size:
            return
        with self._quota:
            if self._used + self._reserved + size > self.max_bytes:
                raise self._full(what, self._used, self._reserved + size)
            self._reserved += size

    def _settle(self, reserved: int, *, used: int | None = None) -> None:
        """Give back a writer's reservation, as its bytes now count as held (`used`) or not."""
        with self._quota:
            if self.max_bytes:
                self._reserved -= reserved
            if used is not None:
                self._used = used

    def _full(self, what: str, used: int, adding: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"{what} refused: the store would hold more than max_store_bytes"
            f" ({self.max_bytes} bytes; {used} held, {adding} more being stored)"
        )

    def _publish(self, out: AtomicFile, info: ObjectInfo, *, reserved: int) -> None:
        """Check the bound, link the blob into place and index its version, atomically.

        The index's write lock is held from the check to the insert, so writers
        in other processes cannot both pass the check with the last free bytes.
        Raises ResourceExhausted before anything is visible. Either way the
        writer's `reserved` bytes are given back.
        """
        held: int | None = None
        try:
            with self._write_transaction() as db:
                used = _usage(db)
                if self.max_bytes and used + info.size > self.max_bytes:
                    raise self._full(f"upload of {info.bucket}/{info.key}", used, info.size)
                dest = self.blob_path(info.sha256 or "")
                dest.parent.mkdir(exist_ok=True)
                # Relinking an existing digest replaces a blob that may have rotted
                # with bytes just verified; readers of the old inode are unaffected.
                out.commit(dest, overwrite=True)
                db.execute(
                    "INSERT INTO objects"
                    " (bucket, key, version_id, sha256, size, content_type, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        info.bucket,
                        info.key,
                        info.version_id,
                        info.sha256,
                        info.size,
                        info.content_type,
                        time.time(),
                    ),
                )
                db.execute("UPDATE usage SET bytes = bytes + ? WHERE id = 1", (info.size,))
            held = used + info.size
        finally:
            self._settle(reserved, used=held)

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """A transaction holding the index's write lock from its start (BEGIN IMMEDIATE)
        to COMMIT; rolled back when the block raises."""
        with self._connect(autocommit=True) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _connect(self, *, autocommit: bool = False) -> Iterator[sqlite3.Connection]:
        # autocommit: the caller issues BEGIN and COMMIT itself.
        db = sqlite3.connect(
            self._index, timeout=30.0, isolation_level=None if autocommit else "DEFERRED"
        )
        try:
            yield db
        finally:
            db.close()


class BlobWriter:
    """One object being written; `commit` stores it, leaving the block without it discards it."""

    def __init__(
        self, store: LocalStore, *, bucket: str, key: str, content_type: str, sha256: str | None
    ) -> None:
        self.bucket = bucket
        self.key = key
        self.content_type = content_type
        self._store = store
        self._check = DigestCheck(what=f"upload of {bucket}/{key}", expected_sha256=sha256)
        self._file = AtomicFile(store._tmp)
        self._digest: str | None = None
        self._reserved = 0
        # `abort` may come from a cancelled task while a worker thread writes.
        self._lock = threading.Lock()

    def write(self, chunk: bytes) -> None:
        """Append a chunk; raises ResourceExhausted (the store is full: nothing is kept)."""
        try:
            self._store._reserve(len(chunk), f"upload of {self.bucket}/{self.key}")
            with self._lock:
                self._reserved += len(chunk)
            self._check.update(chunk)
            self._file.write(chunk)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> ObjectInfo:
        """Verify, store durably and index; raises DigestMismatch (nothing stored)."""
        self.seal()
        return self.publish()

    def seal(self) -> None:
        """Verify the bytes and make them durable, still invisible (the slow half).

        Raises DigestMismatch, leaving nothing behind.
        """
        try:
            self._digest = self._check.finish()
        except DigestMismatch:
            self._file.abort()
            raise
        self._file.sync()

    def publish(self) -> ObjectInfo:
        """Link the sealed blob into place and index it as the newest version.

        Raises ResourceExhausted (nothing stored) when the store filled up meanwhile.
        """
        if self._digest is None:
            raise ValueError("publish() before seal()")
        info = ObjectInfo(
            bucket=self.bucket,
            key=self.key,
            size=self._check.size,
            sha256=self._digest,
            version_id=uuid.uuid4().hex,
            etag=self._digest,
            content_type=self.content_type,
        )
        with self._lock:
            reserved, self._reserved = self._reserved, 0
        try:
            self._store._publish(self._file, info, reserved=reserved)
        finally:
            self._file.abort()
        return info

    def abort(self) -> None:
        """Discard the bytes unless published, and give their reservation back; idempotent."""
        self._file.abort()
        with self._lock:
            reserved, self._reserved = self._reserved, 0
        self._store._settle(reserved)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class BlobReader:
    """Reads a blob in chunks, verifying size and digest as it goes.

    The last chunk is only returned once the whole blob has hashed to its
    name; otherwise `next_chunk` raises DigestMismatch instead.
    """

    def __init__(self, path: Path, info: ObjectInfo, *, chunk_size: int = CHUNK_SIZE) -> None:
        self.info = info
        self._chunk_size = chunk_size
        self._check = DigestCheck(
            what=f"stored object {info.bucket}/{info.key} ({path.name})",
            expected_sha256=info.sha256,
            expected_size=info.size,
        )
        try:
            self._file: BinaryIO = path.open("rb", buffering=0)
        except FileNotFoundError:
            raise DataLoss(f"blob {path.name} of {info.bucket}/{info.key} is missing") from None
        self._pending: bytes | None = None
        self._done = False
        # A cancelled task may close the reader while a worker thread reads.
        self._lock = threading.Lock()

    def next_chunk(self) -> bytes:
        """The next chunk, or b"" at the end; raises DigestMismatch on corruption."""
        with self._lock:
            return self._next_chunk()

    def _next_chunk(self) -> bytes:
        if self._done:
            return b""
        if self._pending is None:
            self._pending = self._read()
        following = self._read()
        chunk = self._pending
        if not following:
            self._check.finish()
            self._done = True
        self._pending = following
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.next_chunk():
            yield chunk

    def _read(self) -> bytes:
        chunk = self._file.read(self._chunk_size)
        self._check.update(chunk)
        return chunk

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LocalSource:
    """ObjectSource over a LocalStore: `anvil://` refs by bucket/key, `sha256:` refs by blob."""

    def __init__(self, store: LocalStore, *, chunk_size: int = CHUNK_SIZE) -> None:
        self.store = store
        self.chunk_size = chunk_size

    async def head(self, ref: ObjectRef) -> ObjectInfo:
        if ref.scheme is Scheme.SHA256:
            with await asyncio.to_thread(self._open, ref) as reader:
                return reader.info
        return await asyncio.to_thread(self.store.head, ref.bucket, ref.key, ref.version)

    @contextlib.asynccontextmanager
    async def open(self, ref: ObjectRef) -> AsyncIterator[ObjectReader]:
        reader = await asyncio.to_thread(self._open, ref)
        with reader:
            yield ObjectReader(info=reader.info, chunks=_chunks(reader))

    def _open(self, ref: ObjectRef) -> BlobReader:
        if ref.scheme is Scheme.SHA256:
            return self.store.open_blob(ref.sha256 or "", chunk_size=self.chunk_size)
        if ref.scheme is not Scheme.ANVIL:
            raise InvalidArgument(f"the local store holds anvil:// and sha256: refs, not {ref}")
        return self.store.open(ref.bucket, ref.key, ref.version, chunk_size=self.chunk_size)


async def _chunks(reader: BlobReader) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(reader.next_chunk):
        yield chunk


def _info(row: tuple[str, str, str, str, int, str]) -> ObjectInfo:
    bucket, key, version_id, sha256, size, content_type = row
    return ObjectInfo(
        bucket=bucket,
        key=key,
        size=size,
        sha256=sha256,
        version_id=version_id,
        etag=sha256,
        content_type=content_type,
    )


def _usage(db: sqlite3.Connection) -> int:
    """The bytes the store holds, as the index counts them."""
    (used,) = db.execute("SELECT bytes FROM usage WHERE id = 1").fetchone()
    return int(used)
