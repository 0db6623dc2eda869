"""The WASM executor end to end: guest ABI, concurrency, worker loss and replacement."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import test_wasm_guests as guests

from daemon import metrics
from daemon.exceptions import DigestMismatch, InvalidArgument, Unavailable
from daemon.executors.result import RunEnd
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.limits import Limits
from daemon.executors.wasm.pool import PoolSettings
from tests.eventually import eventually

WORDCOUNT = Path(__file__).resolve().parents[2] / "guest_modules/dist/text-wordcount.wasm"


@pytest_asyncio.fixture(loop_scope="session")
async def executor(tmp_path: Path) -> AsyncIterator[WasmExecutor]:
    async with WasmExecutor(
        PoolSettings(workers=2, cache_dir=tmp_path / "cache", kill_grace_s=0.3),
        scratch_dir=tmp_path / "scratch",
    ) as ex:
        yield ex


def started_guests() -> float:
    """Guests started in this process so far: a worker reports each start with the
    cache level that had its module, and the pool counts it."""
    return sum(
        metrics.REGISTRY.get_sample_value(
            "anvil_compute_module_cache_lookups_total", {"level": level}
        )
        or 0.0
        for level in (*metrics.MODULE_CACHE_LEVELS, "unknown")
    )


async def a_guest_started(since: float) -> None:
    """Wait until a guest started after `since` (a `started_guests()` reading)."""

    def guest_started() -> bool:
        return started_guests() > since

    await eventually(guest_started, timeout=10)


def fresh_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


async def test_guest_abi_argv_env_stdin_inputs_and_outputs(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.txt", tmp_path / "second.csv"
    first.write_bytes(b"stdin bytes\x00\xff")
    second.write_text("a,b\n")
    result = await executor.run(
        guests.write_module(tmp_path, guests.echo("abi")),
        output_dir=fresh_dir(tmp_path / "out"),
        inputs=[first, second],
        params={"mode": "fast", "note": "a b=c"},
        program="text:echo",
    )
    assert result.outcome is RunEnd.OK, result.message
    assert result.exit_code == 0
    assert result.stdout == b"abi" + b"text:echo\0--mode=fast\0--note=a b=c\0"
    assert result.stderr == b"ANVIL_PARAM_MODE=fast\0ANVIL_PARAM_NOTE=a b=c\0"
    assert [(f.name, f.size) for f in result.outputs] == [("copy.txt", 13)]
    assert result.outputs[0].path.read_bytes() == first.read_bytes()
    assert result.duration_s > 0
    assert result.fuel_consumed is not None
    assert result.fuel_consumed > 0

    # Input i is /input/<i>.
    for index, source in enumerate([first, second]):
        shown = await executor.run(
            guests.write_module(tmp_path, guests.cat_input(str(index))),
            output_dir=fresh_dir(tmp_path / f"cat{index}"),
            inputs=[first, second],
        )
        assert shown.stdout == source.read_bytes()


async def test_no_inputs_means_empty_stdin(executor: WasmExecutor, tmp_path: Path) -> None:
    result = await executor.run(
        guests.write_module(tmp_path, guests.echo()), output_dir=fresh_dir(tmp_path / "out")
    )
    assert result.outcome is RunEnd.OK, result.message
    assert (tmp_path / "out" / "copy.txt").read_bytes() == b""


async def test_nonzero_exit_is_recorded(executor: WasmExecutor, tmp_path: Path) -> None:
    result = await executor.run(
        guests.write_module(tmp_path, guests.exit_with(7)), output_dir=fresh_dir(tmp_path / "o")
    )
    assert result.outcome is RunEnd.NONZERO_EXIT
    assert result.exit_code == 7
    assert result.message == "guest exited with code 7"
    assert not result.succeeded


async def test_bad_requests_raise(executor: WasmExecutor, tmp_path: Path) -> None:
    module = guests.write_module(tmp_path, guests.echo())
    out = fresh_dir(tmp_path / "out")
    (out / "stale").write_text("x")
    with pytest.raises(InvalidArgument, match="not empty"):
        await executor.run(module, output_dir=out)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InvalidArgument, match="cannot create output folder"):
        await executor.run(module, output_dir=tmp_path / "a-file" / "out")
    with pytest.raises(InvalidArgument, match="param name"):
        await executor.run(module, output_dir=fresh_dir(tmp_path / "o1"), params={"a=b": "c"})
    with pytest.raises(InvalidArgument, match="not a readable file"):
        await executor.run(
            module, output_dir=fresh_dir(tmp_path / "o2"), inputs=[tmp_path / "nope"]
        )
    with pytest.raises(InvalidArgument, match="not a sha256"):
        await executor.run(module, output_dir=fresh_dir(tmp_path / "o3"), digest="../etc")
    with pytest.raises(DigestMismatch):
        await executor.run(module, output_dir=fresh_dir(tmp_path / "o4"), digest="0" * 64)
    # ...and the executor still serves.
    ok = await executor.run(module, output_dir=fresh_dir(tmp_path / "o5"))
    assert ok.outcome is RunEnd.OK


async def test_200_jobs_over_8_modules_from_4_tasks(executor: WasmExecutor, tmp_path: Path) -> None:
    modules = [guests.write_module(tmp_path, guests.echo(f"module-{m}")) for m in range(8)]
    assert len({p.name for p in modules}) == 8

    async def submitter(task: int) -> list[tuple[int, bool]]:
        checked = []
        for n in range(50):
            job = task * 50 + n
            m = job % 8
            stdin = tmp_path / f"stdin-{job}"
            stdin.write_bytes(f"payload {job}".encode())
            result = await executor.run(
                modules[m],
                output_dir=fresh_dir(tmp_path / f"out-{job}"),
                inputs=[stdin],
                params={"job": str(job)},
            )
            good = (
                result.outcome is RunEnd.OK
                and result.stdout == f"module-{m}guest\0--job={job}\0".encode()
                and result.stderr == f"ANVIL_PARAM_JOB={job}\0".encode()
                and result.outputs[0].path.read_bytes() == f"payload {job}".encode()
            )
            checked.append((job, good))
        return checked

    began = time.monotonic()
    done = await asyncio.gather(*(submitter(t) for t in range(4)))
    jobs = [job for batch in done for job in batch]
    assert len(jobs) == 200
    assert [job for job, good in jobs if not good] == []
    assert time.monotonic() - began < 60


async def test_a_worker_killed_mid_run_is_reported_and_replaced(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    pool = executor.pool
    since = started_guests()
    task = asyncio.create_task(
        executor.run(
            guests.write_module(tmp_path, guests.sleep(3600)),
            output_dir=fresh_dir(tmp_path / "o"),
            limits=Limits(timeout_s=30),
        )
    )
    await a_guest_started(since)  # killed from now on, its run is lost, not retried
    busy = pool.busy_pids()
    assert len(busy) == 1
    os.kill(busy[0], signal.SIGKILL)
    result = await asyncio.wait_for(task, 10)
    assert result.outcome is RunEnd.CRASHED
    # Its exit status reads "killed by signal 9", or 255 when another waiter in
    # the test process reaped the child first (asyncio then cannot know it).
    assert f"worker {busy[0]} " in result.message and "while the guest ran" in result.message
    assert "killed by signal 9" in result.message or "status 255" in result.message
    await eventually(lambda: pool.replaced == 1 and len(pool.pids()) == 2, timeout=10)
    assert busy[0] not in pool.pids()
    ok = await executor.run(
        guests.write_module(tmp_path, guests.echo()), output_dir=fresh_dir(tmp_path / "o2")
    )
    assert ok.outcome is RunEnd.OK


async def test_an_idle_worker_killed_is_replaced_without_failing_a_job(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    pool = executor.pool
    victim = pool.idle_pids()[0]  # the next job's worker
    os.kill(victim, signal.SIGKILL)
    module = guests.write_module(tmp_path, guests.echo())
    result = await executor.run(module, output_dir=fresh_dir(tmp_path / "o"))
    assert result.outcome is RunEnd.OK, result.message
    await eventually(lambda: len(pool.pids()) == 2 and pool.replaced == 1, timeout=10)
    assert victim not in pool.pids()


async def test_cancelling_a_run_kills_the_guest(executor: WasmExecutor, tmp_path: Path) -> None:
    pool = executor.pool
    since = started_guests()
    task = asyncio.create_task(
        executor.run(
            guests.write_module(tmp_path, guests.spin()),
            output_dir=fresh_dir(tmp_path / "o"),
            limits=Limits(timeout_s=60, fuel=10**15),
        )
    )
    await a_guest_started(since)
    busy = pool.busy_pids()
    assert len(busy) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: pool.replaced == 1 and len(pool.pids()) == 2, timeout=10)
    assert busy[0] not in pool.pids()


async def test_compile_time_bound(tmp_path: Path) -> None:
    settings = PoolSettings(workers=1, compile_timeout_s=0.001)
    async with WasmExecutor(settings) as ex:
        result = await ex.run(
            guests.write_module(tmp_path, guests.echo()), output_dir=fresh_dir(tmp_path / "o")
        )
        assert result.outcome is RunEnd.INVALID_MODULE
        assert "longer than 0.001 s" in result.message


def scratch_contents(scratch: Path) -> set[str]:
    """What the workers keep in scratch, with their pids taken out."""
    return {
        "/".join(["worker-N", *p.relative_to(scratch).parts[1:]])
        for p in scratch.rglob("*")
        if p.relative_to(scratch).parts[0].startswith("worker-")
    } | {p.name for p in scratch.iterdir() if not p.name.startswith("worker-")}


# Per worker: the /input of runs without inputs, and the folder its /output tmpfs
# is mounted on (in the worker's own mount namespace only): both empty here.
AT_REST = {"worker-N", "worker-N/empty", "worker-N/output"}


async def test_scratch_holds_nothing_staged_after_runs_and_crashes(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    fresh_dir(scratch / "worker-99999999" / "input")  # left by a crashed daemon
    async with WasmExecutor(PoolSettings(workers=1), scratch_dir=scratch) as ex:
        # One folder per worker, holding only what it keeps at rest.
        assert scratch_contents(scratch) == AT_REST
        stdin = tmp_path / "stdin"
        stdin.write_text("x")
        result = await ex.run(
            guests.write_module(tmp_path, guests.echo()),
            output_dir=fresh_dir(tmp_path / "o"),
            inputs=[stdin],
        )
        assert result.outcome is RunEnd.OK
        assert scratch_contents(scratch) <= AT_REST

        # A worker killed while its guest reads a staged input: the pool removes
        # the dead worker's folder, the replacement makes its own.
        (victim,) = ex.pool.pids()
        task = asyncio.create_task(
            ex.run(
                guests.write_module(tmp_path, guests.sleep(3600)),
                output_dir=tmp_path / "o2",
                inputs=[stdin],
                limits=Limits(timeout_s=30),
            )
        )
        await eventually((scratch / f"worker-{victim}" / "input" / "0").exists, timeout=10)
        os.kill(victim, signal.SIGKILL)
        assert (await task).outcome is RunEnd.CRASHED
        await eventually(lambda: ex.pool.replaced == 1 and len(ex.pool.pids()) == 1, timeout=10)
        assert not (scratch / f"worker-{victim}").exists()
        assert scratch_contents(scratch) <= AT_REST
    assert list(scratch.iterdir()) == []  # workers that exit remove their own


async def test_an_output_folder_is_made_and_removed_again_when_left_empty(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    quiet = await executor.run(
        guests.write_module(tmp_path, guests.exit_with(0)), output_dir=tmp_path / "j1.out"
    )
    assert quiet.outcome is RunEnd.OK and quiet.outputs == ()
    assert not (tmp_path / "j1.out").exists()  # nothing left for the caller to remove
    wrote = await executor.run(
        guests.write_module(tmp_path, guests.echo()), output_dir=tmp_path / "j2.out"
    )
    assert [f.path for f in wrote.outputs] == [tmp_path / "j2.out" / "copy.txt"]
    assert (tmp_path / "j2.out" / "copy.txt").read_bytes() == b""


async def test_closed_executor_refuses_work(tmp_path: Path) -> None:
    ex = WasmExecutor(PoolSettings(workers=1))
    await ex.start()
    pids = ex.pool.pids()
    await ex.close()
    assert ex.pool.pids() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(Unavailable):
        await ex.run(
            guests.write_module(tmp_path, guests.echo()), output_dir=fresh_dir(tmp_path / "o")
        )


async def test_jobs_prefer_a_worker_that_has_their_module(tmp_path: Path) -> None:
    async with WasmExecutor(PoolSettings(workers=2)) as ex:
        module = guests.write_module(tmp_path, guests.echo("affinity"))
        digest = hashlib.sha256(module.read_bytes()).hexdigest()
        await ex.run(module, output_dir=fresh_dir(tmp_path / "o0"))
        (holder,) = ex.pool.pids_holding(digest)
        for i in range(1, 6):
            await ex.run(
                guests.write_module(tmp_path, guests.echo(f"other-{i}")),
                output_dir=fresh_dir(tmp_path / f"x{i}"),
            )
            await ex.run(module, output_dir=fresh_dir(tmp_path / f"o{i}"))
            assert holder in ex.pool.pids_holding(digest)
        # Both workers hold it only if affinity failed at least once.
        assert ex.pool.pids_holding(digest) == [holder]


async def test_a_real_toolchain_module_runs(executor: WasmExecutor, tmp_path: Path) -> None:
    """text:wordcount, built from C by the project's Zig toolchain (guest_modules/dist)."""
    module = WORDCOUNT
    words = tmp_path / "words.txt"
    words.write_text("the cat and the hat\nthe end\n")
    result = await executor.run(
        module,
        output_dir=fresh_dir(tmp_path / "o1"),
        inputs=[words],
        params={"top": "1"},
        program="text:wordcount",
    )
    assert result.outcome is RunEnd.OK, result.stderr
    assert json.loads(result.stdout) == {"lines": 2, "words": 7, "bytes": 28, "top": [["the", 3]]}
    typo = await executor.run(
        module,
        output_dir=fresh_dir(tmp_path / "o2"),
        inputs=[words],
        params={"tpo": "1"},
        program="text:wordcount",
    )
    assert typo.outcome is RunEnd.NONZERO_EXIT
    assert typo.stderr == b"text:wordcount: unknown param 'tpo'\n"


