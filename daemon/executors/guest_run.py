"""One guest run as the daemon asks for it, carried out inside a worker process.

The daemon names host files; the worker stages them at /input, makes /output,
runs the guest in its Sandbox and lists what the guest left. Every file system
call of a run happens here, in the worker — off the daemon's event loop and out
of its GIL — so a job without inputs or outputs costs the daemon none at all.
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
from daemon.executors.limits import Limits
from daemon.executors.module_cache import Level
from daemon.executors.result import ExecutionResult, OutputFile
from daemon.executors.sandbox import RunRequest, Sandbox

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

    The guest's /output is always the worker's own `output` folder; when the
    guest leaves files there, the folder is renamed to the run's output folder
    (or its entries moved into an existing one). Most runs leave nothing, and
    the same empty folder serves the next run: no mkdir or rmdir per run.
    """

    def __init__(self, sandbox: Sandbox, scratch_dir: Path) -> None:
        self.sandbox = sandbox
        self.scratch_dir = scratch_dir
        # /input of every run without inputs: preopened read-only, so it stays empty.
        self._empty = scratch_dir / "empty"
        self._staged = scratch_dir / "input"
        self._output = scratch_dir / "output"
        self._output_ready = False  # exists and is empty
        self._digests: dict[Path, tuple[tuple[int, ...], str]] = {}
        self._empty.mkdir(parents=True, exist_ok=True)

    def run(
        self, run: GuestRun, *, on_started: Callable[[Level], None] | None = None
    ) -> tuple[str, ExecutionResult]:
        """(the module's digest, the result with its outputs attached).

        Guest failures come back as results; raises InvalidArgument (bad module
        path, inputs or output folder) and DigestMismatch.
        """
        digest = run.digest or self.digest_of(run.module_path)
        given = _check_output_dir(run.output_dir)
        self._prepare_output()
        input_dir, stdin = self._stage(run.inputs)
        try:
            result = self.sandbox.run(
                RunRequest(
                    digest=digest,
                    module_path=run.module_path,
                    argv=run.argv,
                    env=run.env,
                    stdin_path=stdin,
                    input_dir=input_dir,
                    output_dir=self._output,
                    limits=run.limits,
                ),
                on_started=on_started,
            )
        except BaseException:
            self._output_ready = False  # whatever is in there, the next run starts afresh
            raise
        finally:
            if run.inputs:
                shutil.rmtree(self._staged, ignore_errors=True)
        outputs = self._hand_over_output(run.output_dir, given=given)
        return digest, with_outputs(result, outputs, run.limits)

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

    def _prepare_output(self) -> None:
        if not self._output_ready:
            shutil.rmtree(self._output, ignore_errors=True)  # left by a failed hand-over
            self._output.mkdir()
            self._output_ready = True

    def _hand_over_output(self, output_dir: Path, *, given: bool) -> tuple[OutputFile, ...]:
        """Move what the guest left to `output_dir` and list the outputs there."""
        with os.scandir(self._output) as entries:
            left = [entry.name for entry in entries]
        if not left:
            return ()  # the folder stays, empty, for the next run
        self._output_ready = False
        try:
            if given:
                for name in left:
                    shutil.move(self._output / name, output_dir / name)
                self._output_ready = True  # emptied
            else:
                shutil.move(self._output, output_dir)  # a rename on one file system
        except OSError as exc:
            raise InvalidArgument(f"cannot move outputs to {output_dir}: {exc}") from exc
        outputs = staging.collect_outputs(output_dir)
        if not outputs and not given:
            shutil.rmtree(output_dir, ignore_errors=True)  # only empty folders or links
        return outputs

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
