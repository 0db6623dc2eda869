"""The job runner alone on a real registry: what it does when an executor never answers."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from daemon import runner as runner_mod
from daemon.capability_config import Limits, LocalCapability
from daemon.execution import ExecutionOutcome, ExecutionRequest
from daemon.jobstate import JobState
from daemon.registry import Registry
from daemon.registry.listener import JOB_EVENTS, Listener
from daemon.registry.models import JobSpec
from daemon.storage.cache import DiskCache
from daemon.storage.fabric import Fabric
from daemon.storage.fetcher import Fetcher
from daemon.storage.local_store import LocalStore
from daemon.watch import JobEventHub


class NeverAnswers:
    """An executor whose workers never start: execute() hangs until cancelled."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        return None


async def test_a_hung_executor_cannot_keep_a_job_running_for_ever(
    registry: Registry, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner_mod, "EXECUTOR_GRACE_S", 0.5)
    peer = uuid.uuid4()
    module = tmp_path / "m.wasm"
    module.write_bytes(b"\0asm\1\0\0\0")
    cap = LocalCapability(name="test:hang", kind="wasm", module=str(module), limits=Limits())
    listener = Listener(database_url, [JOB_EVENTS])
    await listener.start()
    hub = JobEventHub(listener)
    await hub.start()
    store = LocalStore(tmp_path / "data")
    executor = NeverAnswers()
    with DiskCache(tmp_path / "cache", max_bytes=1 << 20) as cache:
        fabric = Fabric(store=store, peer_id=peer, owners=lambda key: [], connect=lambda a: None)  # type: ignore[arg-type,return-value]
        runner = runner_mod.Runner(
            registry=registry,
            peer_id=peer,
            capabilities={cap.name: cap},
            executors={"wasm": executor},
            fetcher=Fetcher(cache, local=store, anvil=fabric),
            fabric=fabric,
            hub=hub,
            options=runner_mod.RunnerOptions(
                lease=timedelta(seconds=3),
                poll_interval_s=0.1,
                max_inline_output=1024,
                work_root=tmp_path / "work",
            ),
        )
        job = (
            await registry.jobs.submit(
                JobSpec(capability="test:hang", region="local", timeout_ms=300), peer_id=peer
            )
        ).job
        await runner.start()
        try:
            for _ in range(100):
                final = await registry.jobs.get(job.job_id)
                if final.state.terminal:
                    break
                await asyncio.sleep(0.05)
        finally:
            await runner.close()
            await hub.close()
            await listener.close()
    assert final.state is JobState.TIMED_OUT
    assert "did not finish the job within 0.8 s" in final.error
    assert executor.cancelled == 1, "the hung call was cancelled, so its guest is killed"
