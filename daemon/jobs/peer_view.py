"""This peer's in-memory view of the fabric: who can run what, and how loaded.

Refreshed when the registry announces a membership change (NOTIFY) and on a
timer (heartbeats age silently), so placing a job never queries the database.
Loads are refreshed on a shorter timer and bumped locally for each placement
in between, so a burst of submissions does not pile onto one peer.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping

from daemon import metrics
from daemon.jobs.scheduler import Candidate, CandidateSet, capable
from daemon.loops import Background, every
from daemon.registry import Registry
from daemon.registry.listener import MEMBERSHIP, Listener
from daemon.registry.models import Capability, Peer

log = logging.getLogger(__name__)

_CacheKey = tuple[str, str, frozenset[tuple[str, str]]]


class PeerView:
    def __init__(
        self,
        registry: Registry,
        listener: Listener | None,
        *,
        refresh_s: float = 2.0,
        load_refresh_s: float = 0.5,
    ) -> None:
        self._registry = registry
        self._listener = listener
        self._refresh_s = refresh_s
        self._load_refresh_s = load_refresh_s
        self._capabilities: list[Capability] = []
        self._peers: list[Peer] = []
        self._sets: dict[_CacheKey, CandidateSet] = {}
        self._stores: dict[str, CandidateSet] = {}
        self.loads: dict[uuid.UUID, int] = {}
        # Bumped whenever `loads` is re-read, so candidate sets re-sync their arrays.
        self.loads_version = 0
        self._background = Background()
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self.refresh()
        await self.refresh_loads()
        self._background.start(
            "membership-refresh",
            every(self._refresh_s, self.refresh, what="membership refresh", wake=self._changed),
        )
        self._background.start(
            "membership-loads", every(self._load_refresh_s, self.refresh_loads, what="load refresh")
        )
        if self._listener is not None:
            self._background.start("membership-listen", self._listen())

    async def close(self) -> None:
        await self._background.close()

    async def refresh(self) -> None:
        """Re-read capabilities and liveness; raise AnvilError if the registry is down."""
        capabilities = await self._registry.capabilities.find(live_only=True)
        peers = await self._registry.peers.find(live_only=True)
        self._capabilities, self._peers = capabilities, peers
        self._sets, self._stores = {}, {}
        metrics.MEMBERSHIP_PEERS.labels("live").set(len(peers))
        metrics.MEMBERSHIP_PEERS.labels("capable").set(len({c.peer_id for c in capabilities}))

    async def refresh_loads(self) -> None:
        self.loads = await self._registry.jobs.active_load()
        self.loads_version += 1

    def candidates(
        self, capability: str, region: str, resources: Mapping[str, str]
    ) -> CandidateSet:
        """Peers that can run `capability` in `region` with `resources` (cached)."""
        key = (capability, region, frozenset(resources.items()))
        found = self._sets.get(key)
        if found is None:
            rows = [c for c in self._capabilities if c.capability == capability]
            found = CandidateSet(capable(rows, region=region, resources=resources))
            self._sets[key] = found
        return found

    def store_peers(self, region: str) -> CandidateSet:
        """Live peers of `region`: the built-in store places each object on the HRW
        owner of its key among them, as jobs are placed, so a job keyed by its
        input runs where the input is (cached)."""
        found = self._stores.get(region)
        if found is None:
            found = CandidateSet(
                [
                    Candidate(peer_id=p.peer_id, address=p.address, max_concurrency=1, resources={})
                    for p in self._peers
                    if p.region == region
                ]
            )
            self._stores[region] = found
        return found

    def note_placed(self, peer_id: uuid.UUID) -> None:
        self.loads[peer_id] = self.loads.get(peer_id, 0) + 1
        for candidates in self._sets.values():
            candidates.bump(peer_id)

    def request_refresh(self) -> None:
        self._changed.set()

    async def _listen(self) -> None:
        assert self._listener is not None
        async with self._listener.subscribe(MEMBERSHIP) as queue:
            while True:
                await queue.get()
                self._changed.set()
