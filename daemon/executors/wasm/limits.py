"""Per-run limits of a sandboxed guest, and the arithmetic on them. Pure: no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from daemon.exceptions import InvalidArgument

MIB = 1 << 20
WASM_PAGE = 64 * 1024
# wasm32 linear memory cannot exceed 4 GiB.
MAX_MEMORY_BYTES = 4 << 30
# /output is a tmpfs sized from output_bytes and output_files (bounded_output.py):
# it may hold this many folders and links on top of output_files ...
OUTPUT_FOLDERS = 64
# ... and its size is output_bytes plus at most this much, for the partly used
# last page of each file (the kernel bounds pages, the limit counts bytes).
MAX_OUTPUT_SLACK = 64 * MIB


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """What one run may use. Every field is enforced on every run.

    Build from a capability's defaults, then `with_overrides` from the job.
    """

    fuel: int = 10_000_000_000  # wasm instructions, roughly
    timeout_s: float = 30.0  # wall clock, from the guest's start
    memory_bytes: int = 256 * MIB  # per linear memory (and one memory only)
    tables: int = 2
    table_elements: int = 100_000
    instances: int = 1
    stdout_bytes: int = 1 * MIB
    stderr_bytes: int = 64 * 1024
    output_files: int = 1000  # files left in /output (max_output_files)
    output_bytes: int = 1024 * MIB  # their total size (max_output_bytes)

    def __post_init__(self) -> None:
        for name in (
            "fuel",
            "tables",
            "table_elements",
            "instances",
            "stdout_bytes",
            "stderr_bytes",
            "output_files",
            "output_bytes",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"limit {name} must be an integer >= 0, got {value!r}")
        if self.fuel == 0:
            raise InvalidArgument("limit fuel must be > 0")
        if not (isinstance(self.timeout_s, int | float) and 0 < self.timeout_s < math.inf):
            raise InvalidArgument(f"limit timeout_s must be > 0 seconds, got {self.timeout_s!r}")
        if not WASM_PAGE <= self.memory_bytes <= MAX_MEMORY_BYTES:
            raise InvalidArgument(
                f"limit memory must be between 64 KiB and 4 GiB, got {self.memory_bytes} bytes"
            )

    def with_overrides(
        self,
        *,
        fuel: int | None = None,
        timeout_s: float | None = None,
        memory_mib: float | None = None,
    ) -> Limits:
        """These limits with the job's own values where given (None keeps the default).

        Raises InvalidArgument on a value out of range.
        """
        return replace(
            self,
            fuel=self.fuel if fuel is None else fuel,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            memory_bytes=self.memory_bytes if memory_mib is None else round(memory_mib * MIB),
        )


def epoch_ticks(timeout_s: float, tick_s: float) -> int:
    """Epoch ticks to wait so that a guest gets at least `timeout_s` (and at most one tick more).

    The ticker's phase is unknown when a run starts, so the first tick may come
    at once: one extra tick keeps the deadline from ever being early.
    """
    return math.ceil(timeout_s / tick_s) + 1


def memory_exhausted(memory_bytes: int, limit_bytes: int) -> bool:
    """True when a memory this large is at its limit, give or take one growth step.

    wasmtime-py does not expose `trap_on_grow_failure`, so a refused
    `memory.grow` (it just returns -1) is invisible; a guest that failed with
    its memory within max(64 KiB, 1/16 of the limit) of the limit is taken to
    have failed for want of memory. Allocators grow in small steps, so a real
    out-of-memory guest lands in that margin.
    """
    margin = max(WASM_PAGE, limit_bytes // 16)
    return memory_bytes + margin > limit_bytes


def output_fs_inodes(limits: Limits) -> int:
    """nr_inodes of a run's /output tmpfs: its files, OUTPUT_FOLDERS more, its root, and one
    spare, so that no name left means a name past the allowance was refused.

    tmpfs counts every name against it: files, folders, links, hard links.
    """
    return limits.output_files + OUTPUT_FOLDERS + 2


def output_fs_bytes(limits: Limits, page: int) -> int:
    """size of a run's /output tmpfs, a whole number of `page`s.

    Room for output_bytes of data spread over as many names as the tmpfs
    allows (each may waste most of its last page), and one page more, so that
    a full tmpfs means a write past the limit was refused. Never more than
    output_bytes + MAX_OUTPUT_SLACK: past about 16,000 files the slack is
    capped, and many small files near the byte limit may then fill it first.
    """
    data_pages = -(-limits.output_bytes // page)
    slack_pages = output_fs_inodes(limits) + 1
    ceiling_pages = (limits.output_bytes + MAX_OUTPUT_SLACK) // page
    return min(data_pages + slack_pages, ceiling_pages) * page
