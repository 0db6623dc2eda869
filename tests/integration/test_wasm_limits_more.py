"""More per-run limits against the real executor (worker processes): tables, table
elements and instances hold, and no guest — spinning or asleep in a host call — ever
blocks the daemon's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import test_wasm_guests as guests
import wasmtime

from daemon.exceptions import InvalidArgument
from daemon.executors.result import ExecutionResult, RunEnd
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.limits import Limits
from daemon.executors.wasm.pool import PoolSettings

GRACE_S = 0.5
GROW_REFUSED = 42  # exit code of `table_grow` when its table.grow returns -1


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def executor(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WasmExecutor]:
    settings = PoolSettings(
        workers=2, cache_dir=tmp_path_factory.mktemp("wasm-cache"), kill_grace_s=GRACE_S
    )
    async with WasmExecutor(settings) as ex:
        yield ex


# --- guests ------------------------------------------------------------------


def command(tables: str, body: str = "") -> bytes:
    """A WASI command with `tables` declared at module level and `body` as `_start`."""
    wat = f"""(module
      (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
      (memory (export "memory") 1)
      {tables}
      (func (export "_start") {body}))"""
    return bytes(wasmtime.wat2wasm(wat))


def table_grow(elements: int) -> bytes:
    """Starts with an empty table, grows it by `elements` once; exits 0 when the grow
    succeeds, GROW_REFUSED when it returns -1 (a refused grow does not trap)."""
    return command(
        "(table $t 0 funcref)",
        f"""
        (if (i32.eq (table.grow $t (ref.null func) (i32.const {elements})) (i32.const -1))
          (then (call $proc_exit (i32.const {GROW_REFUSED}))))
        (call $proc_exit (i32.const 0))
        """,
    )


def table_declared(elements: int) -> bytes:
    """A table of `elements` elements from instantiation on; `_start` does nothing."""
    return command(f"(table {elements} funcref)")


def many_tables(count: int) -> bytes:
    return command(" ".join("(table 1 funcref)" for _ in range(count)))


@pytest.mark.parametrize(
    "wasm", [table_grow(10), table_declared(10), many_tables(3)], ids=["grow", "declared", "many"]
)
def test_table_guests_are_valid_wasi_commands(wasm: bytes) -> None:
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.instantiate_pre(wasmtime.Module(engine, wasm))


# --- helpers -----------------------------------------------------------------


async def run(
    executor: WasmExecutor,
    tmp_path: Path,
    wasm: bytes,
    *,
    limits: Limits | None = None,
    name: str = "out",
) -> ExecutionResult:
    return await executor.run(
        guests.write_module(tmp_path, wasm), output_dir=tmp_path / name, limits=limits
    )


async def assert_still_serving(executor: WasmExecutor, tmp_path: Path, name: str = "next") -> None:
    stdin = tmp_path / f"{name}.txt"
    stdin.write_bytes(b"next job")
    result = await executor.run(
        guests.write_module(tmp_path, guests.echo(name)),
        output_dir=tmp_path / name,
        inputs=[stdin],
    )
    assert result.outcome is RunEnd.OK, result.message
    assert result.stdout.startswith(name.encode())
    assert result.outputs[0].path.read_bytes() == b"next job"


# --- tables ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "outcome", "exit_code"),
    [
        (999, RunEnd.NONZERO_EXIT, GROW_REFUSED),  # one element short: refused
        (1000, RunEnd.OK, 0),  # exactly the limit: allowed
        (5000, RunEnd.OK, 0),
    ],
)
async def test_table_grow_past_table_elements_is_refused(
    executor: WasmExecutor, tmp_path: Path, limit: int, outcome: RunEnd, exit_code: int
) -> None:
    result = await run(executor, tmp_path, table_grow(1000), limits=Limits(table_elements=limit))
    assert result.outcome is outcome, result.message
    assert result.exit_code == exit_code
    await assert_still_serving(executor, tmp_path)


async def test_a_refused_table_grow_leaves_the_guest_running(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    """A grow far past the limit (and past what the host could give) is just refused:
    the guest sees -1 and chooses how to end; nothing traps or crashes."""
    result = await run(
        executor, tmp_path, table_grow(100_000_000), limits=Limits(table_elements=100_000)
    )
    assert result.outcome is RunEnd.NONZERO_EXIT, result.message
    assert result.exit_code == GROW_REFUSED
    await assert_still_serving(executor, tmp_path)


async def test_a_table_declared_past_table_elements_fails_at_instantiation(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    result = await run(executor, tmp_path, table_declared(1000), limits=Limits(table_elements=500))
    # Not a memory limit: sandbox.classify_error makes any other limit refused at
    # instantiation an INVALID_MODULE that says which limit it broke.
    assert result.outcome is RunEnd.INVALID_MODULE, result.message
    assert result.message.startswith("invalid module: cannot instantiate under the run's limits")
    assert "table" in result.message
    assert "1000 elements" in result.message
    assert "limits" in result.message
    assert result.exit_code is None
    await assert_still_serving(executor, tmp_path)

    # The same module within the limit runs.
    fits = await run(
        executor, tmp_path, table_declared(1000), limits=Limits(table_elements=1000), name="fits"
    )
    assert fits.outcome is RunEnd.OK, fits.message


async def test_more_tables_than_the_limit_fail_at_instantiation(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    result = await run(executor, tmp_path, many_tables(3), limits=Limits(tables=2))
    assert result.outcome is RunEnd.INVALID_MODULE, result.message
    assert "table count" in result.message
    await assert_still_serving(executor, tmp_path)
    fits = await run(executor, tmp_path, many_tables(3), limits=Limits(tables=3), name="fits")
    assert fits.outcome is RunEnd.OK, fits.message


# --- instances ---------------------------------------------------------------
#
# `instances` cannot be exceeded by a guest, so no test tries. A guest is one core
# wasm module: core wasm has no instruction that instantiates a module (only the
# host can, and the sandbox does it exactly once per run, in a fresh Store), the
# component model and module linking are off (engine.engine_options), and the only
# imports are WASI host functions, which the linker defines as functions, not as
# instances, so they do not count. Every run therefore creates exactly one
# instance, within any limit >= 1. What can be shown is that the limit is applied
# to the run's Store at all: with `instances=0` even the guest's own instance is
# refused. Validation of the field (an integer >= 0) is in Limits.__post_init__;
# tests/unit/test_wasm_units.py only checks the default (`instances == 1`) and its
# bad-value table does not list `instances`, hence the check below.


async def test_the_instances_limit_is_applied_to_the_store(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    refused = await run(executor, tmp_path, guests.exit_with(0), limits=Limits(instances=0))
    assert refused.outcome is RunEnd.INVALID_MODULE, refused.message
    assert "instance count" in refused.message
    one = await run(executor, tmp_path, guests.exit_with(0), limits=Limits(instances=1), name="one")
    assert one.outcome is RunEnd.OK, one.message
    await assert_still_serving(executor, tmp_path)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_instances_must_be_an_integer_at_least_zero(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="instances"):
        Limits(instances=bad)  # type: ignore[arg-type]


# --- the event loop ----------------------------------------------------------


async def test_guests_never_block_the_event_loop(tmp_path: Path) -> None:
    """One guest spins, another sleeps in poll_oneoff (and has its worker killed at its
    deadline); a ticker on the same loop keeps waking up on time throughout.

    A behaviour check, not a benchmark: the bound on the gap is generous.
    """
    async with WasmExecutor(PoolSettings(workers=2, kill_grace_s=GRACE_S)) as ex:
        gaps: list[float] = []
        both_busy = 0  # ticks taken while neither worker was idle
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal both_busy
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                both_busy += not ex.pool.idle_pids()

        ticking = asyncio.create_task(ticker())
        try:
            spinning, sleeping = await asyncio.gather(
                run(ex, tmp_path, guests.spin(), limits=Limits(fuel=10**15, timeout_s=3), name="a"),
                run(ex, tmp_path, guests.sleep(3600), limits=Limits(timeout_s=2), name="b"),
            )
        finally:
            stop.set()
            await ticking

        assert spinning.outcome is RunEnd.TIMED_OUT, spinning.message
        assert "interrupted" in spinning.message  # a CPU loop, ended by its epoch deadline
        assert sleeping.outcome is RunEnd.TIMED_OUT, sleeping.message
        assert "killed while blocked" in sleeping.message  # asleep in a host call

        assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.3f} s"
        assert len(gaps) >= 100  # ~300 if the loop never waited past its 10 ms
        assert both_busy >= 20  # ... and it ticked while both guests held a worker
        await assert_still_serving(ex, tmp_path)
