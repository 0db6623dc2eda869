"""Rescue: every peer sweeps for jobs that lost their peer and re-places them.

Safe to run on every peer at once: each rescue and each assignment is a
compare-and-set in the registry, so two sweepers never both move one job.
"""

from __future__ import annotations

import logging

from daemon import retry
from daemon.exceptions import AnvilError, NoCapablePeer
from daemon.jobs.peer_view import PeerView
from daemon.jobs.placer import Placer, Wanted
from daemon.registry import Registry

log = logging.getLogger(__name__)


class Rescuer:
    """One sweep at a time (`sweep`); the node runs it every lease/4 (daemon/loops.py)."""

    def __init__(self, *, registry: Registry, view: PeerView, placer: Placer) -> None:
        self._registry = registry
        self._view = view
        self._placer = placer

    async def sweep(self) -> int:
        """One pass: mark silent peers down, take queued jobs off unavailable peers,
        rescue expired leases (with backoff), place unplaced jobs; return jobs moved."""
        moved = 0
        down = await self._registry.peers.mark_stale_down()
        if down:
            log.warning("peers stopped heartbeating, marked down: %s", down)
            self._view.request_refresh()
        moved += await self._registry.jobs.unplace_from_unavailable_peers(
            peer_ttl=self._registry.peers.peer_ttl
        )
        for lost in await self._registry.jobs.find_expired():
            target = self._placer.failover(
                Wanted(capability=lost.capability, region=lost.region, resources=lost.resources),
                lost.locality_key,
                lost=lost.peer_id,
            )
            job = await self._registry.jobs.rescue(
                lost.job_id,
                attempt=lost.attempt,
                next_peer_id=target.peer_id if target else None,
                error=f"lease expired on peer {lost.peer_id} during attempt {lost.attempt}",
                backoff=retry.backoff(lost.attempt),
            )
            if job is None:
                continue  # it finished or was renewed since the snapshot
            moved += 1
            log.info(
                "rescued job %s (attempt %d) -> %s",
                job.job_id,
                lost.attempt,
                job.state,
                extra={"job_id": str(job.job_id), "attempt": lost.attempt},
            )
            if target is not None and not job.state.terminal:
                self._placer.wake(target.peer_id, target.address, job.job_id)
        for job in await self._registry.jobs.list_unplaced():
            wanted = Wanted(capability=job.capability, region=job.region, resources=job.resources)
            try:
                placement = self._placer.choose(wanted, job.locality_key)
            except NoCapablePeer:
                continue  # stays unplaced until a capable peer comes
            try:
                await self._registry.jobs.assign(job.job_id, placement.peer_id, from_peer_id=None)
            except AnvilError:
                continue  # moved on meanwhile (claimed elsewhere, cancelled)
            moved += 1
            self._placer.placed(placement, job.job_id, capability=job.capability)
        return moved
