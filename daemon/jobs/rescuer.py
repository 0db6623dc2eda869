"""Rescue: every peer sweeps for jobs that lost their peer and re-places them.

Jobs never wait silently forever: an unplaced job that no live peer can run
says so in its status while it waits, and a job queued past its queue timeout
fails with an error that says no peer ran it, and why as far as known.

Safe to run on every peer at once: each rescue, assignment and failure is a
compare-and-set in the registry, so two sweepers never both move one job.
"""

from __future__ import annotations

import datetime as dt
import logging

from daemon import metrics, retry
from daemon.exceptions import AnvilError, NoCapablePeer
from daemon.jobs.peer_view import PeerView
from daemon.jobs.placer import Placer, Wanted
from daemon.registry import Registry
from daemon.registry.models import Job

log = logging.getLogger(__name__)

WAITING = "waiting for a peer: "


class Rescuer:
    """One sweep at a time (`sweep`); the node runs it every lease/4 (daemon/loops.py)."""

    def __init__(self, *, registry: Registry, view: PeerView, placer: Placer) -> None:
        self._registry = registry
        self._view = view
        self._placer = placer

    async def sweep(self) -> int:
        """One pass: mark silent peers down, take queued jobs off unavailable peers,
        rescue expired leases (with backoff), fail jobs queued past their queue
        timeout, place unplaced jobs (or say why they wait); return jobs moved."""
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
        moved += await self._fail_overdue()
        for job in await self._registry.jobs.list_unplaced():
            wanted = Wanted(capability=job.capability, region=job.region, resources=job.resources)
            try:
                placement = self._placer.choose(wanted, job.locality_key)
            except NoCapablePeer as exc:
                # Stays unplaced until a capable peer comes, saying so meanwhile.
                reason = WAITING + str(exc)
                if job.error != reason:
                    await self._registry.jobs.note_waiting(job.job_id, reason)
                continue
            try:
                await self._registry.jobs.assign(job.job_id, placement.peer_id, from_peer_id=None)
            except AnvilError:
                continue  # moved on meanwhile (claimed elsewhere, cancelled)
            moved += 1
            self._placer.placed(placement, job.job_id, capability=job.capability)
        return moved

    async def _fail_overdue(self) -> int:
        """Fail the jobs queued past their queue timeout; return how many."""
        failed = 0
        for job in await self._registry.jobs.find_overdue():
            error = queue_timeout_error(job, self._why_waiting(job))
            ended = await self._registry.jobs.fail_overdue(
                job.job_id, attempt=job.attempt, error=error
            )
            if ended is None:
                continue  # claimed or cancelled since the snapshot
            failed += 1
            metrics.JOBS_QUEUE_TIMED_OUT.labels(job.capability).inc()
            log.warning(
                "job %s failed: %s",
                job.job_id,
                error,
                extra={"job_id": str(job.job_id), "attempt": job.attempt},
            )
        return failed

    def _why_waiting(self, job: Job) -> str:
        """Why no peer ran the queued `job`, as far as this peer knows."""
        if job.peer_id is not None:
            return f"it stayed queued on peer {job.peer_id}, which did not start it"
        wanted = Wanted(capability=job.capability, region=job.region, resources=job.resources)
        try:
            self._placer.choose(wanted, job.locality_key)
        except NoCapablePeer as exc:
            return str(exc)
        return "it was not placed on a peer in time"


def queue_timeout_error(job: Job, why: str) -> str:
    """The error of a job that no peer ran within its queue timeout: the timeout,
    since when it waited, and `why`."""
    ms = job.queue_timeout_ms
    timeout = f"{ms // 1000} s" if ms % 1000 == 0 else f"{ms / 1000} s"
    since = job.queued_at.astimezone(dt.UTC).isoformat(timespec="seconds")
    return (
        f"no peer ran this job within its queue timeout of {timeout} "
        f"(queued since {since.removesuffix('+00:00')}Z): {why}"
    )
