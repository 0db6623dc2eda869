"""/output is bounded by the kernel while the guest runs (issue 13).

Hostile guests against the real executor: however they write, the worker's
tmpfs never holds more than the limit plus 64 MiB (measured from outside while
they run), crossing a limit ends the run within about a second as
OUTPUT_TOO_LARGE naming the limit, and nothing of a failed run is reported or
left on disk. A worker started as an ordinary user gets the same bounds; one
whose mount namespace is refused does not start, and says why.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import test_wasm_guests as guests

from daemon.executors.result import ExecutionResult, RunEnd
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.limits import (
    MAX_OUTPUT_SLACK,
    MIB,
    OUTPUT_FOLDERS,
    Limits,
    output_fs_inodes,
)
from daemon.executors.wasm.pool import PoolSettings
from tests.eventually import eventually
from tests.readable_copy import readable_copy

LIMIT = 16 * MIB
# Neither fuel nor the deadline ends these guests: only the /output bound can.
ENDLESS = {"fuel": 10**15, "timeout_s": 60.0}
ENDS_WITHIN_S = 1.5  # "within a second" of crossing, with room for a loaded machine
INTEGRATION = Path(__file__).resolve().parent
ROOT = INTEGRATION.parents[1]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def executor(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WasmExecutor]:
    scratch = tmp_path_factory.mktemp("scratch")
    async with WasmExecutor(PoolSettings(workers=1, kill_grace_s=0.5), scratch_dir=scratch) as ex:
        yield ex


def output_of(executor: WasmExecutor) -> Path:
    """The worker's /output tmpfs, as seen from outside its mount namespace."""
    (pid,) = executor.pool.pids()
    scratch = executor.pool.settings.scratch_dir
    assert scratch is not None
    return Path(f"/proc/{pid}/root") / scratch.relative_to("/") / f"worker-{pid}" / "output"


def mount_line(executor: WasmExecutor) -> list[str]:
    """The worker's mountinfo line for its /output: [mount id, ..., fs type, source, options]."""
    (pid,) = executor.pool.pids()
    scratch = executor.pool.settings.scratch_dir
    assert scratch is not None
    target = str(scratch / f"worker-{pid}" / "output")
    lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    (line,) = [f for f in (ln.split() for ln in lines) if f[4] == target]
    return line


@dataclass
class Peak:
    bytes_used: int = 0
    names_used: int = 0
    size: int = 0  # the tmpfs's own bound at the peak, as statvfs reports it
    samples: int = 0


@contextmanager
def sampled(folder: Path) -> Iterator[Peak]:
    """Sample statvfs of the tmpfs on `folder` every millisecond while the block runs
    (not of the folder beneath it, seen while the tmpfs is replaced after a run)."""
    peak = Peak()
    done = threading.Event()
    beneath = os.statvfs(folder.parent).f_fsid

    def sample() -> None:
        while not done.is_set():
            info = os.statvfs(folder)
            if info.f_fsid == beneath:
                continue
            used = (info.f_blocks - info.f_bfree) * info.f_frsize
            if used > peak.bytes_used:
                peak.bytes_used, peak.size = used, info.f_blocks * info.f_frsize
            peak.names_used = max(peak.names_used, info.f_files - info.f_ffree)
            peak.samples += 1
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


async def run(
    executor: WasmExecutor, tmp_path: Path, wasm: bytes, limits: Limits, name: str = "out"
) -> tuple[ExecutionResult, float]:
    """(the result, the seconds the call took); the output folder is `tmp_path`/`name`."""
    module = guests.write_module(tmp_path, wasm)
    began = time.monotonic()
    result = await executor.run(module, output_dir=tmp_path / name, limits=limits)
    return result, time.monotonic() - began


def assert_nothing_left(result: ExecutionResult, tmp_path: Path, name: str = "out") -> None:
    assert result.outputs == ()
    assert not (tmp_path / name).exists()  # never made: nothing of the run is on disk


