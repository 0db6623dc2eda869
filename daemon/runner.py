"""This peer's job runner: claim, fetch, execute under a lease, persist the result.

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
from urllib.parse import quote

from daemon import metrics
from daemon.access import RESULTS_BUCKET
from daemon.capability_config import LocalCapability
from daemon.exceptions import AnvilError, FailedPrecondition, RegistryUnavailable, Unavailable
from daemon.execution import ExecutionOutcome, ExecutionRequest, JobExecutor
from daemon.jobstate import JobState
from daemon.registry import Registry
from daemon.registry.models import Job, Outcome
from daemon.slots import Slots
from daemon.storage.fabric import Fabric, count_remote_bytes
from daemon.storage.fetcher import Fetcher
from daemon.watch import JobEventHub

log = logging.getLogger(__name__)

# Beyond the job's timeout: compiling a module (bounded at 60 s by the WASM
# executor) or starting a container, plus scheduling slack.
EXECUTOR_GRACE_S = 90.0
# Storing a successful attempt's outputs counts against its timeout, with this
# much slack for the last few writes of a guest that used all of its time.
UPLOAD_GRACE_S = 2.0


@dataclass(frozen=True, kw_only=True, slots=True)
class RunnerOptions:
    lease: timedelta
    poll_interval_s: float
    max_inline_output: int
    work_root: Path
    # Jobs this peer runs at once, over all capabilities. Claiming more than the
    # executors can run only adds leases to renew and tasks to schedule; the
    # rest stay queued here (their placement does not change).
    max_running: int = 32
    # Used when neither the job nor the capability sets a timeout.
    default_timeout_ms: int = 60_000
    # No attempt runs longer (max_job_timeout_s); a capability's timeout may lower it.
    max_timeout_ms: int = 3_600_000
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


def _fetched_module(cap: LocalCapability) -> bool:
    """A module named by an object ref is fetched into the attempt's folder."""
    return "://" in cap.module or cap.module.startswith("sha256:")


