"""What a container left in /output, read from Podman's tar stream of it, within the limits.

The guest wrote the stream's content: every name, type and size in it is
hostile. Only regular files and folders are taken, under /output, with no
name that could leave the output folder; files are created afresh (never
through a link, never with a set-id bit) relative to open folder handles, so
nothing outside the folder is ever touched. Reading stops at the first file
over a limit.

Blocking I/O: call through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tarfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

from daemon.executors import result as results
from daemon.executors.result import OutputFile

_CHUNK = 1 << 20
_ROOT = "output"  # the archive of /output holds output/...
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Stopped(Exception):
    """The caller gave up on the stream (the run was cancelled)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OutputRead:
    """The files read (none when `over` is set), and why reading stopped, if it did."""

    files: tuple[OutputFile, ...] = ()
    over: str | None = None  # the limit that was exceeded, in words


def read_outputs(
    stream: BinaryIO,
    directory: Path | None,
    *,
    max_files: int,
    max_bytes: int,
    stop: threading.Event | None = None,
) -> OutputRead:
    """Take the regular files of a tar stream of /output into `directory` (None: only count).

    On a limit exceeded, `over` says which and `directory` may hold part of the
    files: the caller empties it. Raises tarfile.TarError (a broken stream),
    OSError, Stopped.
    """
    found: list[OutputFile] = []
    total = counted = 0
    with ExitStack() as stack:
        root = -1
        if directory is not None:
            root = os.open(directory, _DIR_FLAGS)
            stack.callback(os.close, root)
        tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|"))
        for member in tar:
            if stop is not None and stop.is_set():
                raise Stopped
            rel = _relative(member.name)
            if rel is None or not member.isreg():
                continue  # /output itself, folders (made for their files), links, devices
            if len(found) + counted >= max_files:
                return OutputRead(
                    over=f"more than {max_files} files left in /output, over the limit of "
                    f"{max_files}"
                )
            total += member.size
            if total > max_bytes:
                size = results.size_text(max_bytes)
                return OutputRead(
                    over=f"more than {size} left in /output, over the limit of {size}"
                )
            if root >= 0:
                assert directory is not None
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                _copy(source, root, rel, member.size, stop)
                found.append(
                    OutputFile(name=rel.as_posix(), path=directory / rel, size=member.size)
                )
            else:
                counted += 1
    return OutputRead(files=tuple(sorted(found, key=lambda f: f.name)))


def _relative(name: str) -> PurePosixPath | None:
    """The member's path inside /output, or None for /output itself and any unsafe name."""
    parts = name.split("/")
    if parts[0] != _ROOT:
        return None
    inner = [p for p in parts[1:] if p]
    if not inner or any(p in (".", "..") or "\0" in p for p in inner):
        return None
    return PurePosixPath(*inner)


def _open_folder(root: int, rel: PurePosixPath) -> int:
    """A handle on folder `rel` under `root`, each missing folder made (0755 less the umask).

    Opened one name at a time and never through a link: nothing outside root is reached.
    """
    fd = os.dup(root)
    for part in rel.parts:
        # Made for an earlier file (or a file of that name: the open below refuses it).
        with contextlib.suppress(FileExistsError):
            os.mkdir(part, 0o755, dir_fd=fd)
        try:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = child
    return fd


def _copy(
    source: IO[bytes], root: int, rel: PurePosixPath, size: int, stop: threading.Event | None
) -> None:
    parent = _open_folder(root, rel.parent)
    try:
        fd = os.open(rel.name, _FILE_FLAGS, 0o644, dir_fd=parent)
    finally:
        os.close(parent)
    with os.fdopen(fd, "wb") as target:
        left = size
        while left > 0:
            if stop is not None and stop.is_set():
                raise Stopped
            chunk = source.read(min(_CHUNK, left))
            if not chunk:
                raise tarfile.ReadError(f"the stream ended inside /output/{rel}")
            target.write(chunk)
            left -= len(chunk)


async def read_archive(
    client: Any, container_id: str, directory: Path | None, *, max_files: int, max_bytes: int
) -> OutputRead:
    """/output of a running container, streamed from Podman's archive API through
    `read_outputs` in a thread. Cancelling the call stops the thread before it
    returns, so the caller may remove `directory` at once."""
    stop = threading.Event()

    def read() -> OutputRead:
        response = client.api.get(
            f"/containers/{container_id}/archive", params={"path": "/output"}, stream=True
        )
        try:
            response.raise_for_status()
            return read_outputs(
                response.raw, directory, max_files=max_files, max_bytes=max_bytes, stop=stop
            )
        finally:
            response.close()

    reading = asyncio.ensure_future(asyncio.to_thread(read))
    try:
        return await asyncio.shield(reading)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Stopped, Exception):
            await reading
        raise
