"""A job's files on the host, and its params as the guest sees them.

Inputs are laid out for /input, outputs gathered from /output, params turned
into argv and environment (the ABI of guest_modules/GUIDE.md).

Blocking file I/O: call through `asyncio.to_thread` from the event loop.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from daemon.exceptions import InvalidArgument
from daemon.executors.result import OutputFile


def param_pairs(
    params: Mapping[str, str] | Iterable[tuple[str, str]],
) -> tuple[tuple[str, str], ...]:
    """Params as (name, value) pairs in order, checked for argv/env use. Raises InvalidArgument."""
    pairs = tuple(params.items()) if isinstance(params, Mapping) else tuple(params)
    for name, value in pairs:
        if not name or "=" in name or "\0" in name:
            raise InvalidArgument(f"param name {name!r} must be non-empty, without '=' or NUL")
        if "\0" in value:
            raise InvalidArgument(f"param {name!r} contains a NUL byte")
    return pairs


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file. Raises InvalidArgument when it cannot be read."""
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise InvalidArgument(f"cannot read module {path}: {exc.strerror}") from exc


def stage_inputs(inputs: Sequence[Path], directory: Path) -> list[Path]:
    """Hard-link (else copy) input i to `directory`/i, as the ABI names them; return the paths.

    Raises InvalidArgument for an input that is not a readable regular file (or
    a FIFO, which can only be linked: a guest may read a stream as its stdin).
    """
    staged: list[Path] = []
    for index, source in enumerate(inputs):
        target = directory / str(index)
        try:
            mode = source.stat().st_mode
        except OSError:
            mode = 0
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise InvalidArgument(f"input {source} is not a readable file")
        try:
            os.link(source, target)
        except OSError:
            try:
                shutil.copyfile(source, target)
            except OSError as exc:
                raise InvalidArgument(f"cannot stage input {source}: {exc.strerror}") from exc
        staged.append(target)
    return staged


def open_output_dir(directory: Path) -> bool:
    """Make `directory` the guest's fresh /output; True when this call created it.

    A missing folder is created (with its parents); an existing one must be
    empty. Raises InvalidArgument.
    """
    try:
        os.makedirs(directory)
        return True
    except FileExistsError:
        check_empty_dir(directory)
        return False
    except OSError as exc:
        raise InvalidArgument(f"cannot create output folder {directory}: {exc.strerror}") from exc


def close_output_dir(directory: Path, *, created: bool) -> tuple[OutputFile, ...]:
    """The outputs in `directory`; a folder `open_output_dir` created is removed
    again when the guest left no file in it, so a job without outputs leaves
    nothing for its caller to clean up."""
    outputs = collect_outputs(directory)
    if created and not outputs:
        shutil.rmtree(directory, ignore_errors=True)
    return outputs


def empty_dir(directory: Path) -> None:
    """Remove everything in `directory`, never following links; the folder stays."""
    for entry in list(directory.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def check_empty_dir(directory: Path) -> None:
    """Raises InvalidArgument unless `directory` exists and is empty (a fresh /output)."""
    try:
        with os.scandir(directory) as entries:
            if next(entries, None) is not None:
                raise InvalidArgument(f"output folder {directory} is not empty")
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise InvalidArgument(f"output folder {directory} does not exist") from exc


def collect_outputs(directory: Path) -> tuple[OutputFile, ...]:
    """The regular files under `directory`, sorted by name.

    Symbolic links (a guest can make them point anywhere on the host) and other
    special files are deleted, never followed.
    """
    found: list[OutputFile] = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        base = Path(root)
        for name in [*dirs, *files]:
            path = base / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                rel = path.relative_to(directory).as_posix()
                found.append(OutputFile(name=rel, path=path, size=info.st_size))
            elif not stat.S_ISDIR(info.st_mode):
                path.unlink()
    return tuple(sorted(found, key=lambda f: f.name))


def guest_argv(program: str, params: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """argv[0] = the program, then `--key=value` per param, in order."""
    return (program, *(f"--{key}={value}" for key, value in params))


def guest_env(params: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """`ANVIL_PARAM_<KEY>` per param: KEY upper-cased, every byte outside [A-Za-z0-9] → '_'."""
    return tuple((param_env_name(key), value) for key, value in params)


def param_env_name(key: str) -> str:
    return "ANVIL_PARAM_" + "".join(
        chr(b).upper() if chr(b).isascii() and chr(b).isalnum() else "_" for b in key.encode()
    )
