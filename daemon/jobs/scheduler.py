"""Pure placement: filter capable peers -> rank by HRW -> bounded-load pick.

No I/O. The daemon keeps a `CandidateSet` per (capability, region) and rebuilds
it only when membership changes, so the peer hashes are computed once per
change and each placement costs one vectorized HRW pass over the peers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

import hrw
from daemon.exceptions import NoCapablePeer
from daemon.registry.models import Capability
from daemon.resources import satisfies
from daemon.storage.refs import Scheme, parse_ref

DEFAULT_BALANCE = 1.25


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    peer_id: uuid.UUID
    address: str
    max_concurrency: int
    resources: Mapping[str, str]
    # The capability's registered per-run timeout on this peer (0: none).
    timeout_ms: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    peer_id: uuid.UUID
    address: str
    # Position of the pick in the key's HRW order: 0 is the data-local peer.
    rank: int
    # Every candidate was at capacity: the job queues on the data-local peer.
    saturated: bool


def locality_key(*, explicit: str, inputs: Sequence[str], job_id: uuid.UUID) -> str:
    """The placement key: explicit, else the first input's object key, else the job id.

    Raises InvalidArgument when the first input is not a valid object ref.
    """
    if explicit:
        return explicit
    if inputs:
        ref = parse_ref(inputs[0])
        return (ref.sha256 or "") if ref.scheme is Scheme.SHA256 else ref.key
    return str(job_id)


def capable(
    capabilities: Iterable[Capability], *, region: str, resources: Mapping[str, str]
) -> list[Candidate]:
    """Live peers of the region whose registered resources satisfy the request."""
    return [
        Candidate(
            peer_id=c.peer_id,
            address=c.peer_address or "",
            max_concurrency=c.max_concurrency,
            resources=c.resources,
            timeout_ms=c.timeout_ms,
        )
        for c in capabilities
        if c.peer_live and c.ready and c.region == region and satisfies(c.resources, resources)
    ]


class CandidateSet:
    """The peers able to run one capability in one region, with their HRW hashes."""

    def __init__(self, candidates: Sequence[Candidate]) -> None:
        self.candidates = list(candidates)
        self._membership = (
            hrw.Membership([c.peer_id for c in self.candidates]) if self.candidates else None
        )
        self._capacities = np.array([c.max_concurrency for c in self.candidates], dtype=np.int64)
        self._by_id = {c.peer_id: c for c in self.candidates}
        self._index = {c.peer_id: i for i, c in enumerate(self.candidates)}
        # Loads as an array aligned with the candidates, rebuilt only when the
        # caller's loads change version: O(N) Python work per refresh, not per job.
        self._loads = np.zeros(len(self.candidates), dtype=np.int64)
        self._loads_version: int | None = None

    def __len__(self) -> int:
        return len(self.candidates)

    def timeout_ceiling_ms(self) -> int:
        """The lowest timeout any candidate registered (0: none did): a job asking for
        more could land where it is not allowed."""
        return min((c.timeout_ms for c in self.candidates if c.timeout_ms), default=0)

    def bump(self, peer_id: uuid.UUID) -> None:
        """One more job placed on `peer_id` since the loads were read."""
        index = self._index.get(peer_id)
        if index is not None:
            self._loads[index] += 1

    def place(
        self,
        key: str,
        loads: Mapping[uuid.UUID, int],
        *,
        c: float = DEFAULT_BALANCE,
        what: str = "this job",
        loads_version: int | None = None,
    ) -> Placement:
        """The peer to run a job keyed `key`; raises NoCapablePeer when there is none.

        The first peer in HRW order whose load is below its max_concurrency and
        below ceil(c x mean load) wins; when all are full the job queues on the
        top (data-local) peer rather than being refused.
        """
        if self._membership is None:
            raise NoCapablePeer(f"no live peer can run {what}")
        if loads_version is None or loads_version != self._loads_version:
            self._loads = np.array(
                [loads.get(cand.peer_id, 0) for cand in self.candidates], dtype=np.int64
            )
            self._loads_version = loads_version
        top = self._membership.pick(key)
        pick = self._membership.pick_bounded(key, self._loads, c=c, capacities=self._capacities)
        chosen = top if pick is None else pick
        # The full HRW order is only needed to report how far a job spilled.
        rank = 0 if chosen == top else self._membership.top_k(key, len(self)).index(chosen)
        return Placement(
            peer_id=chosen,
            address=self._by_id[chosen].address,
            rank=rank,
            saturated=pick is None,
        )

    def failover_order(self, key: str, *, exclude: Iterable[uuid.UUID] = ()) -> list[Candidate]:
        """Candidates in HRW order for `key`, without the excluded peers (rescue order)."""
        if self._membership is None:
            return []
        skip = set(exclude)
        order = self._membership.top_k(key, len(self))
        return [self._by_id[p] for p in order if p not in skip]
