"""Rescue: every peer sweeps for jobs that lost their peer and re-places them.

Safe to run on every peer at once: each rescue and each assignment is a
compare-and-set in the registry, so two sweepers never both move one job.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

from daemon import metrics, retry
from daemon.exceptions import AnvilError
from daemon.jobs.peer_view import PeerView
from daemon.registry import Registry

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0  # finished jobs past their retention are deleted this often
PRUNE_BATCH = 1000  # rows per statement
PRUNE_BATCHES = 20  # statements per round at most: a backlog goes in steps


class Rescuer:
    def __init__(
        self,
        *,
        registry: Registry,
        view: PeerView,
        dispatch: Callable[[uuid.UUID, str, uuid.UUID], None],
        interval_s: float,
        retention: timedelta | None = None,
        sweep_results: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self._registry = registry
        self._view = view
        self._dispatch = dispatch
        self._interval_s = interval_s
        self._retention = retention
        # Deletes this peer's stored outputs that no job keeps any more.
        self._sweep_results = sweep_results
        # A short retention (tests, scratch clusters) is enforced at its own pace.
        self._prune_every_s = PRUNE_EVERY_S
        if retention is not None:
            self._prune_every_s = min(PRUNE_EVERY_S, max(retention.total_seconds() / 4, interval_s))
        self._next_prune = time.monotonic() + self._prune_every_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sweep()
            except AnvilError as exc:
                log.warning("rescue sweep failed: %s", exc)
            except Exception:
                log.exception("rescue sweep failed unexpectedly")

    async def prune_loop(self) -> None:
        """Prune on its own clock: a backlog of deletes never delays a rescue.

        Then delete the outputs no job keeps (of pruned jobs, of attempts that
        did not end their job), also when jobs are kept forever.
        """
        while True:
            await asyncio.sleep(max(0.0, self._next_prune - time.monotonic()))
            self._next_prune = time.monotonic() + self._prune_every_s
            try:
                await self.prune()
                if self._sweep_results is not None:
                    deleted = await self._sweep_results()
                    if deleted:
                        metrics.RESULT_OBJECTS_DELETED.inc(deleted)
                        log.info("deleted %d output objects no job keeps", deleted)
            except AnvilError as exc:
                log.warning("pruning finished jobs failed: %s", exc)
            except Exception:
                log.exception("pruning finished jobs failed unexpectedly")

    async def prune(self) -> int:
        """Delete finished jobs older than the retention; return how many went."""
        if self._retention is None:
            return 0
        pruned = 0
        for _ in range(PRUNE_BATCHES):
            n = await self._registry.jobs.prune(older_than=self._retention, limit=PRUNE_BATCH)
            pruned += n
            if n < PRUNE_BATCH:
                break
        if pruned:
            metrics.JOBS_PRUNED.inc(pruned)
            log.info("pruned %d jobs finished more than %s ago", pruned, self._retention)
        return pruned

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
            candidates = self._view.candidates(lost.capability, lost.region, lost.resources)
            order = candidates.failover_order(lost.locality_key, exclude={lost.peer_id})
            target = order[0] if order else None
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
                self._dispatch(target.peer_id, target.address, job.job_id)
        for job in await self._registry.jobs.list_unplaced():
            candidates = self._view.candidates(job.capability, job.region, job.resources)
            if not len(candidates):
                continue
            placement = candidates.place(
                job.locality_key, self._view.loads, loads_version=self._view.loads_version
            )
            try:
                await self._registry.jobs.assign(job.job_id, placement.peer_id, from_peer_id=None)
            except AnvilError:
                continue  # moved on meanwhile (claimed elsewhere, cancelled)
            moved += 1
            self._view.note_placed(placement.peer_id)
            self._dispatch(placement.peer_id, placement.address, job.job_id)
        return moved
