"""The job state machine on a real PostgreSQL, under concurrency."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections import Counter
from datetime import timedelta

import pytest

from daemon.exceptions import (
    FailedPrecondition,
    IdempotencyConflict,
    InvalidArgument,
    JobAlreadyFinished,
    JobNotFound,
    StaleAttempt,
)
from daemon.jobs.state import JobState
from daemon.registry import Registry, queries
from daemon.registry.driver import translate_errors
from daemon.registry.models import (
    DEFAULT_QUEUE_TIMEOUT_MS,
    MAX_QUEUE_TIMEOUT_MS,
    AttemptResult,
    Job,
    JobSpec,
)

LEASE = timedelta(seconds=30)
SHORT_LEASE = timedelta(milliseconds=100)


def spec(**overrides: object) -> JobSpec:
    fields: dict[str, object] = {
        "capability": "text:wordcount",
        "region": "local",
        "timeout_ms": 10_000,
    }
    fields.update(overrides)
    return JobSpec(**fields)  # type: ignore[arg-type]


async def submit_many(registry: Registry, n: int, peer: uuid.UUID) -> list[Job]:
    sem = asyncio.Semaphore(10)

    async def one(i: int) -> Job:
        async with sem:
            result = await registry.jobs.submit(spec(params={"i": str(i)}), peer_id=peer)
            return result.job

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def expire_leases(registry: Registry) -> None:
    async with registry.pool.connection() as conn:
        await conn.execute(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE state = 'running'"
        )


async def pass_time(registry: Registry, seconds: float) -> None:
    """Move every job's clock `seconds` on: leases and backoffs end that much sooner."""
    async with registry.pool.connection() as conn:
        await conn.execute(
            "UPDATE jobs SET lease_expires_at = lease_expires_at - make_interval(secs => %(s)s), "
            "run_after = run_after - make_interval(secs => %(s)s)",
            {"s": seconds},
        )


@pytest.mark.slow
async def test_eight_claimers_claim_each_of_2000_jobs_exactly_once(registry: Registry) -> None:
    peer = uuid.uuid4()
    submitted = await submit_many(registry, 2000, peer)
    claims: list[tuple[int, Job]] = []

    async def claimer(worker: int) -> None:
        while True:
            got = await registry.jobs.claim_next(peer, lease=LEASE, limit=7)
            if not got:
                return
            assert len(got) <= 7
            claims.extend((worker, job) for job in got)

    await asyncio.gather(*(claimer(w) for w in range(8)))
    counts = Counter(job.job_id for _, job in claims)
    assert len(counts) == 2000
    assert set(counts.values()) == {1}
    assert set(counts) == {job.job_id for job in submitted}
    assert all(job.state is JobState.RUNNING and job.attempt == 1 for _, job in claims)
    assert len({w for w, _ in claims}) > 1, "the claimers should have shared the work"
    async with registry.pool.connection() as conn:
        cur = await conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
        assert await cur.fetchall() == [{"state": "running", "count": 2000}]


async def test_claim_next_takes_oldest_first_and_only_this_peers_jobs(registry: Registry) -> None:
    me, other = uuid.uuid4(), uuid.uuid4()
    mine = [(await registry.jobs.submit(spec(), peer_id=me)).job for _ in range(5)]
    await registry.jobs.submit(spec(), peer_id=other)
    got = await registry.jobs.claim_next(me, lease=LEASE, limit=3)
    assert [j.job_id for j in got] == [j.job_id for j in mine[:3]]
    assert await registry.jobs.claim_next(me, lease=LEASE, limit=10) == [
        await registry.jobs.get(j.job_id) for j in mine[3:]
    ]
    assert await registry.jobs.claim_next(me, lease=LEASE) == []


async def test_fifty_concurrent_submits_with_one_key_make_one_job(registry: Registry) -> None:
    peer = uuid.uuid4()
    same = spec(idempotency_key="order-42", inputs=("anvil://b/k",))
    results = await asyncio.gather(*(registry.jobs.submit(same, peer_id=peer) for _ in range(50)))
    ids = {r.job.job_id for r in results}
    assert len(ids) == 1
    assert sum(not r.existing for r in results) == 1
    async with registry.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM jobs")
        assert await cur.fetchone() == {"n": 1}


