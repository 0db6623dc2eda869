"""The job runner alone on a real registry: what it does when an executor never answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.capability_config import CapabilityLimits, LocalCapability
from daemon.executors import result as results
from daemon.executors.result import ExecutionRequest, ExecutionResult, OutputFile
from daemon.jobs import attempt as attempt_mod
from daemon.jobs import runner as runner_mod
from daemon.jobs.events import JobEventHub
from daemon.jobs.state import JobState
from daemon.registry import Registry
from daemon.registry.listener import JOB_EVENTS, Listener
from daemon.registry.models import Job, JobSpec
from daemon.storage.cache import DiskCache
from daemon.storage.fabric import Fabric
from daemon.storage.fetcher import Fetcher
from daemon.storage.local_store import LocalStore
from daemon.storage.refs import parse_ref
from tests.eventually import eventually
from tests.registry_link import RegistryLink


class NeverAnswers:
    """An executor whose workers never start: execute() hangs until cancelled."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        return None


async def ended(registry: Registry, job_id: uuid.UUID, *, timeout: float = 10) -> Job:
    """The job once it is in a terminal state; AssertionError if not within `timeout` s."""

    async def terminal() -> Job | None:
        job = await registry.jobs.get(job_id)
        return job if job.state.terminal else None

    return await eventually(terminal, timeout=timeout)


@contextlib.asynccontextmanager
async def started_runner(
    registry: Registry,
    database_url: str,
    tmp_path: Path,
    *,
    peer: uuid.UUID,
    cap: LocalCapability,
    executor: object,
    fabric_type: type[Fabric] = Fabric,
) -> AsyncIterator[runner_mod.Runner]:
    """A Runner for `cap` on `registry`, started (its hub listening on the real
    database); closed with everything it uses when the block ends."""
    listener = Listener(database_url, [JOB_EVENTS])
    await listener.start()
    hub = JobEventHub(listener)
    await hub.start()
    store = LocalStore(tmp_path / "data")
    try:
        with DiskCache(tmp_path / "cache", max_bytes=1 << 20) as cache:
            fabric = fabric_type(
                store=store, peer_id=peer, owners=lambda key: [], connect=lambda a: None
            )  # type: ignore[arg-type,return-value]
            runner = runner_mod.Runner(
                registry=registry,
                peer_id=peer,
                capabilities={cap.name: cap},
                executors={"wasm": executor},  # type: ignore[dict-item]
                fetcher=Fetcher(cache, local=store, anvil=fabric),
                fabric=fabric,
                hub=hub,
                options=runner_mod.RunnerOptions(
                    lease=timedelta(seconds=3),
                    poll_interval_s=0.1,
                    work_root=tmp_path / "work",
                    attempt=attempt_mod.AttemptOptions(max_inline_output=1024),
                ),
            )
            await runner.start()
            try:
                yield runner
            finally:
                await runner.close()
    finally:
        await hub.close()
        await listener.close()


async def test_a_hung_executor_cannot_keep_a_job_running_for_ever(
    registry: Registry, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attempt_mod, "EXECUTOR_GRACE_S", 0.5)
    peer = uuid.uuid4()
    module = tmp_path / "m.wasm"
    module.write_bytes(b"\0asm\1\0\0\0")
    cap = LocalCapability(
        name="test:hang", kind="wasm", module=str(module), limits=CapabilityLimits()
    )
    executor = NeverAnswers()
    job = (
        await registry.jobs.submit(
            JobSpec(capability="test:hang", region="local", timeout_ms=300), peer_id=peer
        )
    ).job
    async with started_runner(
        registry, database_url, tmp_path, peer=peer, cap=cap, executor=executor
    ):
        final = await ended(registry, job.job_id, timeout=5)
    assert final.state is JobState.TIMED_OUT
    assert "did not finish the job within 0.8 s" in final.error
    assert executor.cancelled == 1, "the hung call was cancelled, so its guest is killed"


