"""The job runner's view of the WASM executor: `ExecutionRequest` in, `ExecutionOutcome` out."""

from __future__ import annotations

import os
import re

from daemon.config import Settings
from daemon.exceptions import AnvilError
from daemon.execution import ExecutionOutcome, ExecutionRequest
from daemon.executors.limits import Limits
from daemon.executors.result import ExecutionResult, Outcome
from daemon.executors.wasm import WasmExecutor
from daemon.executors.worker_pool import PoolSettings
from daemon.jobstate import JobState


class WasmJobExecutor:
    """Runs `wasm` capabilities in a pool of sandbox workers: one per core (at most 8),
    plus one that no single capability may take (daemon/slots.py), so a capability
    whose guests sleep still leaves every core's worth to itself and one to the others."""

    def __init__(self, executor: WasmExecutor) -> None:
        self.executor = executor

    @classmethod
    async def create(cls, settings: Settings) -> WasmJobExecutor:
        """Start the workers; the module cache lives in the data directory.

        Every run's /output is bounded by max_output_bytes and max_output_files.
        Raises Unavailable when the workers cannot start (e.g. no mount namespace).
        """
        executor = WasmExecutor(
            PoolSettings(
                workers=settings.wasm_workers or default_workers(),
                cache_dir=settings.data_dir / "wasm-cache",
            ),
            scratch_dir=settings.data_dir / "wasm-scratch",
            default_limits=default_limits(settings),
        )
        await executor.start()
        return cls(executor)

    @property
    def capacity(self) -> int:
        """One guest per worker process."""
        return self.executor.pool.settings.workers

    async def close(self) -> None:
        await self.executor.close()

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Run one attempt under the capability's limits. Cancelling the call kills the guest."""
        cap = request.capability
        if request.module_path is None:
            return ExecutionOutcome(state=JobState.FAILED, error="no module for a wasm job")
        try:
            limits = job_limits(
                self.executor.default_limits,
                fuel=cap.limits.fuel,
                memory_mib=cap.limits.memory_mib,
                timeout_s=request.timeout_s,
            )
            result = await self.executor.run(
                request.module_path,
                digest=cap.module_sha256 or None,
                output_dir=request.output_dir,
                inputs=request.inputs,
                params=request.params,
                limits=limits,
                program=cap.name,
            )
        except AnvilError as exc:
            return ExecutionOutcome(state=JobState.FAILED, error=str(exc))
        return outcome_of(result)


def default_limits(settings: Settings) -> Limits:
    """The limits of every run on this peer before a capability's and a job's own."""
    return Limits(output_bytes=settings.max_output_bytes, output_files=settings.max_output_files)


def default_workers() -> int:
    """One worker per core (at most 8), and one kept for capabilities that share them."""
    return max(1, min(8, os.cpu_count() or 1)) + 1


def job_limits(defaults: Limits, *, fuel: int, memory_mib: int, timeout_s: float) -> Limits:
    """The defaults with the capability's and the job's values (0 = keep the default)."""
    return defaults.with_overrides(
        fuel=fuel or None,
        memory_mib=memory_mib or None,
        timeout_s=timeout_s if timeout_s > 0 else None,
    )


def outcome_of(result: ExecutionResult) -> ExecutionOutcome:
    """Map an executor result to a job state and the error a submitter sees: the one
    place that words a guest's end.

    A guest that exits non-zero explains itself on stderr (guest_modules/GUIDE.md):
    that text is the error. Any other failure is explained by the sandbox, followed
    by what the guest last said. The guest's words keep their last
    MAX_GUEST_MESSAGE characters, control characters escaped (a NUL cannot be
    stored, and a terminal escape must not reach an operator's screen).
    """
    error = ""
    if result.succeeded:
        state = JobState.SUCCEEDED
    else:
        state = JobState.TIMED_OUT if result.outcome is Outcome.TIMED_OUT else JobState.FAILED
        said = guest_words(result.stderr)
        if result.outcome is Outcome.NONZERO_EXIT and said:
            error = said
        elif said:
            error = f"{result.message}: {said}"
        else:
            error = result.message
    return ExecutionOutcome(
        state=state,
        stdout=result.stdout,
        stderr=result.stderr,
        exit_code=result.exit_code,
        error=error,
        # Nothing of a failed attempt is uploaded (a failed result has no outputs anyway).
        output_files=tuple(f.path for f in result.outputs) if result.succeeded else (),
    )


MAX_GUEST_MESSAGE = 2000
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def guest_words(stderr: bytes) -> str:
    """The tail of what a guest wrote to stderr, fit to show and store."""
    text = stderr.decode("utf-8", "replace").strip()[-MAX_GUEST_MESSAGE:]
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
