"""This peer's rows in the registry: announced at start, re-asserted at every heartbeat.

A peer's own rows say what it runs; anyone who changed or removed one (an
operator's mistake, a restored database) is overruled within a heartbeat. One
read per heartbeat; a write (and the membership NOTIFY it causes) only when a
row differs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from daemon import __version__
from daemon.capability_config import LocalCapability
from daemon.exceptions import NotFound
from daemon.registry import Registry
from daemon.registry.models import CapabilitySpec, same_terms

log = logging.getLogger(__name__)


class Registration:
    def __init__(
        self,
        *,
        registry: Registry,
        peer_id: uuid.UUID,
        region: str,
        config: Callable[[], tuple[LocalCapability, ...]],
    ) -> None:
        """`config()`: the capabilities this peer's config gives now (a reload changes them)."""
        self._registry = registry
        self._peer_id = peer_id
        self._region = region
        self._config = config
        self.address = ""

    async def announce(self, address: str, *, prune: bool = False) -> None:
        """Register this peer and the capabilities it runs (idempotent upserts).

        With `prune`, rows for capabilities this peer no longer offers are
        removed: they would attract jobs that nobody here claims.
        """
        self.address = address
        await self._registry.peers.upsert(
            peer_id=self._peer_id, address=address, region=self._region, version=__version__
        )
        if prune:
            keep = [c.name for c in self._config()]
            stale = await self._registry.capabilities.prune(self._peer_id, keep)
            if stale:
                log.warning("no longer offering %s: removed from the registry", ", ".join(stale))
        for spec in self.rows():
            await self._registry.capabilities.register(spec)

    async def heartbeat(self) -> None:
        """Refresh this peer's heartbeat and restore its rows where they differ.

        Raises the registry's errors (AnvilError).
        """
        try:
            await self._registry.peers.heartbeat(self._peer_id)
        except NotFound:
            # The row is gone (deleted by hand, a restored database): announce
            # this peer again, or it would never be placed on.
            await self.announce(self.address)
            return
        found = {
            c.capability: c for c in await self._registry.capabilities.find(peer_id=self._peer_id)
        }
        for spec in self.rows():
            row = found.get(spec.capability)
            if row is None or row.region != spec.region or not same_terms(row, spec):
                log.warning(
                    "registry row of %s on this peer was changed or removed: restoring it",
                    spec.capability,
                )
                await self._registry.capabilities.register(spec)

    async def leave(self) -> None:
        """Deregister every capability and mark this peer down."""
        await self._registry.capabilities.deregister_peer(self._peer_id)
        await self._registry.peers.set_state(self._peer_id, "down")

    def rows(self) -> list[CapabilitySpec]:
        """The registry rows this peer's capabilities should have."""
        return [
            CapabilitySpec(
                peer_id=self._peer_id,
                region=self._region,
                capability=cap.name,
                resources=cap.resources,
                max_concurrency=cap.max_concurrency,
                executor=cap.executor_message(),
            )
            for cap in self._config()
        ]