class Sleeps:
    """An executor whose guest runs until it is killed; records when."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.killed_at: float | None = None

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.killed_at = time.time()
            raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        return None


async def test_a_peer_cut_off_from_the_registry_kills_its_guest_before_its_lease_ends(
    registry: Registry, database_url: str, tmp_path: Path
) -> None:
    """Past its lease another peer may rescue the job and run it again: the cut-off
    peer must have stopped its own run by then, and must not write a result."""
    link = RegistryLink(database_url)
    cut_off = await Registry.connect(await link.start(), max_size=4, run_migrations=False)
    peer = uuid.uuid4()
    cap = LocalCapability(name="test:long", kind="wasm", module=str(tmp_path / "m.wasm"))
    executor = Sleeps()
    job = (
        await registry.jobs.submit(
            JobSpec(capability="test:long", region="local", timeout_ms=60_000), peer_id=peer
        )
    ).job
    try:
        async with started_runner(
            cut_off, database_url, tmp_path, peer=peer, cap=cap, executor=executor
        ):
            await asyncio.wait_for(executor.started.wait(), 10)
            claimed = await registry.jobs.get(job.job_id)
            assert claimed.state is JobState.RUNNING and claimed.lease_expires_at is not None
            await link.cut()

            def guest_stopped() -> bool:
                return executor.killed_at is not None

            await eventually(guest_stopped, timeout=5)
    finally:
        await cut_off.close()
    assert executor.killed_at is not None
    latest_expiry = (await registry.jobs.get(job.job_id)).lease_expires_at
    assert latest_expiry is not None
    assert executor.killed_at < latest_expiry.timestamp(), "the guest outlived its lease"
    after = await registry.jobs.get(job.job_id)
    assert after.state is JobState.RUNNING  # no result was written; a rescue takes it from here


class LeavesFiles:
    """An executor whose guest ends at once, in `state`, having left `count` files."""

    def __init__(self, state: JobState, count: int) -> None:
        self.state = state
        self.count = count

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        request.output_dir.mkdir(parents=True)
        files = []
        for i in range(self.count):
            path = request.output_dir / f"f{i}"
            path.write_bytes(b"x" * 100)
            files.append(OutputFile(name=path.name, path=path, size=100))
        end = results.ok() if self.state is JobState.SUCCEEDED else results.nonzero_exit(1)
        return end.with_capture(
            stdout=b"y" * 5000, stderr=b"", duration_s=0, fuel_consumed=None
        ).with_outputs(tuple(files))

    async def close(self) -> None:
        return None


class SlowFabric(Fabric):
    """The real store, reached over a link that takes `delay_s` per object."""

    delay_s = 0.2

    async def put_file(self, path: Path, *, bucket: str, key: str) -> Any:
        await asyncio.sleep(self.delay_s)
        return await super().put_file(path, bucket=bucket, key=key)


async def run_one(
    registry: Registry,
    database_url: str,
    tmp_path: Path,
    executor: object,
    *,
    timeout_ms: int = 5000,
    fabric_type: type[Fabric] = Fabric,
) -> Job:
    """Submit one job of a capability `executor` runs, start a runner on it, and
    return the job once it has ended."""
    peer = uuid.uuid4()
    cap = LocalCapability(name="test:one", kind="wasm", module=str(tmp_path / "m.wasm"))
    spec = JobSpec(capability="test:one", region="local", timeout_ms=timeout_ms)
    job = (await registry.jobs.submit(spec, peer_id=peer)).job
    async with started_runner(
        registry,
        database_url,
        tmp_path,
        peer=peer,
        cap=cap,
        executor=executor,
        fabric_type=fabric_type,
    ):
        return await ended(registry, job.job_id)


async def test_storing_outputs_counts_against_the_jobs_timeout(
    registry: Registry, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attempt_mod, "UPLOAD_GRACE_S", 0.2)
    began = time.monotonic()
    final = await run_one(
        registry,
        database_url,
        tmp_path,
        LeavesFiles(JobState.SUCCEEDED, 50),  # 50 x 0.2 s to store
        timeout_ms=500,
        fabric_type=SlowFabric,
    )
    assert final.state is JobState.TIMED_OUT, final
    assert "storing the job's outputs did not finish within its timeout of 0.5 s" in final.error
    assert final.output_refs == ()
    assert time.monotonic() - began < 5


async def test_nothing_of_a_failed_attempt_is_stored(
    registry: Registry, database_url: str, tmp_path: Path
) -> None:
    final = await run_one(registry, database_url, tmp_path, LeavesFiles(JobState.FAILED, 3))
    assert final.state is JobState.FAILED
    assert final.output_refs == ()
    # Its stdout is kept inline, cut to max_inline_output; no object was stored.
    assert final.output == b"y" * 1024
    assert LocalStore(tmp_path / "data").keys("anvil-results") == []


class LeavesNested:
    """An executor whose guest leaves `a/x` and `b/x`: two outputs of one name."""

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        files = []
        for folder in ("a", "b"):
            (request.output_dir / folder).mkdir(parents=True)
            path = request.output_dir / folder / "x"
            path.write_bytes(folder.encode())
            files.append(OutputFile(name=f"{folder}/x", path=path, size=1))
        return results.ok().with_outputs(tuple(files))

    async def close(self) -> None:
        return None


async def test_nested_outputs_keep_their_folders_in_object_keys(
    registry: Registry, database_url: str, tmp_path: Path
) -> None:
    final = await run_one(registry, database_url, tmp_path, LeavesNested())
    assert final.state is JobState.SUCCEEDED, final.error
    keys = [parse_ref(ref).key for ref in final.output_refs]
    assert keys == [f"{final.job_id}/1/output/a/x", f"{final.job_id}/1/output/b/x"]
    store = LocalStore(tmp_path / "data")
    assert [store.head("anvil-results", k).size for k in keys] == [1, 1]
