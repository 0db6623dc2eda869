"""One guest run as the daemon asks for it, carried out inside a worker process.

The daemon names host files; the worker stages them at /input, gives the guest
its bounded /output, runs it in its Sandbox and copies what a successful guest
left there to the run's output folder. Every file system call of a run happens
here, in the worker — off the daemon's event loop and out of its GIL — so a job
without inputs or outputs costs the daemon none at all.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon.exceptions import InvalidArgument
from daemon.executors import result as results
from daemon.executors import staging
from daemon.executors.result import ExecutionResult, OutputFile, RunEnd
from daemon.executors.wasm.bounded_output import OutputMount, OutputWatcher
from daemon.executors.wasm.limits import Limits
from daemon.executors.wasm.module_cache import Level
from daemon.executors.wasm.mount_ns import PrivateMounts
from daemon.executors.wasm.sandbox import RunRequest, Sandbox

# Module digests remembered by file identity; one entry per module path in use.
_MAX_REMEMBERED_DIGESTS = 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class GuestRun:
    """One run: the module, the guest's argv and env, host files in, a folder out."""

    digest: str | None  # sha256 hex of the module; None: the worker computes it
    module_path: Path
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    inputs: tuple[Path, ...]  # staged read-only at /input/<i>; input 0 is also stdin
    # Where the files the guest leaves in /output end up: made only when there
    # are some (so most runs touch nothing here); an existing folder must be empty.
    output_dir: Path
    limits: Limits


class GuestRunner:
    """Carries out GuestRuns, one at a time, with one Sandbox and one scratch folder.

    The guest's /output is always the worker's own `output` folder, a tmpfs
    bounded by the run's limits (bounded_output.py: memory-backed, at most
    output_bytes plus a little per worker, copied to disk only for successful
    runs). After each run it is empty again; most runs leave nothing, and cost
    one statvfs for it.
    """

    def __init__(
        self,
        sandbox: Sandbox,
        scratch_dir: Path,
        mounts: PrivateMounts,
        *,
        abandon: Callable[[ExecutionResult], None],
    ) -> None:
        """Mount the bounded /output. Raises Unavailable when the kernel refuses.

        `abandon(result)` reports a run that must end while its guest is
        blocked in a host call, then ends this process (the daemon replaces it).
        """
        self.sandbox = sandbox
        self.scratch_dir = scratch_dir
        self._abandon = abandon
        # /input of every run without inputs: preopened read-only, so it stays empty.
        self._empty = scratch_dir / "empty"
        self._staged = scratch_dir / "input"
        self._digests: dict[Path, tuple[tuple[int, ...], str]] = {}
        self._empty.mkdir(parents=True, exist_ok=True)
        self._output = OutputMount(mounts, scratch_dir / "output", Limits())
        self._watcher = OutputWatcher(self._output)

    def close(self) -> None:
        self._watcher.close()
        self._output.close()

    def run(
        self, run: GuestRun, *, on_started: Callable[[Level], None] | None = None
    ) -> tuple[str, ExecutionResult]:
        """(the module's digest, the result with its outputs attached).

        A run that crosses an /output limit ends OUTPUT_TOO_LARGE, whatever its
        guest did then; only a successful run has outputs. Guest failures come
        back as results; raises InvalidArgument (bad module path, inputs or
        output folder), DigestMismatch, Unavailable (the tmpfs cannot be remounted).
        """
        digest = run.digest or self.digest_of(run.module_path)
        given = _check_output_dir(run.output_dir)
        self._output.prepare(run.limits)
        input_dir, stdin = self._stage(run.inputs)
        try:
            with self._watcher.watching(
                run.limits, interrupt=self.sandbox.interrupt, abandon=self._abandon
            ) as watch:
                result = self.sandbox.run(
                    RunRequest(
                        digest=digest,
                        module_path=run.module_path,
                        argv=run.argv,
                        env=run.env,
                        stdin_path=stdin,
                        input_dir=input_dir,
                        output_dir=self._output.path,
                        limits=run.limits,
                    ),
                    on_started=on_started,
                )
            # What the watcher saw, else what the guest left: one statvfs when nothing.
            found = None if watch.exceeded else self._output.find(run.limits)
            over = watch.exceeded if found is None else found.over
            outputs: tuple[OutputFile, ...] = ()
            if over is not None:
                if result.outcome is not RunEnd.OUTPUT_TOO_LARGE:
                    result = over.with_capture(
                        stdout=result.stdout,
                        stderr=result.stderr,
                        duration_s=result.duration_s,
                        fuel_consumed=result.fuel_consumed,
                    )
            elif result.succeeded and found is not None:
                outputs = self._output.copy_out(found.files, run.output_dir, given=given)
        finally:
            self._output.empty()
            if run.inputs:
                shutil.rmtree(self._staged, ignore_errors=True)
        return digest, result.with_outputs(outputs)

    def digest_of(self, module: Path) -> str:
        """The module's sha256, re-read only when the file changed (by its identity)."""
        try:
            info = os.stat(module)
        except OSError as exc:
            raise InvalidArgument(f"cannot read module {module}: {exc.strerror}") from exc
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        known = self._digests.get(module)
        if known is not None and known[0] == identity:
            return known[1]
        digest = staging.sha256_file(module)
        if len(self._digests) >= _MAX_REMEMBERED_DIGESTS:
            self._digests.clear()
        self._digests[module] = (identity, digest)
        return digest

    def _stage(self, inputs: tuple[Path, ...]) -> tuple[Path, Path | None]:
        """(the /input folder, the stdin file)."""
        if not inputs:
            return self._empty, None
        shutil.rmtree(self._staged, ignore_errors=True)  # left by a run that crashed
        self._staged.mkdir()
        staged = staging.stage_inputs(inputs, self._staged)
        return self._staged, staged[0]


def _check_output_dir(output_dir: Path) -> bool:
    """True when `output_dir` exists (and is empty); else its parent is made ready.

    Raises InvalidArgument before the guest runs, not after.
    """
    if os.path.lexists(output_dir):
        staging.check_empty_dir(output_dir)
        return True
    if not output_dir.parent.is_dir():
        try:
            output_dir.parent.mkdir(parents=True)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot create output folder {output_dir}: {exc.strerror}"
            ) from exc
    return False


def with_outputs(
    result: ExecutionResult, outputs: tuple[OutputFile, ...], limits: Limits
) -> ExecutionResult:
    """Attach the outputs to a successful run; one with too much in them fails, and a
    failed run has none (nothing of it may be uploaded)."""
    if not result.succeeded:
        return result.with_outputs(())
    if len(outputs) > limits.output_files:
        failed = results.output_files_exceeded(limits.output_files)
    elif sum(f.size for f in outputs) > limits.output_bytes:
        failed = results.output_bytes_exceeded(limits.output_bytes)
    else:
        return result.with_outputs(outputs)
    return failed.with_capture(
        stdout=result.stdout,
        stderr=result.stderr,
        duration_s=result.duration_s,
        fuel_consumed=result.fuel_consumed,
    )