async def test_reusing_a_key_for_another_request_is_refused(registry: Registry) -> None:
    await registry.jobs.submit(spec(idempotency_key="k1", params={"a": "1"}))
    with pytest.raises(IdempotencyConflict, match="different request"):
        await registry.jobs.submit(spec(idempotency_key="k1", params={"a": "2"}))


async def test_first_terminal_write_wins(registry: Registry) -> None:
    peer = uuid.uuid4()
    job = (await registry.jobs.submit(spec(), peer_id=peer)).job
    claimed = await registry.jobs.claim(job.job_id, peer, lease=LEASE)
    assert claimed is not None
    outcomes = [
        AttemptResult(state=JobState.SUCCEEDED, output=b"first"),
        AttemptResult(state=JobState.FAILED, error="second"),
    ]
    results = await asyncio.gather(
        *(registry.jobs.finish(job.job_id, peer_id=peer, attempt=1, outcome=o) for o in outcomes),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Job)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1 and len(losers) == 1
    assert isinstance(losers[0], JobAlreadyFinished)
    final = await registry.jobs.get(job.job_id)
    assert final.state is winners[0].state and final.output == winners[0].output


async def test_completion_before_rescue_is_never_overwritten(registry: Registry) -> None:
    """River #1302: a rescue built from a stale snapshot must not undo a completion."""
    peer, next_peer = uuid.uuid4(), uuid.uuid4()
    job = (await registry.jobs.submit(spec(), peer_id=peer)).job
    await registry.jobs.claim(job.job_id, peer, lease=LEASE)
    await expire_leases(registry)
    (stale,) = await registry.jobs.find_expired()
    assert stale.job_id == job.job_id and stale.attempt == 1
    done = await registry.jobs.finish(
        job.job_id, peer_id=peer, attempt=1, outcome=AttemptResult(state=JobState.SUCCEEDED)
    )
    assert done.state is JobState.SUCCEEDED
    rescued = await registry.jobs.rescue(
        stale.job_id, attempt=stale.attempt, next_peer_id=next_peer, error="lease expired"
    )
    assert rescued is None
    final = await registry.jobs.get(job.job_id)
    assert final.state is JobState.SUCCEEDED and final.peer_id == peer and final.attempt == 1


async def test_rescued_job_runs_again_and_the_late_result_is_refused(registry: Registry) -> None:
    old_peer, new_peer = uuid.uuid4(), uuid.uuid4()
    job = (await registry.jobs.submit(spec(), peer_id=old_peer)).job
    await registry.jobs.claim(job.job_id, old_peer, lease=LEASE)
    await expire_leases(registry)
    (stale,) = await registry.jobs.find_expired()
    rescued = await registry.jobs.rescue(
        stale.job_id, attempt=1, next_peer_id=new_peer, error="lease expired"
    )
    assert rescued is not None
    assert rescued.state is JobState.QUEUED and rescued.peer_id == new_peer
    # The old peer cannot renew or claim any more.
    assert await registry.jobs.renew_leases(old_peer, [(job.job_id, 1)], lease=LEASE) == set()
    assert await registry.jobs.claim(job.job_id, old_peer, lease=LEASE) is None
    second = await registry.jobs.claim(job.job_id, new_peer, lease=LEASE)
    assert second is not None and second.attempt == 2
    with pytest.raises(StaleAttempt, match="no longer owns it"):
        await registry.jobs.finish(
            job.job_id, peer_id=old_peer, attempt=1, outcome=AttemptResult(state=JobState.SUCCEEDED)
        )
    done = await registry.jobs.finish(
        job.job_id, peer_id=new_peer, attempt=2, outcome=AttemptResult(state=JobState.SUCCEEDED)
    )
    assert done.attempt == 2 and done.peer_id == new_peer
    events = [(e.from_state, e.to_state, e.attempt) for e in await registry.jobs.events(job.job_id)]
    assert events == [
        (None, JobState.QUEUED, 0),
        (JobState.QUEUED, JobState.RUNNING, 1),
        (JobState.RUNNING, JobState.QUEUED, 1),
        (JobState.QUEUED, JobState.RUNNING, 2),
        (JobState.RUNNING, JobState.SUCCEEDED, 2),
    ]


