"""The job runner's view of the Podman executor: `ExecutionRequest` in, `ExecutionOutcome` out."""

from __future__ import annotations

import hashlib

from daemon.config import Settings
from daemon.exceptions import AnvilError
from daemon.execution import ExecutionOutcome, ExecutionRequest
from daemon.executors.job_executor import outcome_of
from daemon.executors.podman import DEFAULT_SOCKET, ContainerLimits, PodmanExecutor
from daemon.jobstate import JobState


class PodmanJobExecutor:
    """Runs `podman` capabilities as hardened containers through the Podman service."""

    def __init__(self, executor: PodmanExecutor) -> None:
        self.executor = executor

    @classmethod
    async def create(cls, settings: Settings) -> PodmanJobExecutor:
        """Connect to `settings.podman_socket` (default the rootful systemd socket).

        Raises Unavailable when Podman does not answer: a peer that offers
        container capabilities must not start without it.
        """
        executor = PodmanExecutor(
            settings.podman_socket or DEFAULT_SOCKET,
            owner=owner_label(settings),
            scratch_dir=settings.data_dir / "podman-scratch",
        )
        await executor.start()
        return cls(executor)

    async def close(self) -> None:
        await self.executor.close()

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Run one attempt under the capability's limits. Cancelling the call kills it."""
        cap = request.capability
        try:
            limits = job_limits(
                self.executor.default_limits,
                timeout_s=request.timeout_s,
                memory_mib=cap.limits.memory_mib,
                cpu_millis=cap.limits.cpu_millis,
                pids=cap.limits.pids,
            )
            result = await self.executor.run(
                cap.image,
                command=cap.command,
                output_dir=request.output_dir,
                inputs=request.inputs,
                params=request.params,
                limits=limits,
                gpu="gpu" in cap.resources,
                job_id=request.job_id,
            )
        except AnvilError as exc:
            return ExecutionOutcome(state=JobState.FAILED, error=str(exc))
        return outcome_of(result)


def job_limits(
    defaults: ContainerLimits, *, timeout_s: float, memory_mib: int, cpu_millis: int, pids: int
) -> ContainerLimits:
    """The defaults with the capability's and the job's values (0 = keep the default)."""
    return defaults.with_overrides(
        timeout_s=timeout_s if timeout_s > 0 else None,
        memory_mib=memory_mib or None,
        cpu_millis=cpu_millis or None,
        pids=pids or None,
    )


def owner_label(settings: Settings) -> str:
    """Which peer's containers these are: peers sharing one Podman never touch each other's."""
    digest = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()
    return f"peer-{digest[:16]}"