async def test_the_job_runners_adapter(tmp_path: Path) -> None:
    """WasmJobExecutor as `anvil-compute serve` builds it, fed the runner's request type."""
    from daemon import config
    from daemon.capability_config import CapabilityLimits, LocalCapability
    from daemon.executors.result import ExecutionRequest, ending
    from daemon.executors.wasm.job import WasmJobExecutor
    from daemon.jobs.state import JobState

    settings = config.load(environ={}, overrides={"data_dir": tmp_path / "data"})
    adapter = await WasmJobExecutor.create(settings)
    try:
        words = tmp_path / "words.txt"
        words.write_text("a b a\n")

        async def execute(params: dict[str, str], fuel: int = 0) -> tuple[JobState, str, bytes]:
            out = fresh_dir(tmp_path / f"out-{'-'.join(params)}-{fuel}")
            outcome = await adapter.execute(
                ExecutionRequest(
                    job_id="job-1",
                    capability=LocalCapability(
                        name="text:wordcount",
                        kind="wasm",
                        module=str(WORDCOUNT),
                        limits=CapabilityLimits(fuel=fuel),
                    ),
                    module_path=WORDCOUNT,
                    inputs=(words,),
                    params=params,
                    output_dir=out,
                    timeout_s=10,
                )
            )
            state, error = ending(outcome)
            return state, error, outcome.stdout

        state, error, stdout = await execute({"top": "1"})
        assert (state, error) == (JobState.SUCCEEDED, "")
        assert json.loads(stdout)["top"] == [["a", 2]]
        state, error, _ = await execute({"bogus": "1"})
        assert (state, error) == (JobState.FAILED, "text:wordcount: unknown param 'bogus'")
        state, error, _ = await execute({}, fuel=1000)
        assert state is JobState.FAILED
        assert "out of fuel" in error
        assert (tmp_path / "data" / "wasm-cache" / "cache.key").is_file()
    finally:
        await adapter.close()
