"""The one placement use case: which peer runs a job, and telling it so.

SubmitJob places new jobs, the rescuer re-places jobs whose peer was lost
(expired lease: the next peer in the key's HRW order; unplaced: a fresh
bounded-load pick), and a draining peer's hand-backs come back unplaced to the
rescuer. All of them decide here, with one policy (the bounded-load factor,
the timeout ceiling), so a setting cannot apply to one path and not another.

The decisions themselves are pure (`jobs/scheduler.py`, over this peer's
`PeerView`); this module adds the policy, the load bookkeeping, the metrics
and the dispatch to the chosen peer.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from daemon import metrics
from daemon.exceptions import InvalidArgument, NoCapablePeer
from daemon.jobs.scheduler import DEFAULT_BALANCE, Candidate, CandidateSet, Placement

# dispatch(peer_id, address, job_id): wake the chosen peer (local or remote).
Dispatch = Callable[[uuid.UUID, str, uuid.UUID], None]


class View(Protocol):
    """What placement reads of this peer's view of the fabric (jobs/peer_view.py)."""

    loads: dict[uuid.UUID, int]
    loads_version: int

    def candidates(
        self, capability: str, region: str, resources: Mapping[str, str]
    ) -> CandidateSet: ...

    def note_placed(self, peer_id: uuid.UUID) -> None: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class PlacementPolicy:
    # Bounded loads: a peer takes a job while under ceil(balance x mean load).
    balance: float = DEFAULT_BALANCE
    # The operator's ceiling on any job's timeout (max_job_timeout_s); 0: none.
    max_timeout_ms: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Wanted:
    """What a job needs of a peer."""

    capability: str
    region: str
    resources: Mapping[str, str]
    timeout_ms: int = 0


class Placer:
    def __init__(self, *, view: View, dispatch: Dispatch, policy: PlacementPolicy) -> None:
        self._view = view
        self._dispatch = dispatch
        self.policy = policy

    def choose(self, wanted: Wanted, key: str) -> Placement:
        """The peer for a job keyed `key`: the first in HRW order under its bounded load.

        Raises NoCapablePeer (no live peer of the region registered it with those
        resources) and InvalidArgument (a timeout over what the capability or the
        operator allows: a job may only lower it).
        """
        candidates = self._view.candidates(wanted.capability, wanted.region, wanted.resources)
        if not len(candidates):
            raise NoCapablePeer(no_peer_reason(wanted))
        self._check_timeout(wanted, candidates)
        return candidates.place(
            key,
            self._view.loads,
            c=self.policy.balance,
            loads_version=self._view.loads_version,
        )

    def failover(self, wanted: Wanted, key: str, *, lost: uuid.UUID) -> Candidate | None:
        """Where a job whose peer `lost` died goes: the next peer in its key's HRW
        order, so it lands where its data's next replica is; None when there is none."""
        candidates = self._view.candidates(wanted.capability, wanted.region, wanted.resources)
        order = candidates.failover_order(key, exclude={lost})
        return order[0] if order else None

    def placed(self, placement: Placement, job_id: uuid.UUID, *, capability: str) -> None:
        """A job was recorded on `placement`: count it against the peer's load and
        tell the peer (best effort; NOTIFY and polling are the backstops)."""
        self._view.note_placed(placement.peer_id)
        metrics.placement_made(capability, rank=placement.rank, saturated=placement.saturated)
        self.wake(placement.peer_id, placement.address, job_id)

    def wake(self, peer_id: uuid.UUID, address: str, job_id: uuid.UUID) -> None:
        self._dispatch(peer_id, address, job_id)

    def _check_timeout(self, wanted: Wanted, candidates: CandidateSet) -> None:
        ceiling = self.policy.max_timeout_ms
        if ceiling and wanted.timeout_ms > ceiling:
            raise InvalidArgument(
                f"timeout_ms {wanted.timeout_ms} is over this fabric's ceiling of "
                f"{ceiling} ms (max_job_timeout_s)"
            )
        allowed = candidates.timeout_ceiling_ms()
        if allowed and wanted.timeout_ms > allowed:
            raise InvalidArgument(
                f"timeout_ms {wanted.timeout_ms} is over the {allowed} ms that capability "
                f"{wanted.capability!r} allows: a job may only lower its capability's timeout"
            )


def no_peer_reason(wanted: Wanted) -> str:
    needs = f" with resources {dict(wanted.resources)}" if wanted.resources else ""
    return (
        f"no live peer in region {wanted.region!r} has registered capability "
        f"{wanted.capability!r}{needs}"
    )
