"""This peer's job runner: claim a job, run its attempt under a lease, record the result.

Claims are woken by Dispatch, by the registry's NOTIFY on this peer's channel,
and by a poll (the backstop). Each capability runs at most `max_concurrency`
jobs here. Leases are renewed every lease/3; a job whose lease or ownership is
lost (rescued, cancelled) has its guest killed at once, and if the registry is
unreachable the guests are killed before their leases can expire, so a job is
never running twice for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from daemon import metrics
from daemon.capability_config import LocalCapability
from daemon.exceptions import AnvilError, FailedPrecondition, RegistryUnavailable, Unavailable
from daemon.executors.result import JobExecutor
from daemon.jobs.attempt import AttemptOptions, AttemptRunner, Workspace
from daemon.jobs.events import JobEventHub
from daemon.jobs.slots import Slots
from daemon.jobs.state import JobState
from daemon.loops import wait_set
from daemon.registry import Registry
from daemon.registry.models import AttemptResult, Job
from daemon.storage.fabric import Fabric
from daemon.storage.fetcher import Fetcher

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunnerOptions:
    lease: timedelta
    poll_interval_s: float
    work_root: Path
    # How each attempt runs: inline output, default and ceiling of its timeout.
    attempt: AttemptOptions
    # Jobs this peer runs at once, over all capabilities. Claiming more than the
    # executors can run only adds leases to renew and tasks to schedule; the
    # rest stay queued here (their placement does not change).
    max_running: int = 32
    # Guests each executor kind runs at once (the WASM pool's workers); a job
    # is claimed only with one of these free. A kind missing here is unbounded.
    executor_slots: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclass(slots=True)
class _Running:
    job: Job
    task: asyncio.Task[None]
    # Set when this peer lost the job (cancelled, rescued); the result is dropped.
    lost: str = ""
    # The attempt is over and its result is being written: the notification of
    # that very write must not be mistaken for losing the job.
    finishing: bool = False
    # Holds one of its executor's slots (until the guest is done).
    slot: bool = True


async def _remove_leftovers(*paths: Path) -> None:
    """Remove what an attempt left on disk. A job without inputs and outputs left
    nothing (the executor removes an output folder the guest left empty): then
    this costs a stat per path, no thread hop."""
    for path in paths:
        if os.path.lexists(path):  # noqa: ASYNC240 - one stat, cheaper than a thread hop
            await asyncio.to_thread(shutil.rmtree, path, True)


def _clear_work_root(work_root: Path) -> None:
    """Create the work folder, emptied of what a crashed predecessor left."""
    work_root.mkdir(parents=True, exist_ok=True)
    for stale in work_root.iterdir():
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _ids(job: Job) -> dict[str, object]:
    """Structured fields of a log line about a job (JSON keys in the journal)."""
    return {"job_id": str(job.job_id), "attempt": job.attempt}


class Runner:
    def __init__(
        self,
        *,
        registry: Registry,
        peer_id: uuid.UUID,
        capabilities: Mapping[str, LocalCapability],
        executors: Mapping[str, JobExecutor],
        fetcher: Fetcher,
        fabric: Fabric,
        hub: JobEventHub,
        options: RunnerOptions,
    ) -> None:
        self._registry = registry
        self._peer_id = peer_id
        self._capabilities = dict(capabilities)
        self._attempts = AttemptRunner(
            executors=executors,
            fetcher=fetcher,
            fabric=fabric,
            options=options.attempt,
        )
        self._hub = hub
        self._options = options
        self._running: dict[uuid.UUID, _Running] = {}
        self._per_capability: dict[str, int] = dict.fromkeys(capabilities, 0)
        self._slots = Slots(
            options.executor_slots, {name: cap.kind for name, cap in capabilities.items()}
        )
        self._wake = asyncio.Event()
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._last_renewal = time.monotonic()

    # -- the PeerService's view ------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def running_jobs(self) -> int:
        return len(self._running)

    def wake(self) -> None:
        self._wake.set()

    @property
    def capabilities(self) -> Mapping[str, LocalCapability]:
        return dict(self._capabilities)

    def set_capabilities(self, capabilities: Mapping[str, LocalCapability]) -> None:
        """What this peer claims from now on (a deployment came or went, the config
        was reloaded). Jobs of a capability that left run to their end; none of
        it is claimed any more."""
        if dict(capabilities) == self._capabilities:
            return
        self._capabilities = dict(capabilities)
        for name in capabilities:
            self._per_capability.setdefault(name, 0)
        self._slots.set_kinds({name: cap.kind for name, cap in capabilities.items()})
        self.wake()

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(_clear_work_root, self._options.work_root)
        self._hub.on_event(self._on_job_event)
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="runner-claims"),
            asyncio.create_task(self._lease_loop(), name="runner-leases"),
        ]
        self.wake()

    async def drain(self, grace_s: float) -> None:
        """Stop claiming; let running jobs finish within grace_s, hand back the rest.

        Jobs still queued here are handed back at once, so other peers start them
        while this one finishes what it runs.
        """
        self._draining = True
        with contextlib.suppress(AnvilError):
            await self._registry.jobs.unplace_peer_queue(self._peer_id)
        pending = [r.task for r in self._running.values()]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        for running in list(self._running.values()):
            if running.finishing:
                continue  # its result is being written: let it land
            running.lost = "handed back: peer draining"
            running.task.cancel()
            with contextlib.suppress(AnvilError):
                await self._registry.jobs.release(
                    running.job.job_id,
                    peer_id=self._peer_id,
                    attempt=running.job.attempt,
                    next_peer_id=None,
                    error="peer drained before the job finished; re-placed",
                    spare=True,
                )
        writing = [r.task for r in self._running.values() if r.finishing]
        if writing:
            await asyncio.wait(writing, timeout=5)
        await self.close()

    async def close(self) -> None:
        self._draining = True
        tasks = self._tasks + [r.task for r in self._running.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    # -- claiming --------------------------------------------------------------
    async def _claim_loop(self) -> None:
        while not self._draining:
            await wait_set(self._wake, self._options.poll_interval_s)
            self._wake.clear()
            try:
                await self._claim_free_slots()
            except AnvilError as exc:
                log.warning("claiming failed: %s", exc)
                await asyncio.sleep(self._options.poll_interval_s)
            except Exception:
                log.exception("claiming failed unexpectedly")
                await asyncio.sleep(self._options.poll_interval_s)

    async def _claim_free_slots(self) -> None:
        for name, cap in self._capabilities.items():
            while not self._draining:
                free = min(
                    cap.max_concurrency - self._per_capability[name],
                    self._options.max_running - len(self._running),
                )
                slots = self._slots.free_for(name)
                if slots is not None:
                    free = min(free, slots)
                if free <= 0:
                    break
                epoch = self._hub.epoch
                jobs = await self._registry.jobs.claim_next(
                    self._peer_id, lease=self._options.lease, limit=free, capabilities=[name]
                )
                for job in jobs:
                    self._hub.publish(job, epoch=epoch)
                    self._start(job, cap)
                if len(jobs) < free:
                    break

    def _start(self, job: Job, cap: LocalCapability) -> None:
        self._per_capability[cap.name] += 1
        self._slots.take(cap.name)
        metrics.JOBS_RUNNING.labels(cap.name).inc()
        task = asyncio.create_task(self._run(job, cap), name=f"job-{job.job_id}")
        entry = _Running(job=job, task=task)
        self._running[job.job_id] = entry
        # In a done-callback, not the task's `finally`: it runs even for a task
        # cancelled before its first step, and it only removes this very entry
        # (a newer attempt of the same job may already be running here).
        task.add_done_callback(lambda _: self._done(entry, cap))

    def _free_slot(self, entry: _Running | None, cap: LocalCapability) -> None:
        """Give the attempt's executor slot back (once): its guest is done."""
        if entry is not None and entry.slot:
            entry.slot = False
            self._slots.give_back(cap.name)
            self.wake()

    def _done(self, entry: _Running, cap: LocalCapability) -> None:
        if self._running.get(entry.job.job_id) is entry:
            del self._running[entry.job.job_id]
        self._free_slot(entry, cap)
        self._per_capability[cap.name] -= 1
        metrics.JOBS_RUNNING.labels(cap.name).dec()
        self.wake()

    def _on_job_event(self, job_id: uuid.UUID, state: str, attempt: int) -> None:
        running = self._running.get(job_id)
        if running is None or running.finishing:
            return
        ours = running.job.attempt
        # An event about an earlier attempt (the job's insert, the claim before a
        # rescue) is old news; only a change to our attempt, or a newer attempt
        # elsewhere, means this peer no longer owns the job.
        if attempt > ours or (attempt == ours and state != JobState.RUNNING.value):
            self._lose(running, f"job became {state} (attempt {attempt}) elsewhere")

    def _lose(self, running: _Running, why: str) -> None:
        if not running.lost:
            running.lost = why
            log.info("stopping job %s: %s", running.job.job_id, why, extra=_ids(running.job))
            running.task.cancel()

    # -- leases ----------------------------------------------------------------
    async def _lease_loop(self) -> None:
        lease_s = self._options.lease.total_seconds()
        while True:
            await asyncio.sleep(lease_s / 3)
            owned = [
                (r.job.job_id, r.job.attempt)
                for r in self._running.values()
                if not r.lost and not r.finishing
            ]
            if not owned:
                self._last_renewal = time.monotonic()
                continue
            try:
                # Bounded: a registry that hangs (partition, black-holed socket)
                # must not keep this loop from the kill below.
                async with asyncio.timeout(lease_s / 3):
                    kept = await self._registry.jobs.renew_leases(
                        self._peer_id, owned, lease=self._options.lease
                    )
            except (AnvilError, TimeoutError) as exc:
                # Kill our guests before the leases can expire: past that point
                # another peer may rescue and re-run the jobs. The last renewal
                # gave them `lease` from then; this fires by lease * 2/3.
                if time.monotonic() - self._last_renewal > lease_s / 2:
                    reason = str(exc) or "the registry did not answer in time"
                    for running in list(self._running.values()):
                        self._lose(running, f"cannot renew lease: {reason}")
                continue
            except Exception:
                log.exception("lease renewal failed unexpectedly")
                continue
            self._last_renewal = time.monotonic()
            for job_id, _ in owned:
                current = self._running.get(job_id)
                # A job finished by this peer since the snapshot is not lost.
                if job_id not in kept and current is not None and not current.finishing:
                    self._lose(current, "lease lost (rescued or cancelled)")

    # -- one job ---------------------------------------------------------------
    async def _run(self, job: Job, cap: LocalCapability) -> None:
        space = Workspace.of(self._options.work_root, job)
        began = time.monotonic()
        outcome: AttemptResult | None = None

        def guest_done() -> None:
            entry = self._running.get(job.job_id)
            self._free_slot(entry if entry and entry.job.attempt == job.attempt else None, cap)

        try:
            outcome = await self._attempts.run(job, cap, space, guest_done=guest_done)
            metrics.job_finished(cap.name, outcome.state, time.monotonic() - began)
            running = self._running.get(job.job_id)
            if running is not None and running.job.attempt == job.attempt:
                running.finishing = True
            await self._finish(job, outcome)
        except asyncio.CancelledError:
            if outcome is None:
                metrics.JOBS_STOPPED.labels(cap.name).inc()
            running = self._running.get(job.job_id)
            log.info(
                "job %s attempt %d stopped: %s",
                job.job_id,
                job.attempt,
                running.lost if running else "shutdown",
                extra=_ids(job),
            )
        except Unavailable as exc:
            # Storage or a peer was unreachable (fetching inputs, storing
            # outputs): nothing is wrong with the job, so it is handed back to be
            # placed again rather than failed.
            log.warning(
                "job %s attempt %d handed back: %s", job.job_id, job.attempt, exc, extra=_ids(job)
            )
            if outcome is None:
                metrics.JOBS_STOPPED.labels(cap.name).inc()
            with contextlib.suppress(AnvilError):
                await self._registry.jobs.release(
                    job.job_id,
                    peer_id=self._peer_id,
                    attempt=job.attempt,
                    next_peer_id=None,
                    error=f"handed back: {exc}",
                )
        except Exception:
            log.exception(
                "job %s attempt %d crashed the runner", job.job_id, job.attempt, extra=_ids(job)
            )
            if outcome is None:
                metrics.job_finished(cap.name, JobState.FAILED, time.monotonic() - began)
            with contextlib.suppress(AnvilError):
                await self._finish(
                    job, AttemptResult(state=JobState.FAILED, error="internal error on the peer")
                )
        finally:
            await _remove_leftovers(space.root, space.output)

    async def _finish(self, job: Job, outcome: AttemptResult) -> None:
        delay = 0.1
        while True:
            try:
                epoch = self._hub.epoch
                finished = await self._registry.jobs.finish(
                    job.job_id, peer_id=self._peer_id, attempt=job.attempt, outcome=outcome
                )
                self._hub.publish(finished, epoch=epoch)
                return
            except RegistryUnavailable as exc:
                # Keep trying while the lease may still be ours; the lease loop
                # cancels this task once it is not.
                log.warning("cannot record result of %s yet: %s", job.job_id, exc, extra=_ids(job))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except FailedPrecondition as exc:
                log.info(
                    "result of %s attempt %d refused: %s",
                    job.job_id,
                    job.attempt,
                    exc,
                    extra=_ids(job),
                )
                return
