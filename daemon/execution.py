"""What the runner hands an executor, and what it gets back. Executor-neutral."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from daemon.capability_config import LocalCapability
from daemon.jobstate import JobState


@dataclass(frozen=True, kw_only=True, slots=True)
class ExecutionRequest:
    job_id: str
    capability: LocalCapability
    # WASM: the module file (fetched and verified); Podman: unused.
    module_path: Path | None
    # Fetched, verified input files in the job's order (input 1 is also stdin).
    inputs: tuple[Path, ...]
    params: dict[str, str]
    # Empty, writable: every file the guest leaves here becomes an output object.
    output_dir: Path
    timeout_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class ExecutionOutcome:
    state: JobState  # SUCCEEDED, FAILED or TIMED_OUT
    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int | None = None
    # Why it failed, in words an operator or guest author can act on.
    error: str = ""
    output_files: tuple[Path, ...] = field(default_factory=tuple)


class JobExecutor(Protocol):
    @property
    def capacity(self) -> int | None:
        """Guests it runs at once (None: no bound of its own); the runner claims no more."""
        ...

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Run one attempt under its limits. Cancelling the call kills the guest."""
        ...

    async def close(self) -> None:
        """Stop the executor's workers (the node calls it last on shutdown)."""
        ...