def assert_tmpfs_empty(executor: WasmExecutor) -> None:
    """Emptied for the next run (by removing a few names, or as a fresh tmpfs)."""
    info = os.statvfs(output_of(executor))
    assert info.f_files - info.f_ffree == 1 and info.f_bfree == info.f_blocks


def assert_bytes_exceeded(result: ExecutionResult, limit: int) -> None:
    assert result.outcome is RunEnd.OUTPUT_TOO_LARGE, result.message
    text = f"more than {limit // MIB} MiB written to /output (max_output_bytes)"
    assert text in result.message


# --- bytes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "then"),
    [
        (3 * LIMIT, "exit"),  # one fd_write of the whole 48 MiB, then exit 0
        (4096, "exit"),  # 12,288 small writes, each error ignored, then exit 0
        (4 * MIB, "forever"),  # big writes that ignore ENOSPC and never stop
        (4096, "forever"),  # small writes that ignore ENOSPC and never stop
    ],
)
async def test_three_times_the_byte_limit_never_lands_and_fails_naming_it(
    executor: WasmExecutor, tmp_path: Path, chunk: int, then: str
) -> None:
    replaced = executor.pool.replaced
    limits = Limits(output_bytes=LIMIT, **ENDLESS)
    with sampled(output_of(executor)) as peak:
        result, elapsed = await run(
            executor, tmp_path, guests.fill_output(3 * LIMIT, chunk, then=then), limits
        )
    assert_bytes_exceeded(result, LIMIT)
    assert elapsed < ENDS_WITHIN_S, f"ended {elapsed:.2f} s after it started"
    assert peak.samples > 5
    assert LIMIT < peak.bytes_used <= LIMIT + MAX_OUTPUT_SLACK  # it did fill, and no more
    assert LIMIT < peak.size <= LIMIT + MAX_OUTPUT_SLACK  # the kernel's own bound
    assert_nothing_left(result, tmp_path)
    assert_tmpfs_empty(executor)
    assert executor.pool.replaced == replaced  # ended by its epoch: the worker serves on


