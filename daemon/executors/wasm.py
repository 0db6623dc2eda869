"""The WASM executor the daemon calls: stage a job's files, run it in the worker pool, collect.

Guest ABI (WASI preview 1 command, guest_modules/GUIDE.md): argv = [program,
"--key=value", ...] and `ANVIL_PARAM_<KEY>` per param; input i readable (never
writable) at /input/<i>, input 0 also as stdin; a fresh writable /output whose
regular files become the outputs; stdout and stderr captured up to the caps.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from daemon.exceptions import InvalidArgument
from daemon.executors import result as results
from daemon.executors import staging
from daemon.executors.limits import Limits
from daemon.executors.result import ExecutionResult
from daemon.executors.sandbox import RunRequest
from daemon.executors.worker_pool import PoolSettings, WorkerPool

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_INPUT_PREFIX = "wasm-in-"


class WasmExecutor:
    """`async with WasmExecutor(settings) as ex: await ex.run(...)` — safe from many tasks."""

    def __init__(
        self,
        settings: PoolSettings | None = None,
        *,
        scratch_dir: Path | None = None,
        default_limits: Limits | None = None,
    ) -> None:
        self.pool = WorkerPool(settings)
        self.default_limits = default_limits or Limits()
        self._scratch_dir = scratch_dir

    async def start(self) -> None:
        """Start the worker processes. Raises Unavailable when they cannot start.

        Input folders a crashed predecessor left in `scratch_dir` are removed.
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

        `digest` is the module's sha256 hex (computed when not given; checked
        against the bytes whenever the file is read). `output_dir` must be an
        existing empty folder; afterwards it holds the outputs and nothing else.

        Guest failures come back as a result, never raised. Raises InvalidArgument
        (bad params, inputs, folder), DigestMismatch, Unavailable (closed).
        Cancelling the call kills the guest.
        """
        limits = limits or self.default_limits
        pairs = staging.param_pairs(params)
        if "\0" in program:
            raise InvalidArgument("program name contains a NUL byte")
        if digest is not None and not _SHA256_HEX.fullmatch(digest):
            raise InvalidArgument(f"module digest {digest!r} is not a sha256 hex string")
        # Blocking file work in two thread hops: before the run and after it.
        module_digest, input_dir, staged = await asyncio.to_thread(
            _prepare, module, digest, output_dir, inputs, self._scratch_dir
        )
        try:
            request = RunRequest(
                digest=module_digest,
                module_path=module,
                argv=staging.guest_argv(program, pairs),
                env=staging.guest_env(pairs),
                stdin_path=staged[0] if staged else None,
                input_dir=input_dir,
                output_dir=output_dir,
                limits=limits,
            )
            result = await self.pool.run(request)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, input_dir, True)
            raise
        outputs = await asyncio.to_thread(_finish, input_dir, output_dir)
        return with_outputs(result, outputs, limits)


def _clear_scratch(scratch_dir: Path) -> None:
    scratch_dir.mkdir(parents=True, exist_ok=True)
    for stale in scratch_dir.glob(f"{_INPUT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _prepare(
    module: Path,
    digest: str | None,
    output_dir: Path,
    inputs: Sequence[Path],
    scratch_dir: Path | None,
) -> tuple[str, Path, list[Path]]:
    """(module digest, a fresh /input folder, the staged inputs)."""
    if digest is None:
        digest = staging.sha256_file(module)
    staging.check_empty_dir(output_dir)
    input_dir = Path(tempfile.mkdtemp(prefix=_INPUT_PREFIX, dir=scratch_dir))
    try:
        return digest, input_dir, staging.stage_inputs(inputs, input_dir)
    except BaseException:
        shutil.rmtree(input_dir, ignore_errors=True)
        raise


def _finish(input_dir: Path, output_dir: Path) -> tuple[results.OutputFile, ...]:
    shutil.rmtree(input_dir, ignore_errors=True)
    return staging.collect_outputs(output_dir)


def with_outputs(
    result: ExecutionResult, outputs: tuple[results.OutputFile, ...], limits: Limits
) -> ExecutionResult:
    """Attach the outputs; a successful run that left too much in /output fails."""
    if result.succeeded:
        total = sum(f.size for f in outputs)
        if len(outputs) > limits.output_files:
            failed = results.output_too_large(
                f"{len(outputs)} files left in /output, over the limit of {limits.output_files}"
            )
        elif total > limits.output_bytes:
            failed = results.output_too_large(
                f"{results.size_text(total)} left in /output, over the limit of "
                f"{results.size_text(limits.output_bytes)}"
            )
        else:
            return result.with_outputs(outputs)
        result = failed.with_capture(
            stdout=result.stdout,
            stderr=result.stderr,
            duration_s=result.duration_s,
            fuel_consumed=result.fuel_consumed,
        )
    return result.with_outputs(outputs)
