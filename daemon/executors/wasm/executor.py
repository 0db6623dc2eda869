"""The WASM executor the daemon calls: a job's run, handed to the worker pool.

Guest ABI (WASI preview 1 command, guest_modules/GUIDE.md): argv = [program,
"--key=value", ...] and `ANVIL_PARAM_<KEY>` per param; input i readable (never
writable) at /input/<i>, input 0 also as stdin; a fresh writable /output whose
regular files become the outputs of a successful run; stdout and stderr
captured up to the caps. /output is memory in the worker, bounded by the kernel
to the run's output_bytes and output_files while the guest runs
(bounded_output.py); a run that crosses either ends OUTPUT_TOO_LARGE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from daemon.exceptions import InvalidArgument
from daemon.executors import result as results
from daemon.executors import staging
from daemon.executors.result import ExecutionResult
from daemon.executors.wasm.guest_run import GuestRun, with_outputs
from daemon.executors.wasm.limits import Limits
from daemon.executors.wasm.pool import PoolSettings, WorkerPool

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class WasmExecutor:
    """`async with WasmExecutor(settings) as ex: await ex.run(...)` — safe from many tasks."""

    def __init__(
        self,
        settings: PoolSettings | None = None,
        *,
        scratch_dir: Path | None = None,
        default_limits: Limits | None = None,
    ) -> None:
        settings = settings or PoolSettings()
        if scratch_dir is not None:
            settings = dataclasses.replace(settings, scratch_dir=scratch_dir)
        self.pool = WorkerPool(settings)
        self.default_limits = default_limits or Limits()
        self._scratch_dir = scratch_dir

    async def start(self) -> None:
        """Start the worker processes. Raises Unavailable when they cannot start.

        What the workers of a crashed predecessor left in `scratch_dir` is removed.
        """
        if self._scratch_dir is not None:
            await asyncio.to_thread(_clear_scratch, self._scratch_dir)
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> WasmExecutor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run(
        self,
        module: Path,
        *,
        output_dir: Path,
        digest: str | None = None,
        inputs: Sequence[Path] = (),
        params: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        limits: Limits | None = None,
        program: str = "guest",
    ) -> ExecutionResult:
        """Run the WASI command in `module` once, under `limits` (default: the executor's).

        `digest` is the module's sha256 hex (computed by the worker when not
        given; checked against the bytes whenever the file is read). The files
        a successful guest leaves in /output end up in `output_dir`, made only
        when there are some; an existing folder must be empty. Afterwards it
        holds the outputs and nothing else; after a failed run, nothing.

        Guest failures come back as a result, never raised. Raises InvalidArgument
        (bad params, inputs, folder), DigestMismatch, Unavailable (closed).
        Cancelling the call kills the guest.
        """
        pairs = staging.param_pairs(params)
        if "\0" in program:
            raise InvalidArgument("program name contains a NUL byte")
        if digest is not None and not _SHA256_HEX.fullmatch(digest):
            raise InvalidArgument(f"module digest {digest!r} is not a sha256 hex string")
        limits = limits or self.default_limits
        # No file work here: the worker stages, runs and collects (guest_run.py).
        result = await self.pool.run(
            GuestRun(
                digest=digest,
                module_path=module,
                argv=staging.guest_argv(program, pairs),
                env=staging.guest_env(pairs),
                inputs=tuple(inputs),
                output_dir=output_dir,
                limits=limits,
            )
        )
        if not result.outputs:
            return result
        # A worker runs guest code: what it says it left is checked here, on
        # the daemon's side, before any of it is read and stored.
        outputs = await asyncio.to_thread(checked_outputs, result.outputs, output_dir)
        checked = with_outputs(result, outputs, limits)
        if not checked.succeeded:  # the worker let through more than the limits
            await asyncio.to_thread(staging.empty_dir, output_dir)
        return checked


def checked_outputs(
    reported: tuple[results.OutputFile, ...], output_dir: Path
) -> tuple[results.OutputFile, ...]:
    """The reported outputs, each a regular file inside `output_dir` (links are not
    followed), with sizes measured here; anything else is refused."""
    root = output_dir.resolve()
    checked = []
    for output in reported:
        path = root / output.name
        if path.parent.resolve() != path.parent or not path.is_relative_to(root):
            raise InvalidArgument(f"the worker reported an output outside /output: {output.name!r}")
        try:
            info = path.lstat()
        except OSError as exc:
            raise InvalidArgument(f"output {output.name!r} is missing: {exc.strerror}") from exc
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"output {output.name!r} is not a regular file")
        checked.append(results.OutputFile(name=output.name, path=path, size=info.st_size))
    return tuple(checked)


def _clear_scratch(scratch_dir: Path) -> None:
    """Remove what workers of a crashed predecessor left staged."""
    scratch_dir.mkdir(parents=True, exist_ok=True)
    for stale in scratch_dir.iterdir():
        shutil.rmtree(stale, ignore_errors=True)