@pytest.mark.slow
async def test_rescues_racing_completions_never_lose_or_double_a_result(
    registry: Registry,
) -> None:
    peer, next_peer = uuid.uuid4(), uuid.uuid4()
    jobs = await submit_many(registry, 200, peer)
    claimed = await registry.jobs.claim_next(peer, lease=LEASE, limit=200)
    assert len(claimed) == 200
    await expire_leases(registry)
    snapshot = await registry.jobs.find_expired(limit=1000)
    assert len(snapshot) == 200

    async def complete(job: Job) -> bool:
        try:
            await registry.jobs.finish(
                job.job_id, peer_id=peer, attempt=1, outcome=AttemptResult(state=JobState.SUCCEEDED)
            )
        except StaleAttempt:
            return False
        return True

    async def rescue(job_id: uuid.UUID) -> bool:
        row = await registry.jobs.rescue(job_id, attempt=1, next_peer_id=next_peer, error="x")
        return row is not None

    tasks = [complete(j) for j in claimed] + [rescue(s.job_id) for s in snapshot]
    results = await asyncio.gather(*tasks)
    completed = dict(zip((j.job_id for j in claimed), results[:200], strict=True))
    rescued = dict(zip((s.job_id for s in snapshot), results[200:], strict=True))
    for job in jobs:
        # Exactly one side of each race wins.
        assert completed[job.job_id] != rescued[job.job_id]
        final = await registry.jobs.get(job.job_id)
        expected = JobState.SUCCEEDED if completed[job.job_id] else JobState.QUEUED
        assert final.state is expected
    async with registry.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM job_events "
            "WHERE from_state = 'succeeded' OR (from_state IS NOT NULL AND from_state = to_state)"
        )
        assert await cur.fetchone() == {"n": 0}


async def test_rescue_after_last_attempt_fails_the_job(registry: Registry) -> None:
    peer = uuid.uuid4()
    job = (await registry.jobs.submit(spec(max_attempts=1), peer_id=peer)).job
    await registry.jobs.claim(job.job_id, peer, lease=LEASE)
    await expire_leases(registry)
    rescued = await registry.jobs.rescue(
        job.job_id, attempt=1, next_peer_id=uuid.uuid4(), error="lease expired"
    )
    assert rescued is not None
    assert rescued.state is JobState.FAILED and rescued.error == "lease expired"
    assert rescued.finished_at is not None


async def test_short_lease_expires_and_renewal_keeps_it(registry: Registry) -> None:
    peer = uuid.uuid4()
    a = (await registry.jobs.submit(spec(), peer_id=peer)).job
    b = (await registry.jobs.submit(spec(), peer_id=peer)).job
    await registry.jobs.claim_next(peer, lease=SHORT_LEASE, limit=2)
    kept = await registry.jobs.renew_leases(peer, [(a.job_id, 1)], lease=LEASE)
    assert kept == {a.job_id}
    await pass_time(registry, 1)
    assert [e.job_id for e in await registry.jobs.find_expired()] == [b.job_id]


async def test_cancel_queued_and_running_and_refuse_terminal(registry: Registry) -> None:
    peer = uuid.uuid4()
    queued = (await registry.jobs.submit(spec(), peer_id=peer)).job
    running = (await registry.jobs.submit(spec(), peer_id=peer)).job
    await registry.jobs.claim(running.job_id, peer, lease=LEASE)
    assert (await registry.jobs.cancel(queued.job_id)).state is JobState.CANCELLED
    assert await registry.jobs.claim(queued.job_id, peer, lease=LEASE) is None
    cancelled = await registry.jobs.cancel(running.job_id, reason="user asked")
    assert cancelled.state is JobState.CANCELLED and cancelled.error == "user asked"
    assert await registry.jobs.renew_leases(peer, [(running.job_id, 1)], lease=LEASE) == set()
    with pytest.raises(JobAlreadyFinished):
        await registry.jobs.finish(
            running.job_id, peer_id=peer, attempt=1, outcome=AttemptResult(state=JobState.SUCCEEDED)
        )
    with pytest.raises(JobAlreadyFinished):
        await registry.jobs.cancel(running.job_id)


