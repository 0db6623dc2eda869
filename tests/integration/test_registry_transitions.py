"""`daemon.jobs.state` states the machine the SQL keeps: checked on a real PostgreSQL.

Every write in sql/queries.sql that moves a job (claim, claim_next, finish,
release, rescue, cancel, assign, unplace, fail overdue) is tried on a job in
every state, with attempts left and with none. A write the compare-and-set
refuses leaves the job and its events as they were; a write it takes makes one
change, and every change job_events records is one `can_transition` allows.
A write that queues a job again starts its queue timeout over (queued_at); one
that keeps it queued does not.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest

from daemon.exceptions import FailedPrecondition, JobAlreadyFinished, StaleAttempt
from daemon.jobs.state import FINISH_STATES, TERMINAL_STATES, JobState, can_transition
from daemon.registry import Registry
from daemon.registry.models import AttemptResult, Job, JobSpec

LEASE = timedelta(seconds=30)
Q, R = JobState.QUEUED, JobState.RUNNING


@dataclass(frozen=True)
class Move:
    """One write of the job store, made on `job` (handed over to peer `other` if it moves)."""

    name: str
    act: Callable[[Registry, Job, uuid.UUID], Awaitable[object]]
    lease_ended: bool = False  # the job's lease runs out first (in SQL time)
    overdue: bool = False  # the job has been queued past its queue timeout (in SQL time)


def finishing(state: JobState) -> Move:
    async def act(registry: Registry, job: Job, other: uuid.UUID) -> object:
        assert job.peer_id is not None
        outcome = AttemptResult(state=state)
        return await registry.jobs.finish(
            job.job_id, peer_id=job.peer_id, attempt=job.attempt, outcome=outcome
        )

    return Move(f"finish {state}", act)


def releasing(*, spare: bool) -> Move:
    async def act(registry: Registry, job: Job, other: uuid.UUID) -> object:
        assert job.peer_id is not None
        return await registry.jobs.release(
            job.job_id,
            peer_id=job.peer_id,
            attempt=job.attempt,
            next_peer_id=other,
            error="handed back",
            spare=spare,
        )

    return Move("release spare" if spare else "release", act)


def rescuing(*, lease_ended: bool) -> Move:
    async def act(registry: Registry, job: Job, other: uuid.UUID) -> object:
        return await registry.jobs.rescue(
            job.job_id, attempt=job.attempt, next_peer_id=other, error="lease expired"
        )

    return Move("rescue" if lease_ended else "rescue in its lease", act, lease_ended=lease_ended)


async def _claim(registry: Registry, job: Job, other: uuid.UUID) -> object:
    assert job.peer_id is not None
    return await registry.jobs.claim(job.job_id, job.peer_id, lease=LEASE)


async def _claim_next(registry: Registry, job: Job, other: uuid.UUID) -> object:
    assert job.peer_id is not None  # each job has its peer to itself
    return await registry.jobs.claim_next(job.peer_id, lease=LEASE)


async def _cancel(registry: Registry, job: Job, other: uuid.UUID) -> object:
    return await registry.jobs.cancel(job.job_id, reason="asked to")


async def _assign(registry: Registry, job: Job, other: uuid.UUID) -> object:
    return await registry.jobs.assign(job.job_id, other, from_peer_id=job.peer_id)


async def _unplace(registry: Registry, job: Job, other: uuid.UUID) -> object:
    assert job.peer_id is not None
    return await registry.jobs.unplace_peer_queue(job.peer_id)


async def _fail_overdue(registry: Registry, job: Job, other: uuid.UUID) -> object:
    return await registry.jobs.fail_overdue(job.job_id, attempt=job.attempt, error="no peer ran it")


MOVES = [
    Move("claim", _claim),
    Move("claim_next", _claim_next),
    *(finishing(state) for state in sorted(FINISH_STATES)),
    releasing(spare=False),
    releasing(spare=True),
    rescuing(lease_ended=False),
    rescuing(lease_ended=True),
    Move("cancel", _cancel),
    Move("assign", _assign),
    Move("unplace", _unplace),
    Move("fail overdue", _fail_overdue, overdue=True),
]

# Which writes the SQL takes, by the job's state: the machine as the store sees it.
TAKEN = {
    Q: {"claim", "claim_next", "cancel", "assign", "unplace", "fail overdue"},
    R: {
        "finish failed",
        "finish succeeded",
        "finish timed_out",
        "release",
        "release spare",
        "rescue",
        "cancel",
    },
    **{state: set() for state in TERMINAL_STATES},
}


async def job_in(registry: Registry, state: JobState, *, max_attempts: int) -> Job:
    """A new job, on a peer of its own, brought to `state` by the store's own writes."""
    peer = uuid.uuid4()
    spec = JobSpec(
        capability="text:wordcount", region="local", timeout_ms=10_000, max_attempts=max_attempts
    )
    job = (await registry.jobs.submit(spec, peer_id=peer)).job
    if state is JobState.CANCELLED:
        return await registry.jobs.cancel(job.job_id)
    if state is Q:
        return job
    running = await registry.jobs.claim(job.job_id, peer, lease=LEASE)
    assert running is not None
    if state is R:
        return running
    outcome = AttemptResult(state=state)
    return await registry.jobs.finish(job.job_id, peer_id=peer, attempt=1, outcome=outcome)


