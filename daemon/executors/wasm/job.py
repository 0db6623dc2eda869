"""The job runner's view of the WASM executor: `ExecutionRequest` in, `ExecutionResult` out."""

from __future__ import annotations

import os

from daemon.config import Settings
from daemon.exceptions import AnvilError
from daemon.executors import result as results
from daemon.executors.result import ExecutionRequest, ExecutionResult
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.limits import Limits
from daemon.executors.wasm.pool import PoolSettings


class WasmJobExecutor:
    """Runs `wasm` capabilities in a pool of sandbox workers: one per core (at most 8),
    plus one that no single capability may take (daemon/jobs/slots.py), so a capability
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

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        """Run one attempt under the capability's limits. Cancelling the call kills the guest."""
        cap = request.capability
        if request.module_path is None:
            return results.refused("no module for a wasm job")
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
            return results.refused(str(exc))
        return result


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
