"""A pool of sandbox worker processes, driven from asyncio without blocking the loop.

Each worker runs one guest at a time. A guest past its wall-clock deadline —
even one blocked inside a WASI call, where epochs cannot reach it — has its
worker killed; a fresh worker takes its place in the background. Jobs go to an
idle worker that already holds their module in memory when there is one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon import metrics
from daemon.exceptions import AnvilError, Unavailable
from daemon.executors import result as results
from daemon.executors.result import ExecutionResult
from daemon.executors.wasm import protocol
from daemon.executors.wasm.engine import EngineSettings
from daemon.executors.wasm.guest_run import GuestRun
from daemon.executors.wasm.module_cache import load_or_create_secret

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolSettings:
    """How many workers, where the disk cache lives, and the pool's own time bounds."""

    workers: int = 2
    cache_dir: Path | None = None  # on-disk module cache; None = memory only
    # Each worker stages inputs in its own folder under here; None = the system temp.
    scratch_dir: Path | None = None
    memory_cache_entries: int = 64  # per worker
    memory_cache_bytes: int = 512 << 20  # per worker
    max_module_bytes: int = 64 << 20
    compile_timeout_s: float = 60.0  # load + compile one module
    kill_grace_s: float = 0.5  # after the guest's deadline, before the hard kill
    start_timeout_s: float = 30.0  # a new worker's handshake
    engine: EngineSettings = field(default_factory=EngineSettings)


class _WorkerLost(Exception):
    """The worker died before the guest started (e.g. killed while idle)."""