async def end_lease(registry: Registry, job_id: uuid.UUID) -> None:
    async with registry.pool.connection() as conn:
        await conn.execute(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 second' "
            "WHERE job_id = %s AND state = 'running'",
            (job_id,),
        )


async def end_queue_timeout(registry: Registry, job_id: uuid.UUID) -> None:
    """Queued (or last queued) longer ago than its queue timeout, the default 24 h."""
    async with registry.pool.connection() as conn:
        await conn.execute(
            "UPDATE jobs SET queued_at = queued_at - interval '2 days' WHERE job_id = %s",
            (job_id,),
        )


async def take(move: Move, registry: Registry, job: Job) -> bool:
    """Whether the store took the write (the compare-and-set matched the row)."""
    try:
        result = await move.act(registry, job, uuid.uuid4())
    except (JobAlreadyFinished, StaleAttempt, FailedPrecondition):
        return False
    return bool(result)  # None, [] or 0: nothing matched


async def state_changes(registry: Registry) -> set[tuple[JobState, JobState]]:
    """(from, to) of every recorded change of state (not inserts, not re-placements)."""
    async with registry.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT DISTINCT from_state, to_state FROM job_events "
            "WHERE from_state IS NOT NULL AND from_state <> to_state"
        )
        rows = await cur.fetchall()
    return {(JobState(r["from_state"]), JobState(r["to_state"])) for r in rows}


@pytest.mark.parametrize("max_attempts", [1, 3], ids=["last-attempt", "attempts-left"])
async def test_the_sql_moves_a_job_only_as_can_transition_allows(
    registry: Registry, max_attempts: int
) -> None:
    taken: dict[JobState, set[str]] = {state: set() for state in JobState}
    for state in JobState:
        for move in MOVES:
            job = await job_in(registry, state, max_attempts=max_attempts)
            if move.lease_ended:
                await end_lease(registry, job.job_id)
                job = await registry.jobs.get(job.job_id)
            if move.overdue:
                await end_queue_timeout(registry, job.job_id)
                job = await registry.jobs.get(job.job_id)
            events = await registry.jobs.events(job.job_id)
            took = await take(move, registry, job)
            after = await registry.jobs.get(job.job_id)
            new_events = (await registry.jobs.events(job.job_id))[len(events) :]
            where = f"{move.name} on a {state} job"
            if not took:
                assert after == job, f"{where}: refused, yet the job changed"
                assert new_events == [], f"{where}: refused, yet it left events"
                continue
            taken[state].add(move.name)
            (event,) = new_events
            assert (event.from_state, event.to_state) == (state, after.state), where
            if after.state is state:  # a re-placement, not a change of state
                assert state is Q and after.peer_id != job.peer_id, where
            else:
                assert can_transition(state, after.state), f"{where}: {state} -> {after.state}"
            if (state, after.state) == (R, Q):  # queued again: its queue timeout starts over
                assert after.queued_at > job.queued_at, where
            else:
                assert after.queued_at == job.queued_at, where
    assert taken == TAKEN

    # Every state change recorded, by these moves and by the writes that set the
    # jobs up: allowed. The last attempt's release and rescue end it FAILED; a
    # job queued past its queue timeout ends FAILED without running.
    changes = await state_changes(registry)
    assert all(can_transition(a, b) for a, b in changes), changes
    allowed = {(a, b) for a in JobState for b in JobState if can_transition(a, b)}
    assert allowed == changes, "every change the machine allows, some query makes"


async def test_every_job_starts_queued(registry: Registry) -> None:
    peer = uuid.uuid4()
    spec = JobSpec(capability="text:wordcount", region="local", timeout_ms=1000)
    keyed = JobSpec(
        capability="text:wordcount", region="local", timeout_ms=1000, idempotency_key="k"
    )
    jobs = [(await registry.jobs.submit(s, peer_id=peer)).job for s in (spec, keyed)]
    for job in jobs:
        (event,) = await registry.jobs.events(job.job_id)
        assert (event.from_state, event.to_state, event.attempt) == (None, Q, 0)
