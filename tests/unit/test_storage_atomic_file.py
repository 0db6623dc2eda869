"""Atomic files and digest checks: nothing partial or unverified becomes visible."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.exceptions import DigestMismatch
from daemon.storage import atomic_file
from daemon.storage.atomic_file import TEMP_PREFIX, AtomicFile, remove_stale_temps
from daemon.storage.digest import DigestCheck, sha256_file, verified_chunks


def test_bytes_appear_only_on_commit(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with AtomicFile(tmp_path, mode=0o640) as out:
        out.write(b"hello ")
        out.write(b"world")
        assert os.listdir(tmp_path) == []
        assert out.commit(dest) is True
    assert dest.read_bytes() == b"hello world"
    assert dest.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["out"]


def test_abort_and_exceptions_leave_nothing(tmp_path: Path) -> None:
    def write_then_die() -> AtomicFile:
        with AtomicFile(tmp_path) as out:
            out.write(b"partial")
            raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        write_then_die()
    assert os.listdir(tmp_path) == []
    out = AtomicFile(tmp_path)
    out.abort()
    with pytest.raises(ValueError, match="already committed or aborted"):
        out.write(b"more")


def test_commit_replaces_or_keeps_an_existing_file(tmp_path: Path) -> None:
    dest = tmp_path / "x"
    dest.write_bytes(b"old")
    with AtomicFile(tmp_path) as out:
        out.write(b"new")
        assert out.commit(dest, overwrite=False) is False
    assert dest.read_bytes() == b"old"
    with AtomicFile(tmp_path) as out:
        out.write(b"new")
        assert out.commit(dest) is True
    assert dest.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["x"]


def test_falls_back_to_a_named_temp_without_o_tmpfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_tmpfile(path: object, flags: int, *args: int, **kwargs: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE here")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic_file.os, "open", no_tmpfile)
    with AtomicFile(tmp_path) as out:
        out.write(b"data")
        [temp] = os.listdir(tmp_path)
        assert temp.startswith(TEMP_PREFIX)
        out.commit(tmp_path / "final")
    assert os.listdir(tmp_path) == ["final"]
    with AtomicFile(tmp_path) as out:
        out.write(b"data")
    assert os.listdir(tmp_path) == ["final"]


def test_remove_stale_temps_only_touches_temps(tmp_path: Path) -> None:
    (tmp_path / f"{TEMP_PREFIX}a").write_bytes(b"")
    (tmp_path / "keep").write_bytes(b"")
    assert remove_stale_temps(tmp_path) == 1
    assert os.listdir(tmp_path) == ["keep"]


def test_digest_check() -> None:
    data = b"abc" * 1000
    check = DigestCheck(
        what="t", expected_sha256=hashlib.sha256(data).hexdigest(), expected_size=3000
    )
    check.update(data[:1000])
    check.update(data[1000:])
    assert check.finish() == hashlib.sha256(data).hexdigest()

    short = DigestCheck(what="t", expected_size=4)
    short.update(b"abc")
    with pytest.raises(DigestMismatch, match="got 3 bytes, expected 4"):
        short.finish()
    long = DigestCheck(what="t", expected_size=2)
    with pytest.raises(DigestMismatch, match="more than the expected 2 bytes"):
        long.update(b"abc")
    wrong = DigestCheck(what="t", expected_sha256="0" * 64)
    wrong.update(b"abc")
    with pytest.raises(DigestMismatch, match="expected " + "0" * 64):
        wrong.finish()


async def _stream(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_verified_chunks_withholds_the_last_chunk_of_a_bad_stream() -> None:
    good = hashlib.sha256(b"abcdef").hexdigest()
    check = DigestCheck(what="t", expected_sha256=good)
    assert [c async for c in verified_chunks(_stream(b"ab", b"cd", b"ef"), check)] == [
        b"ab",
        b"cd",
        b"ef",
    ]
    received: list[bytes] = []
    bad = verified_chunks(_stream(b"ab", b"cd", b"eX"), DigestCheck(what="t", expected_sha256=good))
    with pytest.raises(DigestMismatch):
        await _collect(bad, received)
    assert received == [b"ab", b"cd"]


async def _collect(chunks: AsyncIterator[bytes], into: list[bytes]) -> None:
    async for chunk in chunks:
        into.append(chunk)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 << 20))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_commit_that_cannot_replace_its_destination_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    with AtomicFile(tmp_path) as out:
        out.write(b"bytes")
        with pytest.raises(IsADirectoryError):
            out.commit(tmp_path / "a-directory")
    assert os.listdir(tmp_path) == ["a-directory"]