async def test_assign_is_a_compare_and_set_on_the_placement(registry: Registry) -> None:
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    job = (await registry.jobs.submit(spec())).job
    assert job.peer_id is None
    moved = await registry.jobs.assign(job.job_id, first, from_peer_id=None)
    assert moved.peer_id == first
    with pytest.raises(FailedPrecondition):
        await registry.jobs.assign(job.job_id, second, from_peer_id=None)
    moved = await registry.jobs.assign(job.job_id, third, from_peer_id=first)
    assert moved.peer_id == third


async def test_release_requeues_for_another_peer(registry: Registry) -> None:
    peer, other = uuid.uuid4(), uuid.uuid4()
    job = (await registry.jobs.submit(spec(), peer_id=peer)).job
    await registry.jobs.claim(job.job_id, peer, lease=LEASE)
    released = await registry.jobs.release(
        job.job_id, peer_id=peer, attempt=1, next_peer_id=other, error="draining"
    )
    assert released.state is JobState.QUEUED and released.peer_id == other
    again = await registry.jobs.claim(job.job_id, other, lease=LEASE)
    assert again is not None and again.attempt == 2


async def test_a_drain_hand_back_does_not_use_up_an_attempt(registry: Registry) -> None:
    peer, other = uuid.uuid4(), uuid.uuid4()
    once = (await registry.jobs.submit(spec(max_attempts=1), peer_id=peer)).job
    for attempt in (1, 2, 3):  # drained three times over: still runs
        claimed = await registry.jobs.claim(once.job_id, peer, lease=LEASE)
        assert claimed is not None and claimed.attempt == attempt
        released = await registry.jobs.release(
            once.job_id, peer_id=peer, attempt=attempt, next_peer_id=peer, error="drain", spare=True
        )
        assert released.state is JobState.QUEUED
    last = await registry.jobs.claim(once.job_id, peer, lease=LEASE)
    assert last is not None and last.attempt == 4
    done = await registry.jobs.finish(
        once.job_id, peer_id=peer, attempt=4, outcome=AttemptResult(state=JobState.SUCCEEDED)
    )
    assert done.state is JobState.SUCCEEDED

    # A transient failure's hand-back counts: with one attempt, the job fails.
    counted = (await registry.jobs.submit(spec(max_attempts=1), peer_id=peer)).job
    await registry.jobs.claim(counted.job_id, peer, lease=LEASE)
    failed = await registry.jobs.release(
        counted.job_id, peer_id=peer, attempt=1, next_peer_id=other, error="storage down"
    )
    assert failed.state is JobState.FAILED and failed.peer_id == peer

    # Spared attempts do not stretch the budget of counted ones: after a drain,
    # a rescue of the next attempt of a one-attempt job still fails it.
    rescued = (await registry.jobs.submit(spec(max_attempts=1), peer_id=peer)).job
    await registry.jobs.claim(rescued.job_id, peer, lease=LEASE)
    await registry.jobs.release(
        rescued.job_id, peer_id=peer, attempt=1, next_peer_id=peer, error="drain", spare=True
    )
    await registry.jobs.claim(rescued.job_id, peer, lease=SHORT_LEASE)
    await expire_leases(registry)
    ended = await registry.jobs.rescue(rescued.job_id, attempt=2, next_peer_id=other, error="x")
    assert ended is not None and ended.state is JobState.FAILED
    assert await registry.jobs.claim(rescued.job_id, other, lease=LEASE) is None