async def test_crossing_then_sleeping_in_a_host_call_ends_within_a_second(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    """No epoch reaches a guest asleep in poll_oneoff: the worker reports the run and exits."""
    replaced = executor.pool.replaced
    result, elapsed = await run(
        executor,
        tmp_path,
        guests.fill_output(2 * LIMIT, 4 * MIB, then="sleep"),
        Limits(output_bytes=LIMIT, **ENDLESS),
    )
    assert_bytes_exceeded(result, LIMIT)
    assert elapsed < ENDS_WITHIN_S, f"ended {elapsed:.2f} s after it started"
    assert_nothing_left(result, tmp_path)
    await eventually(
        lambda: executor.pool.replaced == replaced + 1 and executor.pool.pids(), timeout=10
    )
    ok, _ = await run(executor, tmp_path, guests.exit_with(0), Limits(), name="next")
    assert ok.outcome is RunEnd.OK, ok.message


async def test_a_sparse_file_larger_than_the_limit_fails_and_is_never_copied(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    """One byte at 10 GiB: a page of memory, but 10 GiB to read if it were uploaded."""
    result, _ = await run(
        executor, tmp_path, guests.sparse_file(10 << 30), Limits(output_bytes=LIMIT)
    )
    assert_bytes_exceeded(result, LIMIT)
    assert_nothing_left(result, tmp_path)


async def test_exactly_the_limit_passes_intact_and_one_byte_more_fails(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    stdin = tmp_path / "stdin"
    stdin.write_bytes(os.urandom(MIB))
    module = guests.write_module(tmp_path, guests.echo())

    async def copy(limit: int, name: str) -> ExecutionResult:
        return await executor.run(
            module, output_dir=tmp_path / name, inputs=[stdin], limits=Limits(output_bytes=limit)
        )

    over = await copy(MIB - 1, "over")
    assert over.outcome is RunEnd.OUTPUT_TOO_LARGE
    assert f"more than {MIB - 1} bytes written to /output (max_output_bytes)" in over.message
    assert_nothing_left(over, tmp_path, "over")
    fits = await copy(MIB, "fits")
    assert fits.outcome is RunEnd.OK, fits.message
    (output,) = fits.outputs
    assert (output.name, output.size) == ("copy.txt", MIB)
    assert output.path.read_bytes() == stdin.read_bytes()


# --- files -------------------------------------------------------------------


async def test_100000_files_against_1000_fail_naming_max_output_files(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    limits = Limits(output_files=1000)
    with sampled(output_of(executor)) as peak:
        result, elapsed = await run(executor, tmp_path, guests.many_files(100_000), limits)
    assert result.outcome is RunEnd.OUTPUT_TOO_LARGE, result.message
    assert "more than 1000 files in /output (max_output_files)" in result.message
    assert elapsed < ENDS_WITHIN_S + 1
    # The root folder, then at most the files and the folder allowance, never 100,000.
    assert 1000 < peak.names_used <= output_fs_inodes(limits)
    assert_nothing_left(result, tmp_path)
    assert_tmpfs_empty(executor)


async def test_hard_links_count_as_files(executor: WasmExecutor, tmp_path: Path) -> None:
    """A link takes no page, but tmpfs counts it as a name: 2000 of them cannot land."""
    limits = Limits(output_files=1000)
    with sampled(output_of(executor)) as peak:
        result, _ = await run(executor, tmp_path, guests.hard_links(2000), limits)
    assert result.outcome is RunEnd.OUTPUT_TOO_LARGE, result.message
    assert "more than 1000 files in /output (max_output_files)" in result.message
    assert 1000 < peak.names_used <= output_fs_inodes(limits)
    assert_nothing_left(result, tmp_path)


# --- what a run leaves -------------------------------------------------------


async def test_a_failed_run_leaves_no_outputs(executor: WasmExecutor, tmp_path: Path) -> None:
    result, _ = await run(executor, tmp_path, guests.write_files(3, 100, exit_code=7), Limits())
    assert result.outcome is RunEnd.NONZERO_EXIT and result.exit_code == 7
    assert_nothing_left(result, tmp_path)
    given = tmp_path / "given"
    given.mkdir()
    result = await executor.run(
        guests.write_module(tmp_path, guests.write_files(3, 100, exit_code=7)), output_dir=given
    )
    assert result.outputs == () and list(given.iterdir()) == []
    ok, _ = await run(executor, tmp_path, guests.write_files(3, 100), Limits(), name="ok")
    assert [(f.name, f.size) for f in ok.outputs] == [("f0", 100), ("f1", 100), ("f2", 100)]


async def test_the_tmpfs_is_remounted_only_when_the_limits_change(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    """Runs that leave nothing cost no mount; new limits cost a remount (same mount,
    new bounds); a run that left files is emptied."""
    quiet = guests.exit_with(0)
    first = Limits(output_bytes=8 * MIB, output_files=10)
    await run(executor, tmp_path, quiet, first, name="a")
    before = mount_line(executor)
    assert before[-3:-1] == ["tmpfs", "anvil-output"]
    assert "nosuid" in before[5] and "nodev" in before[5] and "noexec" in before[5]
    for n in range(3):
        await run(executor, tmp_path, quiet, first, name=f"q{n}")
    assert mount_line(executor) == before
    await run(executor, tmp_path, quiet, Limits(output_bytes=32 * MIB, output_files=10), name="b")
    remounted = mount_line(executor)
    assert remounted[0] == before[0] and remounted[-1] != before[-1]
    assert f"nr_inodes={10 + OUTPUT_FOLDERS + 2}" in remounted[-1]
    wrote, _ = await run(
        executor,
        tmp_path,
        guests.write_files(1, 10),
        Limits(output_bytes=32 * MIB, output_files=10),
    )
    assert wrote.outcome is RunEnd.OK and len(wrote.outputs) == 1
    assert_tmpfs_empty(executor)


async def test_the_job_executor_bounds_output_by_the_peers_settings(tmp_path: Path) -> None:
    """max_output_bytes and max_output_files bound every run `anvil-compute serve` makes."""
    from daemon import config
    from daemon.capability_config import LocalCapability
    from daemon.executors.result import ExecutionRequest, ending
    from daemon.executors.wasm.job import WasmJobExecutor
    from daemon.jobs.state import JobState

    settings = config.load(
        environ={},
        overrides={
            "data_dir": tmp_path / "data",
            "wasm_workers": 1,
            "max_output_bytes": 4 * MIB,
            "max_output_files": 10,
        },
    )
    adapter = await WasmJobExecutor.create(settings)
    try:

        async def execute(wasm: bytes, name: str) -> ExecutionResult:
            module = guests.write_module(tmp_path, wasm)
            return await adapter.execute(
                ExecutionRequest(
                    job_id=name,
                    capability=LocalCapability(name="hostile", kind="wasm", module=str(module)),
                    module_path=module,
                    inputs=(),
                    params={},
                    output_dir=tmp_path / name,
                    timeout_s=30,
                )
            )

        big = await execute(guests.fill_output(12 * MIB, MIB, then="forever"), "big")
        state, error = ending(big)
        assert state is JobState.FAILED
        assert "more than 4 MiB written to /output (max_output_bytes)" in error
        many = await execute(guests.many_files(100), "many")
        state, error = ending(many)
        assert state is JobState.FAILED
        assert "more than 10 files in /output (max_output_files)" in error
        assert big.outputs == many.outputs == ()
        assert not (tmp_path / "big").exists() and not (tmp_path / "many").exists()
        fits = await execute(guests.write_files(3, 100), "fits")
        assert ending(fits) == (JobState.SUCCEEDED, ""), fits.message
        assert [f.name for f in fits.outputs] == ["f0", "f1", "f2"]
    finally:
        await adapter.close()


# --- who may mount -----------------------------------------------------------

AS_NOBODY = r"""
import asyncio, json, os, sys, time
from pathlib import Path
import test_wasm_guests as guests
from daemon.executors.wasm.limits import MIB, Limits
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.pool import PoolSettings

async def main(base: Path) -> dict:
    async with WasmExecutor(PoolSettings(workers=1), scratch_dir=base / "scratch") as ex:
        (pid,) = ex.pool.pids()
        tmpfs = f"/proc/{pid}/root{base}/scratch/worker-{pid}/output"
        info = os.statvfs(tmpfs)
        beneath = os.statvfs(base).f_fsid
        peak = 0
        async def sample():
            nonlocal peak
            while True:
                s = os.statvfs(tmpfs)
                if s.f_fsid != beneath:
                    peak = max(peak, (s.f_blocks - s.f_bfree) * s.f_frsize)
                await asyncio.sleep(0.001)
        sampler = asyncio.create_task(sample())
        limits = Limits(output_bytes=4 * MIB, fuel=10**15, timeout_s=60)
        began = time.monotonic()
        over = await ex.run(
            guests.write_module(base, guests.fill_output(12 * MIB, 4096, then="forever")),
            output_dir=base / "over", limits=limits,
        )
        elapsed = time.monotonic() - began
        sampler.cancel()
        (base / "stdin").write_bytes(b"as nobody")
        ok = await ex.run(
            guests.write_module(base, guests.echo()), output_dir=base / "ok",
            inputs=[base / "stdin"],
        )
        return {
            "uid": os.getuid(),
            "worker_uid_map": Path(f"/proc/{pid}/uid_map").read_text().split(),
            "mounts": [l for l in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                       if l.split()[4] == f"{base}/scratch/worker-{pid}/output"],
            "size": info.f_blocks * info.f_frsize,
            "peak": peak,
            "over": [over.outcome.value, over.message, elapsed, bool(over.outputs),
                     (base / "over").exists()],
            "ok": [ok.outcome.value, [(f.name, f.path.read_bytes().decode(), f.path.stat().st_uid)
                                      for f in ok.outputs]],
        }

print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))
"""


def test_a_worker_started_as_an_ordinary_user_gets_its_bounded_tmpfs() -> None:
    """As `nobody`, without any capability: a user namespace of its own maps only its uid."""
    base = Path(tempfile.mkdtemp(prefix="anvil-nobody-"))
    try:
        os.chown(base, 65534, 65534)
        done = subprocess.run(
            [
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                sys.executable,
                "-c",
                AS_NOBODY,
                str(base),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            cwd=base,
            env={
                **os.environ,
                "PYTHONPATH": readable_copy(base / "src", INTEGRATION / "test_wasm_guests.py"),
            },
        )
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert seen["uid"] == 65534
    assert seen["worker_uid_map"] == ["65534", "65534", "1"]  # itself, and no one else
    (mount,) = seen["mounts"]
    assert " - tmpfs anvil-output " in mount and "nr_inodes=" in mount
    outcome, message, elapsed, reported, made = seen["over"]
    assert outcome == "output_too_large"
    assert "more than 4 MiB written to /output (max_output_bytes)" in message
    assert elapsed < ENDS_WITHIN_S
    assert 4 * MIB < seen["peak"] <= 4 * MIB + MAX_OUTPUT_SLACK
    assert not reported and not made
    assert seen["ok"] == ["ok", [["copy.txt", "as nobody", 65534]]]


# A seccomp filter that fails one system call with EPERM, as systemd's
# RestrictNamespaces= (unshare) and SystemCallFilter= (mount) do: a real refusal
# by the kernel, inherited by the worker processes the pool starts.
REFUSING = r"""
import asyncio, ctypes, struct, sys
from daemon.exceptions import Unavailable
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.pool import PoolSettings

arch, nr = int(sys.argv[1]), int(sys.argv[2])
LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
ALLOW, ERRNO_EPERM = 0x7FFF0000, 0x00050000 | 1
code = [(LD_ABS, 0, 0, 4), (JEQ, 0, 3, arch), (LD_ABS, 0, 0, 0), (JEQ, 0, 1, nr),
        (RET, 0, 0, ERRNO_EPERM), (RET, 0, 0, ALLOW)]
program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in code))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(code), ctypes.addressof(program))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER

async def main() -> None:
    try:
        async with WasmExecutor(PoolSettings(workers=2)):
            print("STARTED")
    except Unavailable as exc:
        print(exc)

asyncio.run(main())
"""
# (AUDIT_ARCH_*, unshare, mount) per machine.
SYSCALLS = {"x86_64": (0xC000003E, 272, 165), "aarch64": (0xC00000B7, 97, 40)}


@pytest.mark.parametrize(
    ("refused", "reason"),
    [
        ("unshare", "unshare(CLONE_NEWUSER|CLONE_NEWNS) refused: Operation not permitted"),
        ("mount", "mount(/, MS_REC|MS_PRIVATE) refused: Operation not permitted"),
    ],
)
def test_a_worker_refused_its_mount_namespace_does_not_start_and_says_why(
    refused: str, reason: str
) -> None:
    arch, unshare_nr, mount_nr = SYSCALLS[platform.machine()]
    nr = unshare_nr if refused == "unshare" else mount_nr
    done = subprocess.run(
        [sys.executable, "-c", REFUSING, str(arch), str(nr)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = done.stdout.splitlines()  # one line: the pool's Unavailable
    assert line.startswith(f"cannot start a WASM worker: cannot bound /output: {reason}"), line
    assert "RestrictNamespaces=user mnt" in line
