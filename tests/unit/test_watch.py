"""daemon/jobs/events.py: which job changes wake a watcher, and when it must re-read the row."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from daemon.jobs.events import RECENT_BYTES, RECENT_OUTPUT_BYTES, JobEventHub
from daemon.jobs.state import JobState
from daemon.registry.listener import JOB_EVENTS, RECONNECTED, Notification
from daemon.registry.models import Job

NOW = datetime(2026, 11, 29, tzinfo=UTC)


def job(state: JobState, attempt: int, *, job_id: uuid.UUID | None = None) -> Job:
    return Job(
        job_id=job_id or uuid.UUID(int=1),
        capability="text:wordcount",
        region="",
        inputs=(),
        params={},
        resources={},
        locality_key="k",
        idempotency_key=None,
        timeout_ms=0,
        max_attempts=3,
        submitted_by="",
        state=state,
        peer_id=None,
        attempt=attempt,
        lease_expires_at=None,
        output=None,
        output_refs=(),
        error="",
        exit_code=None,
        bytes_fetched_remote=0,
        submitted_at=NOW,
        started_at=None,
        finished_at=None,
        updated_at=NOW,
        run_after=NOW,
        queue_timeout_ms=86_400_000,
        queued_at=NOW,
    )


class FakeListener:
    """Stands in for the LISTEN connection: the test puts notifications in."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Notification] = asyncio.Queue()

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[Notification]]:
        assert channel == JOB_EVENTS
        yield self.queue

    async def event(
        self, job_id: uuid.UUID, state: JobState, attempt: int, peer: uuid.UUID | None = None
    ) -> None:
        payload = json.dumps(
            {
                "job_id": str(job_id),
                "state": state.value,
                "attempt": attempt,
                "peer_id": None if peer is None else str(peer),
            }
        )
        await self.deliver(payload)

    async def deliver(self, payload: str) -> None:
        self.queue.put_nowait(Notification(channel=JOB_EVENTS, payload=payload))
        for _ in range(5):  # let the hub's task take it
            await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def running_hub() -> AsyncIterator[tuple[JobEventHub, FakeListener]]:
    listener = FakeListener()
    hub = JobEventHub(listener)  # type: ignore[arg-type]
    await hub.start()
    try:
        yield hub, listener
    finally:
        await hub.close()


async def test_a_published_row_is_taken_without_a_read() -> None:
    async with running_hub() as (hub, _), hub.watch(uuid.UUID(int=1)) as watch:
        queued = job(JobState.QUEUED, 0)
        hub.publish(job(JobState.RUNNING, 1), epoch=hub.epoch)
        assert watch.changed.is_set()
        best, read = watch.take(queued)
        assert (best.state, best.attempt, read) == (JobState.RUNNING, 1, False)
        assert not watch.changed.is_set()


async def test_echoes_and_old_events_need_no_read_news_does() -> None:
    async with running_hub() as (hub, listener), hub.watch(uuid.UUID(int=1)) as watch:
        running = job(JobState.RUNNING, 1)
        # The insert's event and the claim's own event: old news to a watcher at RUNNING/1.
        await listener.event(running.job_id, JobState.QUEUED, 0)
        await listener.event(running.job_id, JobState.RUNNING, 1)
        assert watch.changed.is_set()
        assert watch.take(running) == (running, False)
        # Rescued elsewhere (queued again, same attempt): news.
        await listener.event(running.job_id, JobState.QUEUED, 1)
        assert watch.take(running) == (running, True)
        # A newer attempt: news.
        await listener.event(running.job_id, JobState.RUNNING, 2)
        assert watch.take(running)[1] is True


async def test_a_published_terminal_row_outranks_a_late_event() -> None:
    async with running_hub() as (hub, listener), hub.watch(uuid.UUID(int=1)) as watch:
        await listener.event(uuid.UUID(int=1), JobState.RUNNING, 1)
        hub.publish(job(JobState.SUCCEEDED, 1), epoch=hub.epoch)
        best, read = watch.take(job(JobState.QUEUED, 0))
        assert (best.state, read) == (JobState.SUCCEEDED, False)


async def test_events_for_other_jobs_do_not_wake_a_watcher() -> None:
    async with running_hub() as (hub, listener), hub.watch(uuid.UUID(int=1)) as watch:
        await listener.event(uuid.UUID(int=2), JobState.RUNNING, 1)
        hub.publish(job(JobState.RUNNING, 1, job_id=uuid.UUID(int=3)), epoch=hub.epoch)
        assert not watch.changed.is_set()


