"""One attempt of a claimed job: fetch its inputs and module, run it, store what it made.

The runner (jobs/runner.py) decides when an attempt starts and what becomes of
its result; this module only carries it out, with files in the attempt's own
folder. Storing the outputs counts against the job's timeout, and nothing of
an attempt that did not succeed is stored.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from daemon.access import RESULTS_BUCKET
from daemon.capability_config import LocalCapability
from daemon.exceptions import AnvilError, Unavailable
from daemon.executors.result import ExecutionRequest, ExecutionResult, JobExecutor, ending
from daemon.jobs.state import JobState
from daemon.modules import is_object_ref
from daemon.registry.models import AttemptResult, Job
from daemon.storage.fabric import Fabric, count_remote_bytes
from daemon.storage.fetcher import Fetcher
from daemon.storage.refs import parse_ref

# Beyond the job's timeout: compiling a module (bounded at 60 s by the WASM
# executor) or starting a container, plus scheduling slack.
EXECUTOR_GRACE_S = 90.0
# Storing a successful attempt's outputs counts against its timeout, with this
# much slack for the last few writes of a guest that used all of its time.
UPLOAD_GRACE_S = 2.0


@dataclass(frozen=True, kw_only=True, slots=True)
class AttemptOptions:
    max_inline_output: int
    # Used when neither the job nor the capability sets a timeout.
    default_timeout_ms: int = 60_000
    # No attempt runs longer (max_job_timeout_s); a capability's timeout may lower it.
    max_timeout_ms: int = 3_600_000


@dataclass(frozen=True, kw_only=True, slots=True)
class Workspace:
    """The attempt's folders: its own (fetched inputs and module, spilled stdout),
    made only when needed, and the guest's /output beside it, made by the executor."""

    root: Path
    output: Path

    @classmethod
    def of(cls, work_root: Path, job: Job) -> Workspace:
        root = work_root / f"{job.job_id}-{job.attempt}"
        return cls(root=root, output=root.with_name(root.name + ".out"))


class AttemptRunner:
    """Carries out attempts; safe to use from many tasks at once."""

    def __init__(
        self,
        *,
        executors: Mapping[str, JobExecutor],
        fetcher: Fetcher,
        fabric: Fabric,
        options: AttemptOptions,
    ) -> None:
        self._executors = dict(executors)
        self._fetcher = fetcher
        self._fabric = fabric
        self._options = options

    async def run(
        self,
        job: Job,
        cap: LocalCapability,
        space: Workspace,
        *,
        guest_done: Callable[[], None],
    ) -> AttemptResult:
        """The attempt's result; `guest_done()` is called as soon as the guest is over
        (its executor slot may go to the next job while the outputs are stored).

        Raises Unavailable (storage or a peer unreachable: hand the job back).
        """
        input_dir = space.root / "in"
        if job.inputs or is_object_ref(cap.module):
            await asyncio.to_thread(os.makedirs, input_dir)
        try:
            inputs = []
            with count_remote_bytes() as remote:
                for index, ref in enumerate(job.inputs):
                    dest = input_dir / str(index)
                    await self._fetcher.fetch_to(ref, dest)
                    inputs.append(dest)
            module_path = await self._module(cap, space.root) if cap.kind == "wasm" else None
        except Unavailable:
            guest_done()
            raise  # transient: the job is handed back, not failed
        except AnvilError as exc:
            guest_done()
            return AttemptResult(state=JobState.FAILED, error=f"fetching inputs failed: {exc}")
        executor = self._executors.get(cap.kind)
        if executor is None:
            guest_done()
            return AttemptResult(
                state=JobState.FAILED, error=f"no {cap.kind} executor on this peer"
            )
        timeout_s = (
            cap.timeout_ms(
                job.timeout_ms,
                default_ms=self._options.default_timeout_ms,
                ceiling_ms=self._options.max_timeout_ms,
            )
            / 1000
        )
        request = ExecutionRequest(
            job_id=str(job.job_id),
            capability=cap,
            module_path=module_path,
            inputs=tuple(inputs),
            params=dict(job.params),
            output_dir=space.output,
            timeout_s=timeout_s,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s + UPLOAD_GRACE_S
        try:
            # The executor enforces the job's own deadline; this outer bound is
            # for the executor itself (no worker could be started, an image
            # pull hangs): no job stays RUNNING here for ever with a live lease.
            async with asyncio.timeout(timeout_s + EXECUTOR_GRACE_S):
                result = await executor.execute(request)
        except TimeoutError:
            return AttemptResult(
                state=JobState.TIMED_OUT,
                error=f"the {cap.kind} executor on this peer did not finish the job within "
                f"{timeout_s + EXECUTOR_GRACE_S:g} s (job timeout {timeout_s:g} s)",
            )
        finally:
            guest_done()
        try:
            async with asyncio.timeout_at(max(deadline, loop.time())):
                return await self._store(job, result, space, bytes_fetched_remote=remote[0])
        except TimeoutError:
            return AttemptResult(
                state=JobState.TIMED_OUT,
                error=f"storing the job's outputs did not finish within its timeout of "
                f"{timeout_s:g} s",
                exit_code=result.exit_code,
                bytes_fetched_remote=remote[0],
            )

    async def _module(self, cap: LocalCapability, workdir: Path) -> Path:
        if is_object_ref(cap.module):
            ref = parse_ref(cap.module)
            if ref.sha256 is None and cap.module_sha256:
                ref = ref.with_sha256(cap.module_sha256)
            dest = workdir / "module.wasm"
            await self._fetcher.fetch_to(ref, dest)
            return dest
        # A missing local module fails the run with the executor's own clear error;
        # checking here would cost a thread hop per job.
        return Path(cap.module)

    async def _store(
        self, job: Job, result: ExecutionResult, space: Workspace, *, bytes_fetched_remote: int
    ) -> AttemptResult:
        """Store large stdout and /output files as objects; small stdout stays inline.

        Objects go to the HRW owner of their key, like every object in the fabric.
        Nothing of an attempt that did not succeed is stored: its stdout is kept
        inline up to max_inline_output, its files are dropped with its folder.
        """
        state, error = ending(result)
        refs: list[str] = []
        prefix = f"{job.job_id}/{job.attempt}"
        output: bytes | None = result.stdout
        files: list[tuple[Path, str]] = []
        if state is not JobState.SUCCEEDED:
            output = result.stdout[-self._options.max_inline_output :] or None
        else:
            files = [(f.path, f"{prefix}/output/{f.name}") for f in result.outputs]
            if len(result.stdout) > self._options.max_inline_output:
                spilled = space.root / "stdout"
                await asyncio.to_thread(_write_new, spilled, result.stdout)
                files.insert(0, (spilled, f"{prefix}/stdout"))
                output = None
        for path, key in files:
            info = await self._fabric.put_file(path, bucket=RESULTS_BUCKET, key=key)
            refs.append(f"anvil://{RESULTS_BUCKET}/{quote(key)}?sha256={info.sha256}")
        return AttemptResult(
            state=state,
            output=output,
            output_refs=tuple(refs),
            error=error,
            exit_code=result.exit_code,
            bytes_fetched_remote=bytes_fetched_remote,
        )


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