def _output_name(path: Path, output_dir: Path) -> str:
    """The output's name in /output ('/'-separated): nested outputs keep their folders,
    so `a/x` and `b/x` are two objects."""
    for root in (output_dir, output_dir.resolve()):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.name


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


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
        self._executors = dict(executors)
        self._fetcher = fetcher
        self._fabric = fabric
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._options.poll_interval_s)
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
        # The attempt's own folder (fetched inputs, a fetched module, spilled
        # stdout), made only when needed, and the guest's /output beside it,
        # which the executor makes.
        workdir = self._options.work_root / f"{job.job_id}-{job.attempt}"
        output_dir = workdir.with_name(workdir.name + ".out")
        began = time.monotonic()
        outcome: Outcome | None = None
        try:
            outcome = await self._attempt(job, cap, workdir, output_dir)
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
                    job, Outcome(state=JobState.FAILED, error="internal error on the peer")
                )
        finally:
            await _remove_leftovers(workdir, output_dir)

    async def _attempt(
        self, job: Job, cap: LocalCapability, workdir: Path, output_dir: Path
    ) -> Outcome:
        input_dir = workdir / "in"
        if job.inputs or _fetched_module(cap):
            await asyncio.to_thread(os.makedirs, input_dir)
        try:
            inputs = []
            with count_remote_bytes() as remote:
                for index, ref in enumerate(job.inputs):
                    dest = input_dir / str(index)
                    await self._fetcher.fetch_to(ref, dest)
                    inputs.append(dest)
            module_path = await self._module(cap, workdir) if cap.kind == "wasm" else None
        except Unavailable:
            raise  # transient: the job is handed back, not failed (see _run)
        except AnvilError as exc:
            return Outcome(state=JobState.FAILED, error=f"fetching inputs failed: {exc}")
        executor = self._executors.get(cap.kind)
        if executor is None:
            return Outcome(state=JobState.FAILED, error=f"no {cap.kind} executor on this peer")
        timeout_s = (
            cap.timeout_ms(
                job.timeout_ms,
                default_ms=self._options.default_timeout_ms,
                ceiling_ms=self._options.max_timeout_ms,
            )
            / 1000
        )
        request = ExecutionRequest(
            job_id=str(job.job_id),
            capability=cap,
            module_path=module_path,
            inputs=tuple(inputs),
            params=dict(job.params),
            output_dir=output_dir,
            timeout_s=timeout_s,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s + UPLOAD_GRACE_S
        try:
            # The executor enforces the job's own deadline; this outer bound is
            # for the executor itself (no worker could be started, an image
            # pull hangs): no job stays RUNNING here for ever with a live lease.
            async with asyncio.timeout(timeout_s + EXECUTOR_GRACE_S):
                result = await executor.execute(request)
        except TimeoutError:
            return Outcome(
                state=JobState.TIMED_OUT,
                error=f"the {cap.kind} executor on this peer did not finish the job within "
                f"{timeout_s + EXECUTOR_GRACE_S:g} s (job timeout {timeout_s:g} s)",
            )
        finally:
            entry = self._running.get(job.job_id)
            self._free_slot(entry if entry and entry.job.attempt == job.attempt else None, cap)
        try:
            async with asyncio.timeout_at(max(deadline, loop.time())):
                return await self._persist(
                    job, result, workdir, output_dir, bytes_fetched_remote=remote[0]
                )
        except TimeoutError:
            return Outcome(
                state=JobState.TIMED_OUT,
                error=f"storing the job's outputs did not finish within its timeout of "
                f"{timeout_s:g} s",
                exit_code=result.exit_code,
                bytes_fetched_remote=remote[0],
            )

    async def _module(self, cap: LocalCapability, workdir: Path) -> Path:
        if _fetched_module(cap):
            ref = cap.module
            if cap.module_sha256 and "sha256=" not in ref and not ref.startswith("sha256:"):
                ref += ("&" if "?" in ref else "?") + f"sha256={cap.module_sha256}"
            dest = workdir / "module.wasm"
            await self._fetcher.fetch_to(ref, dest)
            return dest
        # A missing local module fails the run with the executor's own clear error;
        # checking here would cost a thread hop per job.
        return Path(cap.module)

    async def _persist(
        self,
        job: Job,
        result: ExecutionOutcome,
        workdir: Path,
        output_dir: Path,
        *,
        bytes_fetched_remote: int,
    ) -> Outcome:
        """Store large stdout and /output files as objects; small stdout stays inline.

        Objects go to the HRW owner of their key, like every object in the fabric.
        Nothing of an attempt that did not succeed is stored: its stdout is kept
        inline up to max_inline_output, its files are dropped with its folder.
        """
        refs: list[str] = []
        prefix = f"{job.job_id}/{job.attempt}"
        output: bytes | None = result.stdout
        if result.state is not JobState.SUCCEEDED:
            output = result.stdout[-self._options.max_inline_output :] or None
            files = []
        else:
            files = [
                (path, f"{prefix}/output/{_output_name(path, output_dir)}")
                for path in result.output_files
            ]
            if len(result.stdout) > self._options.max_inline_output:
                spilled = workdir / "stdout"
                await asyncio.to_thread(_write_new, spilled, result.stdout)
                files.insert(0, (spilled, f"{prefix}/stdout"))
                output = None
        for path, key in files:
            info = await self._fabric.put_file(path, bucket=RESULTS_BUCKET, key=key)
            refs.append(f"anvil://{RESULTS_BUCKET}/{quote(key)}?sha256={info.sha256}")
        return Outcome(
            state=result.state,
            output=output,
            output_refs=tuple(refs),
            error=result.error,
            exit_code=result.exit_code,
            bytes_fetched_remote=bytes_fetched_remote,
        )

    async def _finish(self, job: Job, outcome: Outcome) -> None:
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
