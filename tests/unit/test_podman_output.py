"""Reading /output from Podman's tar stream: a hostile guest wrote every name, type and size."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
from pathlib import Path

import pytest

from daemon.executors.podman.output import Stopped, read_outputs


def stream(*members: tuple[str, bytes | str | None], mode: int = 0o644) -> io.BytesIO:
    """A tar like Podman's archive of /output: (name, file content | link target | None=dir)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), mode
                tar.addfile(info, io.BytesIO(content))
    buffer.seek(0)
    return buffer


def read(source: io.BytesIO, directory: Path | None, **limits: int) -> tuple[list[str], str | None]:
    got = read_outputs(
        source,
        directory,
        max_files=limits.get("max_files", 10),
        max_bytes=limits.get("max_bytes", 1 << 20),
    )
    return [f.name for f in got.files], got.over


def tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_regular_files_and_their_folders_are_taken(tmp_path: Path) -> None:
    source = stream(
        ("output", None),
        ("output/a.txt", b"alpha"),
        ("output/deep/er/b.bin", b"\x00\x01"),
        ("output/empty", None),
    )
    names, over = read(source, tmp_path)
    assert (names, over) == (["a.txt", "deep/er/b.bin"], None)
    assert (tmp_path / "deep/er/b.bin").read_bytes() == b"\x00\x01"
    assert tree(tmp_path) == ["a.txt", "deep", "deep/er", "deep/er/b.bin"]  # no empty folder


def test_links_devices_and_escaping_names_are_never_taken(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "out"
    inside.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, link in [
            ("output/link", tarfile.SYMTYPE, str(outside)),
            ("output/hard", tarfile.LNKTYPE, "output/ok"),
            ("output/null", tarfile.CHRTYPE, ""),
            ("output/fifo", tarfile.FIFOTYPE, ""),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tar.addfile(info)
        for name in ("../escape", "/etc/escape", "output/../escape", "output/./x/../../y", "other"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"!"))
        info = tarfile.TarInfo("output/ok")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    buffer.seek(0)
    names, over = read(buffer, inside)
    assert (names, over) == (["ok"], None)
    assert tree(inside) == ["ok"]
    assert tree(outside) == []
    assert not (tmp_path / "escape").exists()


def test_a_file_through_a_link_folder_cannot_leave(tmp_path: Path) -> None:
    # A symlink named like a folder, then a file "in" it: it must not land outside.
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "out"
    inside.mkdir()
    source = stream(("output/sub", str(outside)), ("output/sub/x", b"x"))
    names, _ = read(source, inside)
    assert names == ["sub/x"] and (inside / "sub" / "x").read_bytes() == b"x"
    assert tree(outside) == []
    # And a link already there (made by anyone) is not followed either.
    (inside / "planted").symlink_to(outside)
    with pytest.raises(OSError, match="Not a directory"):
        read(stream(("output/planted/y", b"y")), inside)
    assert tree(outside) == []


def test_set_id_and_execute_bits_are_dropped(tmp_path: Path) -> None:
    read(stream(("output/rootsh", b"#!/bin/sh\n"), mode=0o6755), tmp_path)
    mode = stat.S_IMODE((tmp_path / "rootsh").stat().st_mode)
    assert mode & (stat.S_ISUID | stat.S_ISGID | 0o111) == 0
    assert mode == 0o644 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_limits_stop_reading_at_the_first_file_over_them(tmp_path: Path) -> None:
    files = [(f"output/f{i}", b"x" * 10) for i in range(5)]
    assert read(stream(*files), tmp_path, max_files=5, max_bytes=50) == (
        [f"f{i}" for i in range(5)],
        None,
    )
    names, over = read(stream(*files), None, max_files=4)
    assert names == [] and over == "more than 4 files left in /output, over the limit of 4"
    names, over = read(stream(*files), None, max_bytes=49)
    assert over == "more than 49 bytes left in /output, over the limit of 49 bytes"
    assert read(stream(*files), None, max_bytes=50) == ([], None)  # only counted


def test_a_header_size_over_the_limit_is_refused_before_its_data(tmp_path: Path) -> None:
    # A sparse 100 GiB file's header: refused on its size alone, nothing read or written.
    buffer = io.BytesIO()
    info = tarfile.TarInfo("output/sparse")
    info.size = 100 << 30
    buffer.write(info.tobuf(format=tarfile.GNU_FORMAT))
    buffer.seek(0)
    names, over = read(buffer, tmp_path, max_bytes=1 << 20)
    assert names == [] and over is not None and "1 MiB" in over
    assert tree(tmp_path) == []


def test_a_stream_cut_short_is_an_error(tmp_path: Path) -> None:
    whole = stream(("output/a", b"a" * 4096)).getvalue()
    with pytest.raises(tarfile.TarError):
        read(io.BytesIO(whole[:1000]), tmp_path)


def test_a_stopped_read_ends(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        read_outputs(stream(("output/a", b"a")), tmp_path, max_files=1, max_bytes=1, stop=stop)
