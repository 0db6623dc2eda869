"""The job state machine: QUEUED -> RUNNING -> one terminal state. Pure, no I/O.

The registry enforces the rules in SQL (compare-and-set updates and CHECK
constraints); this module is their readable statement, held to the SQL by
tests/integration/test_registry_transitions.py.
"""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    """Values equal the PostgreSQL enum `job_state`."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.TIMED_OUT, JobState.CANCELLED}
)

# RUNNING -> QUEUED is a rescue (lease expired) or a hand-back (drain); both
# make the next claim a new attempt. QUEUED -> FAILED: no peer ran the job
# within its queue timeout.
_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {
            JobState.QUEUED,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.TIMED_OUT,
            JobState.CANCELLED,
        }
    ),
}

# What a peer may write when an attempt ends.
FINISH_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.TIMED_OUT}
)


def can_transition(current: JobState, target: JobState) -> bool:
    """True when the state machine allows current -> target; terminal states never move."""
    return target in _ALLOWED.get(current, frozenset())


# Within one attempt a job only moves forward through these ranks: a claim
# starts attempt n RUNNING; it ends QUEUED again (rescue, hand-back) or
# terminal; a queued job is claimed (attempt n+1) or ends (cancel, queue
# timeout). Attempt 0 is the job as submitted, QUEUED.
_RANK = {JobState.RUNNING: 0, JobState.QUEUED: 1}


def progress(state: JobState, attempt: int) -> tuple[int, int]:
    """A key that grows with every change of one job: (attempt, rank of state)."""
    return attempt, _RANK.get(state, 2)
