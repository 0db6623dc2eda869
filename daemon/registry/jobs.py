"""The jobs table: submission, claims, leases, results, cancellation, rescue.

Every state change is one compare-and-set UPDATE whose WHERE clause states the
transition's precondition, so concurrent peers cannot both win: a job is
claimed once, the first terminal write wins, and a rescue based on an old
snapshot of a running job can never overwrite a result that committed first.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from psycopg.types.json import Jsonb

from daemon.exceptions import (
    AlreadyExists,
    AnvilError,
    FailedPrecondition,
    IdempotencyConflict,
    InvalidArgument,
    JobAlreadyFinished,
    JobNotFound,
    RegistryUnavailable,
    StaleAttempt,
)
from daemon.jobs.state import FINISH_STATES, JobState
from daemon.registry import queries
from daemon.registry.batcher import Batcher, Failed
from daemon.registry.driver import Pool, translate_errors
from daemon.registry.models import (
    DEFAULT_QUEUE_TIMEOUT_MS,
    AttemptResult,
    Job,
    JobEvent,
    JobSpec,
    SubmitResult,
)

MAX_INLINE_OUTPUT = 4 * 1024 * 1024
MIN_LEASE = timedelta(milliseconds=100)
# Rows per group-committed statement: enough for a burst from many clients,
# small enough that one batch of inline outputs stays a modest message.
MAX_BATCH = 64

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpiredLease:
    job_id: uuid.UUID
    attempt: int
    peer_id: uuid.UUID
    locality_key: str
    capability: str
    region: str
    resources: dict[str, str]


def _check_lease(lease: timedelta) -> None:
    if lease < MIN_LEASE:
        raise InvalidArgument(f"lease must be at least {MIN_LEASE}, got {lease}")


@dataclass(frozen=True, kw_only=True, slots=True)
class _Finish:
    job_id: uuid.UUID
    peer_id: uuid.UUID
    attempt: int
    outcome: AttemptResult


class JobStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._inserts: Batcher[dict[str, Any], Job] = Batcher(
            self._insert_many, max_batch=MAX_BATCH
        )
        self._finishes: Batcher[_Finish, dict[str, Any] | None] = Batcher(
            self._finish_many, max_batch=MAX_BATCH
        )

    async def submit(
        self,
        spec: JobSpec,
        *,
        job_id: uuid.UUID | None = None,
        peer_id: uuid.UUID | None = None,
        locality_key: str | None = None,
        default_queue_timeout_ms: int = DEFAULT_QUEUE_TIMEOUT_MS,
    ) -> SubmitResult:
        """Insert a QUEUED job (placed on peer_id if given) or return the idempotent original.

        `locality_key` is the resolved placement key (default: the spec's, else
        the job id); `default_queue_timeout_ms` the operator's queue timeout
        (queue_timeout_s), kept with a job whose spec leaves it 0. Raises
        IdempotencyConflict when the key was used for a different request.
        """
        job_id = job_id or uuid.uuid4()
        digest = spec.request_sha256()
        params = {
            "job_id": job_id,
            "capability": spec.capability,
            "region": spec.region,
            "inputs": list(spec.inputs),
            "params": Jsonb(dict(spec.params)),
            "resources": Jsonb(dict(spec.resources)),
            "locality_key": locality_key or spec.locality_key or str(job_id),
            "idempotency_key": spec.idempotency_key,
            "request_sha256": digest,
            "timeout_ms": spec.timeout_ms,
            "queue_timeout_ms": spec.queue_timeout_ms or default_queue_timeout_ms,
            "max_attempts": spec.max_attempts,
            "submitted_by": spec.submitted_by,
            "peer_id": peer_id,
        }
        if spec.idempotency_key is None:
            return SubmitResult(job=await self._inserts.submit(params), existing=False)
        # Two rounds at most: the conflicting row can only vanish if it is
        # deleted between our insert and our read, and then the insert wins.
        for _ in range(2):
            row = await self._pool.fetch_one("insert_job", params)
            if row is not None:
                return SubmitResult(job=Job.from_row(row), existing=False)
            earlier = await self.find_idempotent(spec)
            if earlier is not None:
                return earlier
        raise IdempotencyConflict(f"idempotency key {spec.idempotency_key!r} is contended")

    async def find_idempotent(self, spec: JobSpec) -> SubmitResult | None:
        """The job submitted earlier with spec's idempotency key, if any.

        Raises IdempotencyConflict when that job was a different request.
        """
        if spec.idempotency_key is None:
            return None
        row = await self._pool.fetch_one(
            "get_job_by_idempotency_key",
            {"idempotency_key": spec.idempotency_key, "submitted_by": spec.submitted_by},
        )
        if row is None:
            return None
        if row["request_sha256"] != spec.request_sha256():
            raise IdempotencyConflict(
                f"idempotency key {spec.idempotency_key!r} was already used by job "
                f"{row['job_id']} for a different request"
            )
        return SubmitResult(job=Job.from_row(row), existing=True)

    async def get(self, job_id: uuid.UUID) -> Job:
        row = await self._pool.fetch_one("get_job", {"job_id": job_id})
        if row is None:
            raise JobNotFound(f"job {job_id} not found")
        return Job.from_row(row)

    async def outputs(
        self, job_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[JobState, tuple[str, ...]]]:
        """(state, output refs) of each of these jobs that still exists."""
        rows = await self._pool.fetch_all("job_outputs", {"job_ids": list(job_ids)})
        return {row["job_id"]: (JobState(row["state"]), tuple(row["output_refs"])) for row in rows}

    async def owner(self, job_id: uuid.UUID) -> str | None:
        """The tenant that submitted the job (its `submitted_by`); None if there is none."""
        row = await self._pool.fetch_one("get_job_owner", {"job_id": job_id})
        return None if row is None else str(row["submitted_by"])

    async def assign(
        self, job_id: uuid.UUID, peer_id: uuid.UUID | None, *, from_peer_id: uuid.UUID | None
    ) -> Job:
        """Move a queued job from `from_peer_id` (None: unplaced) to `peer_id`.

        Raises JobAlreadyFinished, or FailedPrecondition when the job is no
        longer queued there (claimed, re-placed by someone else).
        """
        row = await self._pool.fetch_one(
            "assign_job", {"job_id": job_id, "peer_id": peer_id, "from_peer_id": from_peer_id}
        )
        if row is None:
            job = await self.get(job_id)
            raise self._precondition(job, "assign")
        return Job.from_row(row)

    async def claim(self, job_id: uuid.UUID, peer_id: uuid.UUID, *, lease: timedelta) -> Job | None:
        """QUEUED -> RUNNING for the named job if it is queued on this peer; else None."""
        _check_lease(lease)
        row = await self._pool.fetch_one(
            "claim_job", {"job_id": job_id, "peer_id": peer_id, "lease": lease}
        )
        return Job.from_row(row) if row is not None else None

    async def claim_next(
        self,
        peer_id: uuid.UUID,
        *,
        lease: timedelta,
        limit: int = 1,
        capabilities: list[str] | None = None,
    ) -> list[Job]:
        """Claim up to `limit` of this peer's queued jobs, oldest first."""
        _check_lease(lease)
        if limit < 1:
            raise InvalidArgument(f"limit must be positive, got {limit}")
        rows = await self._pool.fetch_all(
            "claim_next",
            {"peer_id": peer_id, "lease": lease, "limit": limit, "capabilities": capabilities},
        )
        jobs = [Job.from_row(row) for row in rows]
        jobs.sort(key=lambda j: (j.submitted_at, j.job_id))
        return jobs

    async def renew_leases(
        self, peer_id: uuid.UUID, owned: list[tuple[uuid.UUID, int]], *, lease: timedelta
    ) -> set[uuid.UUID]:
        """Extend the leases still owned; return their job ids (the rest were lost)."""
        _check_lease(lease)
        if not owned:
            return set()
        rows = await self._pool.fetch_all(
            "renew_leases",
            {
                "peer_id": peer_id,
                "lease": lease,
                "job_ids": [job_id for job_id, _ in owned],
                "attempts": [attempt for _, attempt in owned],
            },
        )
        return {row["job_id"] for row in rows}

    async def finish(
        self, job_id: uuid.UUID, *, peer_id: uuid.UUID, attempt: int, outcome: AttemptResult
    ) -> Job:
        """Write the attempt's terminal state. The first terminal write wins.

        Raises JobAlreadyFinished if the job already ended, StaleAttempt if this
        attempt no longer owns it (rescued and re-queued or re-run), JobNotFound.
        """
        if outcome.state not in FINISH_STATES:
            raise InvalidArgument(
                f"an attempt ends in one of {sorted(FINISH_STATES)}, not {outcome.state}"
            )
        if outcome.output is not None and len(outcome.output) > MAX_INLINE_OUTPUT:
            raise InvalidArgument(
                f"inline output is limited to {MAX_INLINE_OUTPUT} bytes; store it as an object"
            )
        row = await self._finishes.submit(
            _Finish(job_id=job_id, peer_id=peer_id, attempt=attempt, outcome=outcome)
        )
        if row is None:
            job = await self.get(job_id)
            raise self._precondition(job, "finish", peer_id=peer_id, attempt=attempt)
        return Job.from_row(row)

    async def _insert_many(self, batch: list[dict[str, Any]]) -> Sequence[Job | Failed]:
        if len(batch) == 1:
            row = await self._pool.fetch_one("insert_job", batch[0])
            if row is None:  # only an idempotency key conflicts, and these have none
                raise FailedPrecondition(f"job {batch[0]['job_id']} was not inserted")
            return [Job.from_row(row)]
        try:
            rows = await self._pool.fetch_all(
                "insert_jobs",
                {
                    "job_ids": [p["job_id"] for p in batch],
                    "capabilities": [p["capability"] for p in batch],
                    "regions": [p["region"] for p in batch],
                    "inputs": [Jsonb(p["inputs"]) for p in batch],
                    "params": [p["params"] for p in batch],
                    "resources": [p["resources"] for p in batch],
                    "locality_keys": [p["locality_key"] for p in batch],
                    "request_sha256s": [p["request_sha256"] for p in batch],
                    "timeout_ms": [p["timeout_ms"] for p in batch],
                    "queue_timeout_ms": [p["queue_timeout_ms"] for p in batch],
                    "max_attempts": [p["max_attempts"] for p in batch],
                    "submitted_by": [p["submitted_by"] for p in batch],
                    "peer_ids": [p["peer_id"] for p in batch],
                },
            )
        except (InvalidArgument, AlreadyExists):
            # One bad row fails the statement: insert each alone, so only its
            # own submitter gets the error.
            return await _each(batch, self._insert_many)
        by_id = {row["job_id"]: row for row in rows}
        return [Job.from_row(by_id[p["job_id"]]) for p in batch]

    async def _finish_many(self, batch: list[_Finish]) -> Sequence[dict[str, Any] | Failed | None]:
        if len(batch) == 1:
            (f,) = batch
            return [
                await self._pool.fetch_one("finish_job", {**_finish_params(f), "job_id": f.job_id})
            ]
        firsts = list({f.job_id: f for f in reversed(batch)}.values())
        if len(firsts) < len(batch):
            # Two results for one job race: in one statement both would match the
            # row and both see it returned. One by one, the first write wins.
            return await _each(batch, self._finish_many)
        columns = [_finish_params(f) for f in batch]
        try:
            rows = await self._pool.fetch_all(
                "finish_jobs",
                {
                    "job_ids": [f.job_id for f in batch],
                    "attempts": [c["attempt"] for c in columns],
                    "peer_ids": [c["peer_id"] for c in columns],
                    "states": [c["state"] for c in columns],
                    "outputs": [c["output"] for c in columns],
                    "output_refs": [Jsonb(c["output_refs"]) for c in columns],
                    "errors": [c["error"] for c in columns],
                    "exit_codes": [c["exit_code"] for c in columns],
                    "bytes_fetched_remote": [c["bytes_fetched_remote"] for c in columns],
                },
            )
        except InvalidArgument:
            return await _each(batch, self._finish_many)
        by_id = {row["job_id"]: row for row in rows}
        return [by_id.get(f.job_id) for f in batch]

    async def prune(self, *, older_than: timedelta, limit: int = 1000) -> int:
        """Delete up to `limit` jobs that ended more than `older_than` ago, with
        their events; return how many went."""
        if limit < 1:
            raise InvalidArgument(f"limit must be positive, got {limit}")
        with translate_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    queries.get("prune_finished_jobs"),
                    {"older_than": older_than, "limit": limit},
                )
                return cur.rowcount

    async def release(
        self,
        job_id: uuid.UUID,
        *,
        peer_id: uuid.UUID,
        attempt: int,
        next_peer_id: uuid.UUID | None,
        error: str,
        spare: bool = False,
    ) -> Job:
        """Hand a running attempt back: QUEUED on next_peer_id, or FAILED when out of attempts.

        `spare`: the attempt does not count against max_attempts (a draining
        peer's hand-back; the job did nothing wrong).
        """
        row = await self._pool.fetch_one(
            "release_job",
            {
                "job_id": job_id,
                "peer_id": peer_id,
                "attempt": attempt,
                "next_peer_id": next_peer_id,
                "error": error,
                "spare": spare,
            },
        )
        if row is None:
            job = await self.get(job_id)
            raise self._precondition(job, "release", peer_id=peer_id, attempt=attempt)
        return Job.from_row(row)

    async def find_expired(self, *, limit: int = 100) -> list[ExpiredLease]:
        """Running jobs whose lease is in the past (a snapshot: rescue re-checks it)."""
        rows = await self._pool.fetch_all("find_expired_leases", {"limit": limit})
        return [ExpiredLease(**row) for row in rows]

    async def rescue(
        self,
        job_id: uuid.UUID,
        *,
        attempt: int,
        next_peer_id: uuid.UUID | None,
        error: str,
        backoff: timedelta = timedelta(0),
    ) -> Job | None:
        """Re-queue (or fail, when out of attempts) a job whose lease expired.

        Compare-and-set on (running, attempt, lease in the past); returns None when
        the job moved on since the snapshot (finished, renewed, already rescued).
        The next attempt cannot be claimed before `backoff` has passed.
        """
        row = await self._pool.fetch_one(
            "rescue_job",
            {
                "job_id": job_id,
                "attempt": attempt,
                "next_peer_id": next_peer_id,
                "error": error,
                "backoff": backoff,
            },
        )
        return Job.from_row(row) if row is not None else None

    async def cancel(self, job_id: uuid.UUID, *, reason: str = "cancelled") -> Job:
        """QUEUED or RUNNING -> CANCELLED; raise JobAlreadyFinished if terminal, JobNotFound."""
        row = await self._pool.fetch_one("cancel_job", {"job_id": job_id, "reason": reason})
        if row is None:
            job = await self.get(job_id)
            raise JobAlreadyFinished(f"job {job_id} already ended: {job.state}")
        return Job.from_row(row)

    async def unplace_from_unavailable_peers(self, *, peer_ttl: timedelta) -> int:
        """Queued jobs on down, draining or silent peers become unplaced; return how many."""
        return len(await self._pool.fetch_all("unplace_from_unavailable_peers", {"ttl": peer_ttl}))

    async def unplace_peer_queue(self, peer_id: uuid.UUID) -> int:
        """This peer's queued jobs become unplaced (drain); return how many."""
        return len(await self._pool.fetch_all("unplace_peer_queue", {"peer_id": peer_id}))

    async def list_unplaced(self, *, limit: int = 100) -> list[Job]:
        rows = await self._pool.fetch_all("list_queued_unplaced", {"limit": limit})
        return [Job.from_row(row) for row in rows]

    async def note_waiting(self, job_id: uuid.UUID, reason: str) -> bool:
        """Record why an unplaced queued job waits (in its `error`); True if written.

        False when the job is no longer queued and unplaced, or already says so.
        Not a change of state: nothing is recorded in its events or announced.
        """
        return (
            await self._pool.fetch_one("note_waiting_reason", {"job_id": job_id, "reason": reason})
            is not None
        )

    async def find_overdue(self, *, limit: int = 100) -> list[Job]:
        """Queued jobs past their queue timeout (database clock), the longest overdue first."""
        rows = await self._pool.fetch_all("find_overdue_queued", {"limit": limit})
        return [Job.from_row(row) for row in rows]

    async def fail_overdue(self, job_id: uuid.UUID, *, attempt: int, error: str) -> Job | None:
        """QUEUED -> FAILED with `error` if the job is still queued, at `attempt`, and
        past its queue timeout; else None (claimed or cancelled since)."""
        row = await self._pool.fetch_one(
            "fail_overdue_job", {"job_id": job_id, "attempt": attempt, "error": error}
        )
        return Job.from_row(row) if row is not None else None

    async def active_load(self) -> dict[uuid.UUID, int]:
        """Queued + running jobs per peer (peers with none are absent)."""
        rows = await self._pool.fetch_all("active_load", {})
        return {row["peer_id"]: row["active"] for row in rows}

    async def events(self, job_id: uuid.UUID) -> list[JobEvent]:
        rows = await self._pool.fetch_all("job_events", {"job_id": job_id})
        return [JobEvent.from_row(row) for row in rows]

    @staticmethod
    def _precondition(
        job: Job, action: str, *, peer_id: uuid.UUID | None = None, attempt: int | None = None
    ) -> Exception:
        if job.state.terminal:
            return JobAlreadyFinished(f"cannot {action} job {job.job_id}: already {job.state}")
        if (
            attempt is not None
            and job.state is JobState.RUNNING
            and (job.peer_id != peer_id or job.attempt != attempt)
        ):
            return StaleAttempt(
                f"cannot {action} job {job.job_id}: attempt {attempt} on peer {peer_id} no longer "
                f"owns it (attempt {job.attempt} on peer {job.peer_id} does)"
            )
        if attempt is not None and job.state is JobState.QUEUED and attempt <= job.attempt:
            return StaleAttempt(
                f"cannot {action} job {job.job_id}: attempt {attempt} was handed back or "
                f"rescued; the job is queued for its next attempt"
            )
        return FailedPrecondition(f"cannot {action} job {job.job_id} in state {job.state}")


def _finish_params(f: _Finish) -> dict[str, Any]:
    outcome = f.outcome
    return {
        "peer_id": f.peer_id,
        "attempt": f.attempt,
        "state": outcome.state.value,
        "output": outcome.output,
        "output_refs": list(outcome.output_refs),
        "error": outcome.error,
        "exit_code": outcome.exit_code,
        "bytes_fetched_remote": outcome.bytes_fetched_remote,
    }


async def _each(
    batch: list[T], run: Callable[[list[T]], Awaitable[Sequence[R | Failed]]]
) -> list[R | Failed]:
    """Run the items one by one, each failing (if it does) for its own caller alone."""
    results: list[R | Failed] = []
    for item in batch:
        try:
            (result,) = await run([item])
        except RegistryUnavailable as exc:
            # The database is gone, not the item: fail the rest now instead of
            # letting each wait out the pool's timeout in turn.
            results += [Failed(exc)] * (len(batch) - len(results))
            break
        except AnvilError as exc:
            result = Failed(exc)
        results.append(result)
    return results
