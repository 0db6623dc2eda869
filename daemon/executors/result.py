"""What the runner hands an executor, and what one sandboxed run ended with.

Shared by every executor (wasmtime, Podman): `ExecutionRequest` in,
`ExecutionResult` out. `ending` is the one place that turns a run's end (its
`RunEnd`, message and stderr) into the job state and the error a user reads.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from daemon.capability_config import LocalCapability
from daemon.jobs.state import JobState


class RunEnd(enum.Enum):
    """Why a run ended. Only `OK` is a success."""

    OK = "ok"
    NONZERO_EXIT = "nonzero_exit"
    TRAPPED = "trapped"
    OUT_OF_FUEL = "out_of_fuel"
    TIMED_OUT = "timed_out"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_TOO_LARGE = "output_too_large"
    INVALID_MODULE = "invalid_module"
    # The sandbox itself failed (worker process died unexpectedly): not the guest's doing.
    CRASHED = "crashed"
    # The executor would not run it (bad request, image missing, limits not applied).
    REFUSED = "refused"


@dataclass(frozen=True, kw_only=True, slots=True)
class OutputFile:
    """A regular file the guest left in its output folder."""

    name: str  # relative to the output folder, '/'-separated
    path: Path  # where it is on the host
    size: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ExecutionResult:
    """One run's end: outcome, a message a guest author can act on, and what it produced."""

    outcome: RunEnd
    message: str
    exit_code: int | None = None
    trap_code: str | None = None  # e.g. "stack_overflow", "unreachable" (TRAPPED only)
    stdout: bytes = b""
    stderr: bytes = b""
    outputs: tuple[OutputFile, ...] = field(default_factory=tuple)
    duration_s: float = 0.0
    fuel_consumed: int | None = None

    @property
    def succeeded(self) -> bool:
        return self.outcome is RunEnd.OK

    def with_capture(
        self,
        *,
        stdout: bytes,
        stderr: bytes,
        duration_s: float,
        fuel_consumed: int | None,
    ) -> ExecutionResult:
        """This result with what the run printed and how long and how much fuel it took."""
        return replace(
            self,
            stdout=stdout,
            stderr=stderr,
            duration_s=duration_s,
            fuel_consumed=fuel_consumed,
        )

    def with_outputs(self, outputs: tuple[OutputFile, ...]) -> ExecutionResult:
        return replace(self, outputs=outputs)


def ok() -> ExecutionResult:
    return ExecutionResult(outcome=RunEnd.OK, message="ok", exit_code=0)


def nonzero_exit(code: int) -> ExecutionResult:
    return ExecutionResult(
        outcome=RunEnd.NONZERO_EXIT,
        message=f"guest exited with code {code}",
        exit_code=code,
    )


def trapped(trap_code: str | None, reason: str) -> ExecutionResult:
    label = trap_code or "host error"
    return ExecutionResult(
        outcome=RunEnd.TRAPPED,
        message=f"guest trapped ({label}): {reason}",
        trap_code=trap_code,
    )


def out_of_fuel(fuel: int) -> ExecutionResult:
    return ExecutionResult(
        outcome=RunEnd.OUT_OF_FUEL,
        message=f"guest ran out of fuel (limit {fuel:,} units)",
    )


def timed_out(timeout_s: float, *, killed: bool = False, how: str | None = None) -> ExecutionResult:
    """A run stopped at its deadline. `how` says how it was stopped; without it, the WASM
    wording: `killed` (blocked in a host call) or interrupted."""
    if how is None:
        how = (
            "killed while blocked in a host call (sleep, stdin read, ...)"
            if killed
            else "interrupted at its wall-clock deadline"
        )
    return ExecutionResult(
        outcome=RunEnd.TIMED_OUT,
        message=f"guest timed out after {timeout_s:g} s: {how}",
    )


def memory_limit(limit_bytes: int, detail: str) -> ExecutionResult:
    return ExecutionResult(
        outcome=RunEnd.MEMORY_LIMIT,
        message=f"guest hit its memory limit of {_mib(limit_bytes)}: {detail}",
    )