async def test_unknown_job_and_bad_input_raise_typed_errors(registry: Registry) -> None:
    missing = uuid.uuid4()
    with pytest.raises(JobNotFound):
        await registry.jobs.get(missing)
    with pytest.raises(JobNotFound):
        await registry.jobs.cancel(missing)
    with pytest.raises(JobNotFound):
        await registry.jobs.finish(
            missing,
            peer_id=uuid.uuid4(),
            attempt=1,
            outcome=AttemptResult(state=JobState.SUCCEEDED),
        )
    with pytest.raises(InvalidArgument, match="capability must not be empty"):
        spec(capability="")
    with pytest.raises(InvalidArgument, match="timeout_ms"):
        spec(timeout_ms=-1)
    with pytest.raises(InvalidArgument, match="max_attempts"):
        spec(max_attempts=0)
    peer = uuid.uuid4()
    job = (await registry.jobs.submit(spec(), peer_id=peer)).job
    await registry.jobs.claim(job.job_id, peer, lease=LEASE)
    with pytest.raises(InvalidArgument, match="an attempt ends in one of"):
        await registry.jobs.finish(
            job.job_id, peer_id=peer, attempt=1, outcome=AttemptResult(state=JobState.QUEUED)
        )
    with pytest.raises(InvalidArgument, match="lease"):
        await registry.jobs.claim_next(peer, lease=timedelta(0))
    with pytest.raises(FailedPrecondition):
        await registry.jobs.assign(job.job_id, uuid.uuid4(), from_peer_id=peer)


async def test_database_constraints_back_the_state_machine(registry: Registry) -> None:
    """Even a hand-written UPDATE cannot produce an impossible row."""
    job = (await registry.jobs.submit(spec(), peer_id=uuid.uuid4())).job

    async def force_running() -> None:
        with translate_errors():
            async with registry.pool.connection() as conn:
                await conn.execute(
                    "UPDATE jobs SET state = 'running' WHERE job_id = %s", (job.job_id,)
                )

    with pytest.raises(InvalidArgument, match="check constraint"):
        await force_running()


async def test_a_rescued_job_waits_out_its_backoff(registry: Registry) -> None:
    old_peer, new_peer = uuid.uuid4(), uuid.uuid4()
    job = (await registry.jobs.submit(spec(), peer_id=old_peer)).job
    await registry.jobs.claim(job.job_id, old_peer, lease=LEASE)
    await expire_leases(registry)
    rescued = await registry.jobs.rescue(
        job.job_id, attempt=1, next_peer_id=new_peer, error="x", backoff=timedelta(seconds=60)
    )
    assert rescued is not None and rescued.run_after > rescued.updated_at
    assert await registry.jobs.claim_next(new_peer, lease=LEASE) == []
    assert await registry.jobs.claim(job.job_id, new_peer, lease=LEASE) is None
    await pass_time(registry, 59)
    assert await registry.jobs.claim_next(new_peer, lease=LEASE) == []
    await pass_time(registry, 2)
    (claimed,) = await registry.jobs.claim_next(new_peer, lease=LEASE)
    assert claimed.attempt == 2


async def test_queued_jobs_leave_down_silent_and_draining_peers(registry: Registry) -> None:
    up, down, silent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for peer in (up, down, silent):
        await registry.peers.upsert(peer_id=peer, address="h:1", region="local", version="")
    await registry.peers.set_state(down, "down")
    async with registry.pool.connection() as conn:
        await conn.execute(
            "UPDATE peers SET heartbeat_at = now() - interval '1 hour' WHERE peer_id = %s",
            (silent,),
        )
    jobs = {p: (await registry.jobs.submit(spec(), peer_id=p)).job for p in (up, down, silent)}
    assert await registry.peers.mark_stale_down() == [silent]
    moved = await registry.jobs.unplace_from_unavailable_peers(peer_ttl=timedelta(seconds=15))
    assert moved == 2
    unplaced = {j.job_id for j in await registry.jobs.list_unplaced()}
    assert unplaced == {jobs[down].job_id, jobs[silent].job_id}
    assert await registry.jobs.unplace_peer_queue(up) == 1
    assert (await registry.jobs.get(jobs[up].job_id)).peer_id is None


async def xmins(registry: Registry, job_ids: list[uuid.UUID]) -> set[int]:
    """The transactions that last wrote these rows."""
    async with registry.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT xmin::text::bigint AS x FROM jobs WHERE job_id = ANY(%s)", (job_ids,)
        )
        return {row["x"] for row in await cur.fetchall()}


