"""The Podman executor's side of a run on the host: files it stages and cleans, and what it
reads of a container from the host (its /proc entries, its memory cgroup).

Blocking I/O: call through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon.exceptions import FailedPrecondition, InvalidArgument
from daemon.executors import staging
from daemon.executors.podman.sandbox import (
    INIT_TARGET,
    ContainerLimits,
    UserNamespace,
    confinement_problems,
)

log = logging.getLogger(__name__)

# Where Debian's catatonit package puts it (the first is Podman's own --init path).
DEFAULT_INIT_PATHS = (Path("/usr/libexec/podman/catatonit"), Path("/usr/bin/catatonit"))
# anvil-exec, one static binary per machine, shipped in the package
# (source and build: guest_modules/containers/exec_helper/).
EXEC_HELPERS = Path(__file__).parent
CGROUP_ROOT = Path("/sys/fs/cgroup")
INPUT_PREFIX = "podman-in-"
# How long the runtime may take to become the pause process after start.
_BECOMING_S = 5.0


def find_init(wanted: Path | None) -> Path:
    """The pause binary to bind-mount (resolved). Raises FailedPrecondition when absent."""
    for candidate in (wanted,) if wanted is not None else DEFAULT_INIT_PATHS:
        if candidate.is_file():
            return candidate.resolve()
    where = wanted or " or ".join(str(p) for p in DEFAULT_INIT_PATHS)
    raise FailedPrecondition(
        f"catatonit is missing ({where}): install the catatonit package (.ci/install-podman.sh)"
    )


def find_exec_helper(wanted: Path | None) -> Path:
    """anvil-exec for this machine. Raises FailedPrecondition when absent or not executable."""
    helper = wanted or EXEC_HELPERS / f"anvil-exec.{platform.machine()}"
    if not (helper.is_file() and os.access(helper, os.X_OK)):
        raise FailedPrecondition(
            f"{helper} is missing or not executable: anvil-exec ships for x86_64 and aarch64"
        )
    return helper.resolve()


def prepare(
    output_dir: Path, inputs: Sequence[Path], scratch_dir: Path | None
) -> tuple[bool, Path]:
    """(whether output_dir was created, a fresh /input folder with the inputs staged in it).

    The folder and the inputs are readable by the guest's uid, which is no
    user of the host. Raises InvalidArgument.
    """
    created = staging.open_output_dir(output_dir)
    input_dir = Path(tempfile.mkdtemp(prefix=INPUT_PREFIX, dir=scratch_dir))
    try:
        input_dir.chmod(0o755)
        staged = staging.stage_inputs(inputs, input_dir)
        for source, target in zip(inputs, staged, strict=True):
            _readable_by_all(source, target)
        return created, input_dir
    except BaseException:
        shutil.rmtree(input_dir, ignore_errors=True)
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _readable_by_all(source: Path, staged: Path) -> None:
    """Replace a staged input others cannot read by a copy they can (0644).

    Objects from the daemon's own store and cache are world-readable (their
    folders keep others out), so this copies only files a caller passed with
    a private mode; the caller's file is never changed. Raises InvalidArgument.
    """
    mode = staged.stat().st_mode
    if mode & stat.S_IROTH:
        return
    if stat.S_ISFIFO(mode):
        raise InvalidArgument(f"input {source} is a stream the guest's user cannot read")
    try:
        staged.unlink()
        shutil.copyfile(source, staged)
        os.chmod(staged, 0o644)
    except OSError as exc:
        raise InvalidArgument(f"cannot stage input {source}: {exc.strerror}") from exc


def empty_output_dir(directory: Path, created: bool) -> None:
    """Leave nothing of a run in its output folder: remove it if the run made it, else empty it."""
    if created:
        shutil.rmtree(directory, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def clear_scratch(scratch_dir: Path) -> None:
    """Remove the input folders a crashed predecessor left in `scratch_dir`."""
    scratch_dir.mkdir(parents=True, exist_ok=True)
    for stale in scratch_dir.glob(f"{INPUT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def confinement(
    state: Mapping[str, Any], limits: ContainerLimits, userns: UserNamespace
) -> list[str]:
    """What the kernel shows of the started container that differs from its sandbox.

    Reads /proc/<pid> of the container's pause process once it runs (a moment
    after start, the runtime is still becoming it). The daemon must run on
    Podman's host, in its pid namespace: anything else is reported.
    """
    pid = state.get("Pid")
    if state.get("Status") != "running" or not isinstance(pid, int) or pid <= 0:
        return [f"the container is not running (state {state.get('Status')!r})"]
    proc = Path("/proc") / str(pid)
    deadline = time.monotonic() + _BECOMING_S
    try:
        while (proc / "cmdline").read_bytes().split(b"\0")[:2] != [INIT_TARGET.encode(), b"-P"]:
            if time.monotonic() > deadline:
                return [
                    f"process {pid} is not the container's pause process: the daemon must "
                    "run in Podman's pid namespace"
                ]
            time.sleep(0.002)
        texts = {name: (proc / name).read_text() for name in ("status", "uid_map", "gid_map")}
        mountinfo = (proc / "mountinfo").read_text()
    except OSError as exc:
        return [f"cannot read /proc/{pid} ({exc.strerror}): the daemon must share Podman's host"]
    return confinement_problems(
        status=texts["status"],
        uid_map=texts["uid_map"],
        gid_map=texts["gid_map"],
        mountinfo=mountinfo,
        limits=limits,
        userns=userns,
    )


def oom_kills(cgroup: str) -> int:
    """Processes the kernel's OOM killer killed in the container's memory cgroup (0: unknown).

    cgroup v1: memory.oom_control of the memory controller; v2: memory.events.
    """
    relative = cgroup.strip("/")
    for path in (
        CGROUP_ROOT / "memory" / relative / "memory.oom_control",
        CGROUP_ROOT / relative / "memory.events",
    ):
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    log.warning("cannot read the OOM kill count of the container's cgroup %r", cgroup)
    return 0