def output_too_large(detail: str) -> ExecutionResult:
    return ExecutionResult(
        outcome=RunEnd.OUTPUT_TOO_LARGE,
        message=f"guest output too large: {detail}; the job fails rather than keep a "
        "truncated result",
    )


def stream_too_large(stream: str, cap_bytes: int) -> ExecutionResult:
    return output_too_large(f"more than {size_text(cap_bytes)} written to {stream}")


def output_bytes_exceeded(limit_bytes: int) -> ExecutionResult:
    return output_too_large(
        f"more than {size_text(limit_bytes)} written to /output (max_output_bytes)"
    )


def output_files_exceeded(limit_files: int) -> ExecutionResult:
    return output_too_large(f"more than {limit_files} files in /output (max_output_files)")


def output_names_exceeded(limit_files: int, folders: int) -> ExecutionResult:
    """Files within the limit, but more folders and links than the allowance on top."""
    return output_too_large(
        f"more than {limit_files} files, folders and links in /output (max_output_files, "
        f"plus {folders} folders or links)"
    )


def invalid_module(reason: str) -> ExecutionResult:
    return ExecutionResult(
        outcome=RunEnd.INVALID_MODULE,
        message=f"invalid module: {reason}",
    )


def refused(reason: str) -> ExecutionResult:
    return ExecutionResult(outcome=RunEnd.REFUSED, message=reason)


def crashed(reason: str) -> ExecutionResult:
    return ExecutionResult(
        outcome=RunEnd.CRASHED,
        message=f"sandbox failed: {reason}",
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def size_text(n: int) -> str:
    """A size as people write limits: exact in GiB, MiB or KiB when it is, else in bytes
    (or approximately in MiB, from 1 MiB up)."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    if n >= 1 << 20:
        return _mib(n)
    return f"{n} bytes"


@dataclass(frozen=True, kw_only=True, slots=True)
class ExecutionRequest:
    """One attempt of a job, as the runner hands it to an executor."""

    job_id: str
    capability: LocalCapability
    # WASM: the module file (fetched and verified); Podman: unused.
    module_path: Path | None
    # Fetched, verified input files in the job's order (input 0 is also stdin).
    inputs: tuple[Path, ...]
    params: dict[str, str]
    # Empty, writable: every file the guest leaves here becomes an output object.
    output_dir: Path
    timeout_s: float


class JobExecutor(Protocol):
    @property
    def capacity(self) -> int | None:
        """Guests it runs at once (None: no bound of its own); the runner claims no more."""
        ...

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        """Run one attempt under its limits; a refusal is a REFUSED result.

        Raises Unavailable only for what is worth handing the job back for
        (Podman or storage unreachable). Cancelling the call kills the guest.
        """
        ...

    async def close(self) -> None:
        """Stop the executor's workers (the node calls it last on shutdown)."""
        ...


MAX_GUEST_MESSAGE = 2000
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def ending(result: ExecutionResult) -> tuple[JobState, str]:
    """The job state and the error a submitter sees for a run's end: the one place
    that words it.

    A guest that exits non-zero explains itself on stderr (guest_modules/GUIDE.md):
    that text is the error. Any other failure is explained by the sandbox, followed
    by what the guest last said.
    """
    if result.succeeded:
        return JobState.SUCCEEDED, ""
    state = JobState.TIMED_OUT if result.outcome is RunEnd.TIMED_OUT else JobState.FAILED
    said = guest_words(result.stderr)
    if result.outcome is RunEnd.NONZERO_EXIT and said:
        return state, said
    return state, f"{result.message}: {said}" if said else result.message


def guest_words(stderr: bytes) -> str:
    """The tail of what a guest wrote to stderr, fit to show and store: its last
    MAX_GUEST_MESSAGE characters, control characters escaped (a NUL cannot be
    stored, and a terminal escape must not reach an operator's screen)."""
    text = stderr.decode("utf-8", "replace").strip()[-MAX_GUEST_MESSAGE:]
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