async def test_a_burst_of_submissions_is_one_commit_in_arrival_order(registry: Registry) -> None:
    peer = uuid.uuid4()
    results = await asyncio.gather(
        *(
            registry.jobs.submit(
                spec(params={"i": str(i)}, inputs=(f"sha256:{i:064x}",)), peer_id=peer
            )
            for i in range(50)
        )
    )
    jobs = [r.job for r in results]
    assert [j.params["i"] for j in jobs] == [str(i) for i in range(50)]
    assert all(
        not r.existing and j.state is JobState.QUEUED for r, j in zip(results, jobs, strict=True)
    )
    assert jobs[7].inputs == (f"sha256:{7:064x}",)
    assert len(await xmins(registry, [j.job_id for j in jobs])) <= 2  # group committed
    oldest_first = await registry.jobs.claim_next(peer, lease=LEASE, limit=50)
    assert [j.params["i"] for j in oldest_first] == [str(i) for i in range(50)]


async def test_a_bad_row_in_a_burst_fails_only_its_own_submission(registry: Registry) -> None:
    peer = uuid.uuid4()
    bad = spec(params={"i": "bad"})
    object.__setattr__(bad, "max_attempts", 0)  # past validation: the database refuses it
    specs = [spec(params={"i": str(i)}) for i in range(10)]
    specs.insert(4, bad)
    results = await asyncio.gather(
        *(registry.jobs.submit(s, peer_id=peer) for s in specs), return_exceptions=True
    )
    assert isinstance(results[4], InvalidArgument)
    good = [r for i, r in enumerate(results) if i != 4]
    assert all(not isinstance(r, BaseException) for r in good)
    assert len(await registry.jobs.claim_next(peer, lease=LEASE, limit=20)) == 10


async def test_a_burst_of_results_is_one_commit_and_a_stale_one_is_refused(
    registry: Registry,
) -> None:
    peer = uuid.uuid4()
    await submit_many(registry, 30, peer)
    claimed = await registry.jobs.claim_next(peer, lease=LEASE, limit=30)
    assert len(claimed) == 30
    stale = claimed[0]

    async def finish(job: Job, attempt: int) -> Job | BaseException:
        try:
            return await registry.jobs.finish(
                job.job_id,
                peer_id=peer,
                attempt=attempt,
                outcome=AttemptResult(
                    state=JobState.SUCCEEDED, output=job.job_id.bytes, exit_code=0
                ),
            )
        except StaleAttempt as exc:
            return exc

    results = await asyncio.gather(finish(stale, 2), *(finish(j, 1) for j in claimed[1:]))
    assert isinstance(results[0], StaleAttempt)
    finished = results[1:]
    assert all(isinstance(f, Job) and f.state is JobState.SUCCEEDED for f in finished)
    assert [f.output for f in finished] == [j.job_id.bytes for j in claimed[1:]]  # type: ignore[union-attr]
    assert len(await xmins(registry, [j.job_id for j in claimed[1:]])) <= 2
    assert (await registry.jobs.get(stale.job_id)).state is JobState.RUNNING


async def test_an_idempotency_key_belongs_to_its_submitter(registry: Registry) -> None:
    alice = await registry.jobs.submit(spec(idempotency_key="nightly", submitted_by="alice"))
    bob = await registry.jobs.submit(spec(idempotency_key="nightly", submitted_by="bob"))
    assert alice.job.job_id != bob.job.job_id
    assert not alice.existing and not bob.existing
    again = await registry.jobs.submit(spec(idempotency_key="nightly", submitted_by="alice"))
    assert again.existing and again.job.job_id == alice.job.job_id
    # Bob's other request under the same key conflicts with his own job only.
    with pytest.raises(IdempotencyConflict, match=str(bob.job.job_id)):
        await registry.jobs.submit(
            spec(idempotency_key="nightly", submitted_by="bob", params={"x": "1"})
        )


async def age(registry: Registry, job_ids: list[uuid.UUID], seconds: int) -> None:
    async with registry.pool.connection() as conn:
        await conn.execute(
            "UPDATE jobs SET finished_at = finished_at - make_interval(secs => %s) "
            "WHERE job_id = ANY(%s)",
            (seconds, job_ids),
        )


