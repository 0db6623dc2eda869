"""Hostile guests against the real executor: each ends within its limit, with the right
typed reason, and the executor serves the next job."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import test_wasm_guests as guests

from daemon.executors.result import ExecutionResult, RunEnd
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.guest_run import GuestRun
from daemon.executors.wasm.limits import MIB, Limits
from daemon.executors.wasm.pool import PoolSettings
from tests.eventually import eventually

GRACE_S = 0.5


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def executor(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WasmExecutor]:
    settings = PoolSettings(
        workers=2, cache_dir=tmp_path_factory.mktemp("wasm-cache"), kill_grace_s=GRACE_S
    )
    async with WasmExecutor(settings) as ex:
        yield ex


async def run(
    executor: WasmExecutor,
    tmp_path: Path,
    wasm: bytes,
    *,
    limits: Limits | None = None,
    inputs: list[Path] | None = None,
    name: str = "out",
) -> ExecutionResult:
    output_dir = tmp_path / name
    output_dir.mkdir()
    return await executor.run(
        guests.write_module(tmp_path, wasm),
        output_dir=output_dir,
        inputs=inputs or [],
        limits=limits,
    )


async def assert_still_serving(executor: WasmExecutor, tmp_path: Path) -> None:
    stdin = tmp_path / "stdin.txt"
    stdin.write_bytes(b"next job")
    result = await run(executor, tmp_path, guests.echo("next"), inputs=[stdin], name="next")
    assert result.outcome is RunEnd.OK, result.message
    assert result.stdout.startswith(b"next")


async def test_infinite_loop_runs_out_of_fuel(executor: WasmExecutor, tmp_path: Path) -> None:
    result = await run(executor, tmp_path, guests.spin(), limits=Limits(fuel=5_000_000))
    assert result.outcome is RunEnd.OUT_OF_FUEL
    assert "fuel" in result.message
    assert result.fuel_consumed == 5_000_000
    await assert_still_serving(executor, tmp_path)


async def test_infinite_loop_is_interrupted_at_its_deadline_in_place(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    replaced = executor.pool.replaced
    began = time.monotonic()
    result = await run(executor, tmp_path, guests.spin(), limits=Limits(timeout_s=0.5))
    assert result.outcome is RunEnd.TIMED_OUT
    assert "interrupted" in result.message
    assert result.fuel_consumed is None  # wasmtime does not report it after an interrupt
    assert 0.5 <= time.monotonic() - began < 0.5 + GRACE_S
    assert executor.pool.replaced == replaced  # the epoch ended it: no kill needed
    await assert_still_serving(executor, tmp_path)


async def test_unbounded_recursion_traps_with_stack_overflow(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    result = await run(executor, tmp_path, guests.recurse())
    assert result.outcome is RunEnd.TRAPPED
    assert result.trap_code == "stack_overflow"
    assert "stack" in result.message
    await assert_still_serving(executor, tmp_path)


@pytest.mark.parametrize("guest", [guests.grow_until_refused, guests.grow_forever])
async def test_memory_grow_loop_hits_the_memory_limit(
    executor: WasmExecutor, tmp_path: Path, guest: object
) -> None:
    assert callable(guest)
    limits = Limits(memory_bytes=32 * MIB, fuel=20_000_000)
    result = await run(executor, tmp_path, guest(), limits=limits)
    assert result.outcome is RunEnd.MEMORY_LIMIT
    assert "32 MiB" in result.message
    await assert_still_serving(executor, tmp_path)


async def test_oversized_initial_memory_hits_the_memory_limit(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    wasm = guests.huge_initial_memory(pages=2000)  # 125 MiB
    result = await run(executor, tmp_path, wasm, limits=Limits(memory_bytes=64 * MIB))
    assert result.outcome is RunEnd.MEMORY_LIMIT
    assert "2000 pages" in result.message
    await assert_still_serving(executor, tmp_path)


async def test_sleeping_an_hour_in_poll_oneoff_is_killed_at_a_1s_deadline(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    replaced, pids = executor.pool.replaced, executor.pool.pids()
    began = time.monotonic()
    result = await run(executor, tmp_path, guests.sleep(3600), limits=Limits(timeout_s=1))
    elapsed = time.monotonic() - began
    assert result.outcome is RunEnd.TIMED_OUT
    assert "killed while blocked" in result.message
    assert 1 <= elapsed < 1 + GRACE_S + 1
    await assert_still_serving(executor, tmp_path)
    await eventually(lambda: executor.pool.replaced == replaced + 1, timeout=10)
    assert len(executor.pool.pids()) == len(pids)
    assert executor.pool.pids() != pids


async def test_reading_stdin_forever_ends_at_the_deadline(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    stdin = tmp_path / "stdin.txt"
    stdin.write_bytes(b"short")
    result = await run(
        executor,
        tmp_path,
        guests.read_stdin_forever(),
        inputs=[stdin],
        limits=Limits(timeout_s=0.5),
    )
    assert result.outcome is RunEnd.TIMED_OUT
    await assert_still_serving(executor, tmp_path)


async def test_blocking_stdin_read_is_killed_at_the_deadline(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    """stdin is a FIFO whose writer never writes: the guest blocks inside fd_read."""
    fifo = tmp_path / "stdin.fifo"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDWR)  # a writer that stays open and silent
    try:
        wasm = guests.read_stdin_forever()
        request = GuestRun(
            digest=hashlib.sha256(wasm).hexdigest(),
            module_path=guests.write_module(tmp_path, wasm),
            argv=("guest",),
            env=(),
            inputs=(fifo,),  # staged by a hard link: still the FIFO
            output_dir=tmp_path / "out",
            limits=Limits(timeout_s=1),
        )
        began = time.monotonic()
        result = await executor.pool.run(request)
        elapsed = time.monotonic() - began
    finally:
        os.close(holder)
    assert result.outcome is RunEnd.TIMED_OUT
    assert "killed while blocked" in result.message
    assert elapsed < 1 + GRACE_S + 1
    await assert_still_serving(executor, tmp_path)


async def test_100_mib_to_stdout_fails_as_output_too_large(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    began = time.monotonic()
    result = await run(executor, tmp_path, guests.flood(1, 100 * MIB))
    assert result.outcome is RunEnd.OUTPUT_TOO_LARGE
    assert "1 MiB" in result.message
    assert "stdout" in result.message
    assert len(result.stdout) <= MIB
    assert time.monotonic() - began < 5  # ended at the cap, not after writing 100 MiB
    await assert_still_serving(executor, tmp_path)


async def test_stderr_over_its_cap_fails_as_output_too_large(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    result = await run(executor, tmp_path, guests.flood(2, MIB, chunk=4096))
    assert result.outcome is RunEnd.OUTPUT_TOO_LARGE
    assert "64 KiB" in result.message
    assert "stderr" in result.message
    await assert_still_serving(executor, tmp_path)


@pytest.mark.parametrize(
    ("fd", "path"),
    [
        (guests.INPUT_FD, "/etc/passwd"),
        (guests.OUTPUT_FD, "/etc/passwd"),
        (guests.INPUT_FD, "../../../../../../etc/passwd"),
        (guests.OUTPUT_FD, "../../../../../../etc/passwd"),
        (guests.INPUT_FD, "./../outside.txt"),
        (5, "etc/passwd"),  # no such preopen
    ],
)
async def test_paths_outside_the_preopens_are_refused(
    executor: WasmExecutor, tmp_path: Path, fd: int, path: str
) -> None:
    data = tmp_path / "data.txt"
    data.write_text("mine")
    (tmp_path / "outside.txt").write_text("not yours")
    result = await run(executor, tmp_path, guests.try_open(fd, path), inputs=[data])
    assert result.outcome is RunEnd.NONZERO_EXIT
    assert result.exit_code in guests.DENIED_ERRNOS | {8}  # 8 = EBADF for a missing preopen
    await assert_still_serving(executor, tmp_path)


async def test_inputs_are_readable(executor: WasmExecutor, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("the input")
    result = await run(executor, tmp_path, guests.cat_input("0"), inputs=[data])
    assert result.outcome is RunEnd.OK, result.message
    assert result.stdout == b"the input"


@pytest.mark.parametrize(
    "wasm",
    [
        guests.try_open(
            guests.INPUT_FD,
            "0",
            oflags=guests.O_TRUNC,
            rights=guests.RIGHT_READ | guests.RIGHT_WRITE,
        ),
        guests.try_open(guests.INPUT_FD, "0", rights=guests.RIGHT_WRITE),
        guests.try_open(
            guests.INPUT_FD,
            "new.txt",
            oflags=guests.O_CREAT,
            rights=guests.RIGHT_READ | guests.RIGHT_WRITE,
        ),
        guests.try_unlink(guests.INPUT_FD, "0"),
    ],
    ids=["truncate", "open-for-write", "create", "unlink"],
)
async def test_input_folder_is_read_only(
    executor: WasmExecutor, tmp_path: Path, wasm: bytes
) -> None:
    data = tmp_path / "data.txt"
    data.write_text("keep me")
    result = await run(executor, tmp_path, wasm, inputs=[data])
    assert result.outcome is RunEnd.NONZERO_EXIT
    assert result.exit_code in guests.DENIED_ERRNOS
    assert data.read_text() == "keep me"  # staged by hard link: the very same file
    await assert_still_serving(executor, tmp_path)


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../../../../../../etc/passwd"])
async def test_symlinks_left_in_output_are_never_followed(
    executor: WasmExecutor, tmp_path: Path, target: str
) -> None:
    result = await run(executor, tmp_path, guests.symlink_out(target, "leak"))
    assert result.outcome in {RunEnd.OK, RunEnd.NONZERO_EXIT}
    assert [f.name for f in result.outputs] == []
    assert not (tmp_path / "out" / "leak").is_symlink()
    assert list((tmp_path / "out").iterdir()) == []


async def test_unknown_import_is_an_invalid_module(executor: WasmExecutor, tmp_path: Path) -> None:
    result = await run(executor, tmp_path, guests.unknown_import())
    assert result.outcome is RunEnd.INVALID_MODULE
    assert "env::escape" in result.message
    await assert_still_serving(executor, tmp_path)


@pytest.mark.parametrize(
    "wasm",
    [guests.GARBAGE, b"\0asm\x01\0\0\0" + os.urandom(64), b"", b"(module)"],
    ids=["garbage", "truncated", "empty", "wat-text"],
)
async def test_bytes_that_are_not_wasm_are_an_invalid_module(
    executor: WasmExecutor, tmp_path: Path, wasm: bytes
) -> None:
    result = await run(executor, tmp_path, wasm)
    assert result.outcome is RunEnd.INVALID_MODULE
    assert result.message.startswith("invalid module: ")
    await assert_still_serving(executor, tmp_path)


async def test_too_many_output_files_fail_the_job(executor: WasmExecutor, tmp_path: Path) -> None:
    result = await run(executor, tmp_path, guests.write_files(5, 10), limits=Limits(output_files=3))
    assert result.outcome is RunEnd.OUTPUT_TOO_LARGE
    assert "more than 3 files in /output (max_output_files)" in result.message
    assert result.outputs == ()
    assert list((tmp_path / "out").iterdir()) == []


async def test_too_many_output_bytes_fail_the_job(executor: WasmExecutor, tmp_path: Path) -> None:
    result = await run(
        executor, tmp_path, guests.write_files(2, 1000), limits=Limits(output_bytes=1500)
    )
    assert result.outcome is RunEnd.OUTPUT_TOO_LARGE
    assert "more than 1500 bytes written to /output (max_output_bytes)" in result.message
    assert result.outputs == ()
    assert list((tmp_path / "out").iterdir()) == []