async def test_a_reconnect_makes_every_watcher_read_and_drops_the_cache() -> None:
    async with running_hub() as (hub, listener), hub.watch(uuid.UUID(int=1)) as watch:
        hub.publish(job(JobState.RUNNING, 1), epoch=hub.epoch)
        assert hub.recent(uuid.UUID(int=1)) is not None
        await listener.deliver(RECONNECTED)
        assert hub.recent(uuid.UUID(int=1)) is None
        assert watch.take(job(JobState.RUNNING, 1))[1] is True


async def test_the_recent_cache_follows_events_and_skips_big_outputs() -> None:
    async with running_hub() as (hub, listener):
        job_id = uuid.UUID(int=1)
        hub.publish(job(JobState.QUEUED, 0), epoch=hub.epoch)
        await listener.event(job_id, JobState.QUEUED, 0)  # its own insert: still current
        cached = hub.recent(job_id)
        assert cached is not None and cached.state is JobState.QUEUED
        await listener.event(job_id, JobState.RUNNING, 1)  # claimed on another peer
        assert hub.recent(job_id) is None
        # An older row published late never replaces a newer one.
        hub.publish(job(JobState.SUCCEEDED, 1), epoch=hub.epoch)
        hub.publish(job(JobState.RUNNING, 1), epoch=hub.epoch)
        cached = hub.recent(job_id)
        assert cached is not None and cached.state is JobState.SUCCEEDED
        big = dataclasses.replace(
            job(JobState.SUCCEEDED, 2), output=b"x" * (RECENT_OUTPUT_BYTES + 1)
        )
        hub.publish(big, epoch=hub.epoch)
        assert hub.recent(job_id) is None


async def test_malformed_events_are_ignored() -> None:
    async with running_hub() as (hub, listener), hub.watch(uuid.UUID(int=1)) as watch:
        for payload in [
            "not json",
            "{}",
            json.dumps({"job_id": str(uuid.UUID(int=1)), "state": "melted", "attempt": 1}),
        ]:
            await listener.deliver(payload)
        assert not watch.changed.is_set()
        await listener.event(uuid.UUID(int=1), JobState.RUNNING, 1)
        assert watch.changed.is_set()


async def test_a_row_published_after_a_later_event_is_not_cached() -> None:
    """A slow SubmitJob: the job was claimed and finished elsewhere before its
    insert's row was published here. The stale row must not be served."""
    async with running_hub() as (hub, listener):
        job_id = uuid.UUID(int=1)
        await listener.event(job_id, JobState.RUNNING, 1)
        await listener.event(job_id, JobState.SUCCEEDED, 1)
        hub.publish(job(JobState.QUEUED, 0), epoch=hub.epoch)
        assert hub.recent(job_id) is None


async def test_a_row_written_across_a_reconnect_is_not_cached() -> None:
    async with running_hub() as (hub, listener):
        epoch = hub.epoch  # read before the write, as the writers do
        await listener.deliver(RECONNECTED)
        hub.publish(job(JobState.QUEUED, 0), epoch=epoch)
        assert hub.recent(uuid.UUID(int=1)) is None
        hub.publish(job(JobState.QUEUED, 0), epoch=hub.epoch)
        assert hub.recent(uuid.UUID(int=1)) is not None


async def test_a_re_placement_is_news_to_watchers_and_the_cache() -> None:
    """Only peer_id changes when a queued job moves to another peer."""
    here, there = uuid.UUID(int=10), uuid.UUID(int=20)
    queued_here = dataclasses.replace(job(JobState.QUEUED, 0), peer_id=here)
    async with running_hub() as (hub, listener), hub.watch(uuid.UUID(int=1)) as watch:
        hub.publish(queued_here, epoch=hub.epoch)
        await listener.event(uuid.UUID(int=1), JobState.QUEUED, 0, here)  # its own echo
        assert watch.take(queued_here) == (queued_here, False)
        assert hub.recent(uuid.UUID(int=1)) is queued_here
        await listener.event(uuid.UUID(int=1), JobState.QUEUED, 0, there)  # re-placed
        assert watch.take(queued_here)[1] is True
        assert hub.recent(uuid.UUID(int=1)) is None


async def test_the_cache_is_bounded_by_output_bytes() -> None:
    async with running_hub() as (hub, _):
        per_row = 60 << 10
        rows = [
            dataclasses.replace(
                job(JobState.SUCCEEDED, 1, job_id=uuid.UUID(int=i)), output=b"x" * per_row
            )
            for i in range(1, 400)
        ]
        for row in rows:
            hub.publish(row, epoch=hub.epoch)
        kept = [r for r in rows if hub.recent(r.job_id) is not None]
        assert 0 < len(kept) * per_row <= RECENT_BYTES
        assert hub.recent(rows[-1].job_id) is not None  # the newest stay
        assert hub.recent(rows[0].job_id) is None