async def test_prune_deletes_only_jobs_finished_before_the_retention(
    registry: Registry,
) -> None:
    peer = uuid.uuid4()
    jobs = await submit_many(registry, 6, peer)
    claimed = await registry.jobs.claim_next(peer, lease=LEASE, limit=4)
    for job in claimed[:3]:
        await registry.jobs.finish(
            job.job_id, peer_id=peer, attempt=1, outcome=AttemptResult(state=JobState.SUCCEEDED)
        )
    queued = [j for j in jobs if j.job_id not in {c.job_id for c in claimed}]
    cancelled = await registry.jobs.cancel(queued[0].job_id, reason="no")
    old = [claimed[0].job_id, claimed[1].job_id, cancelled.job_id]
    await age(registry, old, 3600)
    # Aged, but still running or queued: never pruned.
    await age(registry, [claimed[3].job_id, queued[1].job_id], 3600)

    assert await registry.jobs.prune(older_than=timedelta(minutes=30), limit=2) == 2
    assert await registry.jobs.prune(older_than=timedelta(minutes=30)) == 1
    assert await registry.jobs.prune(older_than=timedelta(minutes=30)) == 0
    for job_id in old:
        with pytest.raises(JobNotFound):
            await registry.jobs.get(job_id)
    kept = {claimed[2].job_id, claimed[3].job_id, queued[1].job_id}
    for job_id in kept:
        await registry.jobs.get(job_id)
    async with registry.pool.connection() as conn:
        cur = await conn.execute("SELECT DISTINCT job_id FROM job_events")
        assert {row["job_id"] for row in await cur.fetchall()} == kept  # events went too
    with pytest.raises(InvalidArgument):
        await registry.jobs.prune(older_than=timedelta(0), limit=0)


async def test_a_job_keeps_its_own_queue_timeout_or_the_operators(registry: Registry) -> None:
    own = (await registry.jobs.submit(spec(queue_timeout_ms=5_000))).job
    operators = (await registry.jobs.submit(spec(), default_queue_timeout_ms=7_000)).job
    built_in = (await registry.jobs.submit(spec())).job
    assert [j.queue_timeout_ms for j in (own, operators, built_in)] == [
        5_000,
        7_000,
        DEFAULT_QUEUE_TIMEOUT_MS,
    ]
    # A burst goes in as one statement (insert_jobs), each row with its own.
    results = await asyncio.gather(
        *(
            registry.jobs.submit(spec(params={"i": str(i)}, queue_timeout_ms=1_000 + i))
            for i in range(20)
        )
    )
    burst = [r.job for r in results]
    assert len(await xmins(registry, [j.job_id for j in burst])) < len(burst)
    assert [j.queue_timeout_ms for j in burst] == [1_000 + i for i in range(20)]
    assert all(j.queued_at >= j.submitted_at for j in [own, *burst])
    with pytest.raises(InvalidArgument, match="queue_timeout_ms must be between 0"):
        spec(queue_timeout_ms=-1)
    with pytest.raises(InvalidArgument, match="queue_timeout_ms must be between 0"):
        spec(queue_timeout_ms=MAX_QUEUE_TIMEOUT_MS + 1)


async def test_a_queue_timeout_is_part_of_the_request_an_idempotency_key_names(
    registry: Registry,
) -> None:
    await registry.jobs.submit(spec(idempotency_key="q1", queue_timeout_ms=60_000))
    again = await registry.jobs.submit(spec(idempotency_key="q1", queue_timeout_ms=60_000))
    assert again.existing
    with pytest.raises(IdempotencyConflict, match="different request"):
        await registry.jobs.submit(spec(idempotency_key="q1"))
    # Left to the operator, a request digests as it did before the field existed,
    # so a retry across the upgrade still finds its job.
    before = {
        "capability": "text:wordcount",
        "region": "local",
        "inputs": [],
        "params": {},
        "resources": {},
        "locality_key": "",
        "timeout_ms": 10_000,
        "max_attempts": 3,
    }
    blob = json.dumps(before, sort_keys=True, separators=(",", ":")).encode()
    assert spec().request_sha256() == hashlib.sha256(blob).hexdigest()