class _Worker:
    """One worker process and the pipe protocol to it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        if proc.stdin is None or proc.stdout is None:
            raise ValueError("a worker needs pipes on stdin and stdout")
        self.proc = proc
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self.cached: frozenset[str] = frozenset()
        self.scratch: Path | None = None  # its own folder, reported in `ready`

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, data: bytes) -> None:
        self._stdin.write(data)
        await self._stdin.drain()

    async def receive(self) -> tuple[dict[str, Any], list[bytes]]:
        head = protocol.parse_head(await self._stdout.readexactly(await self._length()))
        blobs = [await self._stdout.readexactly(await self._length()) for _ in range(head["blobs"])]
        return head, blobs

    async def _length(self) -> int:
        return protocol.frame_length(await self._stdout.readexactly(protocol.HEADER.size))

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        self._stdin.close()

    async def stop(self, timeout_s: float) -> None:
        """End of input asks the worker to exit; kill it if it does not."""
        if self.proc.returncode is None:
            self._stdin.close()
        try:
            async with asyncio.timeout(timeout_s):
                await self.proc.wait()
        except TimeoutError:
            pass
        await self.kill()
        await self.remove_scratch()

    async def remove_scratch(self) -> None:
        """What a killed worker left staged (one that exits cleanly removes its own)."""
        if self.scratch is not None:
            await asyncio.to_thread(shutil.rmtree, self.scratch, True)

    def exit_status(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exited with status {code}"


class WorkerPool:
    """`await start()`, then `await run(request)` from any number of tasks; `await close()`."""

    def __init__(self, settings: PoolSettings | None = None) -> None:
        self.settings = settings or PoolSettings()
        if self.settings.workers < 1:
            raise ValueError("a pool needs at least one worker")
        self._secret: bytes | None = None
        self._workers: set[_Worker] = set()
        self._idle: list[_Worker] = []
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._background: set[asyncio.Task[None]] = set()
        # Module path -> the digest a worker last found for it: runs that name no
        # digest still go to a worker holding their module.
        self._digests: dict[Path, str] = {}
        self._closed = False
        self.replaced = 0  # workers killed and replaced since start

    async def start(self) -> None:
        """Start every worker. Raises Unavailable when one cannot start, with its reason
        (e.g. it may not bound /output in its own mount namespace)."""
        if self.settings.cache_dir is not None:
            self._secret = await asyncio.to_thread(load_or_create_secret, self.settings.cache_dir)
        spawned = await asyncio.gather(
            *(self._spawn() for _ in range(self.settings.workers)), return_exceptions=True
        )
        started = [w for w in spawned if isinstance(w, _Worker)]
        self._workers.update(started)
        self._idle.extend(started)
        failures = [e for e in spawned if isinstance(e, BaseException)]
        if failures:
            await self.close()
            # A worker's own refusal (e.g. no mount namespace) is one line already.
            reason = str(failures[0]) if isinstance(failures[0], AnvilError) else repr(failures[0])
            raise Unavailable(f"cannot start a WASM worker: {reason}") from failures[0]

    async def close(self) -> None:
        """Stop every worker (a running guest is killed). Later runs raise Unavailable."""
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        workers, self._workers, self._idle = list(self._workers), set(), []
        await asyncio.gather(*(w.stop(timeout_s=2.0) for w in workers))

    async def __aenter__(self) -> WorkerPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and metrics)."""
        return sorted(w.pid for w in self._workers)

    def idle_pids(self) -> list[int]:
        """Process ids of the workers waiting for a run, in the order runs take them
        (a run whose module one of them holds takes that one first)."""
        return [w.pid for w in self._idle]

    def busy_pids(self) -> list[int]:
        """Process ids of the live workers that hold a run (from its start to its
        result; it may still be loading its module)."""
        idle = set(self._idle)
        return sorted(w.pid for w in self._workers if w not in idle)

    def pids_holding(self, digest: str) -> list[int]:
        """Process ids of the live workers that hold module `digest` (sha256 hex)
        compiled in memory, as they last reported it."""
        return sorted(w.pid for w in self._workers if digest in w.cached)

    async def run(self, request: GuestRun) -> ExecutionResult:
        """Run one guest on an idle worker; wait for one if all are busy.

        Returns the typed result (a guest past its deadline: TIMED_OUT, its worker
        replaced). Raises Unavailable when the pool is closed, and the worker's
        AnvilError for a bad request (DigestMismatch, InvalidArgument). Cancelling
        the call kills the guest.
        """
        retries = 1  # a worker lost before the guest started: safe to retry elsewhere
        while True:
            worker = await self._acquire(
                request.digest or self._digests.get(request.module_path, "")
            )
            keep = False
            try:
                keep, outcome = await self._run_on(worker, request)
            except _WorkerLost as lost:
                if retries:
                    retries -= 1
                    continue
                outcome = results.crashed(str(lost))
            except protocol.ProtocolError as exc:
                outcome = results.crashed(f"worker {worker.pid} broke the protocol: {exc}")
            finally:
                if keep:
                    self._release(worker)
                else:
                    await self._retire(worker)
            if isinstance(outcome, AnvilError):
                raise outcome
            return outcome

    async def _run_on(
        self, worker: _Worker, request: GuestRun
    ) -> tuple[bool, ExecutionResult | AnvilError]:
        """(keep the worker?, the result or the error the worker reported)."""
        limits = request.limits
        started = False
        try:
            await worker.send(protocol.message("run", **protocol.request_fields(request)))
            try:
                async with asyncio.timeout(self.settings.compile_timeout_s):
                    head, blobs = await worker.receive()
            except TimeoutError:
                return False, results.invalid_module(
                    f"loading and compiling took longer than {self.settings.compile_timeout_s:g} s"
                )
            if head["type"] == "started":
                started = True
                metrics.module_cache_lookup(head.get("cache"))
                began = time.perf_counter()
                try:
                    async with asyncio.timeout(limits.timeout_s + self.settings.kill_grace_s):
                        head, blobs = await worker.receive()
                except TimeoutError:
                    return False, results.timed_out(limits.timeout_s, killed=True).with_capture(
                        stdout=b"",
                        stderr=b"",
                        duration_s=time.perf_counter() - began,
                        fuel_consumed=None,
                    )
        except (asyncio.IncompleteReadError, ConnectionError):
            await worker.kill()
            lost = f"worker {worker.pid} {worker.exit_status()}"
            if not started:
                raise _WorkerLost(lost) from None
            return False, results.crashed(f"{lost} while the guest ran")
        if head["type"] == "error":
            return True, protocol.error_from(head)
        if head["type"] == "abandoned" and len(blobs) == 2:
            # Its guest crossed a limit inside a host call; the worker exits.
            await worker.kill()
            return False, protocol.result_from(head, blobs[0], blobs[1]).with_outputs(())
        if head["type"] != "result" or len(blobs) != 2:
            raise protocol.ProtocolError(f"unexpected {head['type']!r} message")
        worker.cached = frozenset(str(d) for d in head.get("cached", ()))
        if request.digest is None and isinstance(head.get("digest"), str):
            if len(self._digests) >= _MAX_REMEMBERED_DIGESTS:
                self._digests.clear()
            self._digests[request.module_path] = head["digest"]
        return True, protocol.result_from(head, blobs[0], blobs[1])

    # --- idle workers and waiters (single-threaded: no lock needed) ----------

    async def _acquire(self, digest: str) -> _Worker:
        while True:
            if self._closed:
                raise Unavailable("the WASM worker pool is closed")
            for dead in [w for w in self._idle if w.proc.returncode is not None]:
                self._idle.remove(dead)
                await self._retire(dead)
            if self._idle:
                for i, worker in enumerate(self._idle):
                    if digest in worker.cached:
                        return self._idle.pop(i)
                return self._idle.pop(0)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the wake-up on to the next waiter
                raise

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, worker: _Worker) -> None:
        if worker in self._idle or worker not in self._workers:
            return
        self._idle.append(worker)
        self._wake_one()

    async def _retire(self, worker: _Worker) -> None:
        """Kill a worker whose state we no longer trust; replace it in the background."""
        self._workers.discard(worker)
        await worker.kill()
        await worker.remove_scratch()
        if not self._closed:
            task = asyncio.create_task(self._replace(), name="wasm-worker-replace")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _replace(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                worker = await self._spawn()
            except (
                OSError,
                TimeoutError,
                asyncio.IncompleteReadError,
                protocol.ProtocolError,
                AnvilError,
            ):
                log.exception("cannot start a replacement WASM worker; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closed:
                await worker.kill()
                return
            self._workers.add(worker)
            self.replaced += 1
            self._release(worker)
            return

    async def _spawn(self) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon.executors.wasm.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=worker_environment(os.environ),
        )
        worker = _Worker(proc)
        s = self.settings
        try:
            await worker.send(
                protocol.message(
                    "hello",
                    cache_dir=None if s.cache_dir is None else str(s.cache_dir),
                    scratch_dir=None if s.scratch_dir is None else str(s.scratch_dir),
                    cache_secret=None if self._secret is None else self._secret.hex(),
                    engine=asdict(s.engine),
                    memory_cache_entries=s.memory_cache_entries,
                    memory_cache_bytes=s.memory_cache_bytes,
                    max_module_bytes=s.max_module_bytes,
                )
            )
            async with asyncio.timeout(s.start_timeout_s):
                head, _ = await worker.receive()
            if head["type"] == "error":
                raise protocol.error_from(head)  # it cannot run guests here, and says why
            if head["type"] != "ready":
                raise protocol.ProtocolError(f"expected ready, got {head['type']!r}")
            worker.scratch = Path(str(head["scratch_dir"]))
        except BaseException:
            await worker.kill()
            raise
        return worker


_MAX_REMEMBERED_DIGESTS = 1024

_KEPT_ENVIRONMENT = frozenset(
    {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "LD_LIBRARY_PATH"}
)


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What a worker process inherits: enough to start Python, none of the daemon's secrets."""
    return {k: v for k, v in environ.items() if k in _KEPT_ENVIRONMENT or k.startswith("PYTHON")}