async def test_an_overdue_job_fails_only_while_queued_at_the_same_attempt(
    registry: Registry,
) -> None:
    peer = uuid.uuid4()
    job = (await registry.jobs.submit(spec(queue_timeout_ms=60_000), peer_id=peer)).job
    assert await registry.jobs.find_overdue() == []
    assert await registry.jobs.fail_overdue(job.job_id, attempt=0, error="e") is None
    await queued_for(registry, job.job_id, seconds=61)
    assert [j.job_id for j in await registry.jobs.find_overdue()] == [job.job_id]
    # Claimed after the sweep's snapshot: the failure based on it is refused.
    claimed = await registry.jobs.claim(job.job_id, peer, lease=LEASE)
    assert claimed is not None
    assert await registry.jobs.fail_overdue(job.job_id, attempt=0, error="e") is None
    assert (await registry.jobs.get(job.job_id)).state is JobState.RUNNING
    # Handed back: queued again, its queue timeout starts over.
    released = await registry.jobs.release(
        job.job_id, peer_id=peer, attempt=1, next_peer_id=None, error="drain", spare=True
    )
    assert released.queued_at > claimed.queued_at
    assert await registry.jobs.find_overdue() == []
    assert await registry.jobs.fail_overdue(job.job_id, attempt=1, error="e") is None
    await queued_for(registry, job.job_id, seconds=61)
    assert await registry.jobs.fail_overdue(job.job_id, attempt=0, error="e") is None
    failed = await registry.jobs.fail_overdue(job.job_id, attempt=1, error="no peer ran it")
    assert failed is not None
    assert (failed.state, failed.error, failed.attempt) == (JobState.FAILED, "no peer ran it", 1)
    assert failed.finished_at is not None
    events = await registry.jobs.events(job.job_id)
    assert (events[-1].from_state, events[-1].to_state, events[-1].detail) == (
        JobState.QUEUED,
        JobState.FAILED,
        "no peer ran it",
    )
    assert await registry.jobs.find_overdue() == []


async def test_the_overdue_scan_reads_only_overdue_rows_through_its_index(
    registry: Registry,
) -> None:
    async with registry.pool.connection() as conn:
        await conn.execute("SET enable_seqscan = off")
        cur = await conn.execute(
            "EXPLAIN (FORMAT JSON) " + queries.get("find_overdue_queued"), {"limit": 100}
        )
        (row,) = await cur.fetchall()
        await conn.execute("RESET enable_seqscan")
    plan = json.dumps(row["QUERY PLAN"])
    assert '"Index Name": "jobs_queue_deadline"' in plan, plan
    assert '"Index Cond"' in plan and "statement_timestamp()" in plan, plan


async def test_a_waiting_reason_is_written_only_while_unplaced_and_when_it_changes(
    registry: Registry,
) -> None:
    job = (await registry.jobs.submit(spec())).job
    events = await registry.jobs.events(job.job_id)
    assert await registry.jobs.note_waiting(job.job_id, "waiting: none")
    written = await registry.jobs.get(job.job_id)
    assert (written.state, written.error) == (JobState.QUEUED, "waiting: none")
    assert not await registry.jobs.note_waiting(job.job_id, "waiting: none")
    assert (await registry.jobs.get(job.job_id)).updated_at == written.updated_at
    # Not a change of state: no event recorded (nor, by the same trigger, announced).
    assert await registry.jobs.events(job.job_id) == events
    # Placed, it no longer waits for a peer: the reason goes, and no new one comes.
    peer = uuid.uuid4()
    placed = await registry.jobs.assign(job.job_id, peer, from_peer_id=None)
    assert placed.error == ""
    assert not await registry.jobs.note_waiting(job.job_id, "waiting: other")
    assert (await registry.jobs.get(job.job_id)).error == ""


async def queued_for(registry: Registry, job_id: uuid.UUID, *, seconds: float) -> None:
    """Move the job's queue clock: it was last queued `seconds` ago."""
    async with registry.pool.connection() as conn:
        await conn.execute(
            "UPDATE jobs SET queued_at = clock_timestamp() - make_interval(secs => %s) "
            "WHERE job_id = %s",
            (seconds, job_id),
        )
