"""The job runner's view of the Podman executor: `ExecutionRequest` in, `ExecutionResult` out."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict

from daemon.capability_config import LocalCapability
from daemon.config import Settings
from daemon.exceptions import AnvilError, Unavailable
from daemon.executors import result as results
from daemon.executors.podman.executor import (
    DEFAULT_SOCKET,
    ContainerLimits,
    ImageNotPresent,
    PodmanExecutor,
)
from daemon.executors.result import ExecutionRequest, ExecutionResult
from daemon.storage.fetcher import Fetcher

log = logging.getLogger(__name__)


class PodmanJobExecutor:
    """Runs `podman` capabilities as hardened containers through the Podman service."""

    def __init__(self, executor: PodmanExecutor, *, fetcher: Fetcher | None = None) -> None:
        self.executor = executor
        self._fetcher = fetcher
        # One `podman load` at a time per archive; jobs that found the image
        # missing meanwhile wait for it and then find the image.
        self._loading: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @classmethod
    async def create(
        cls, settings: Settings, *, fetcher: Fetcher | None = None
    ) -> PodmanJobExecutor:
        """Connect to `settings.podman_socket` (default the rootful systemd socket).

        /output of every run is bounded by `max_output_bytes` and
        `max_output_files`. Raises Unavailable when Podman does not answer,
        FailedPrecondition when the sandbox cannot be built (no catatonit): a
        peer that offers container capabilities must not start without it.
        """
        executor = PodmanExecutor(
            settings.podman_socket or DEFAULT_SOCKET,
            owner=owner_label(settings),
            scratch_dir=settings.data_dir / "podman-scratch",
            default_limits=ContainerLimits(
                output_bytes=settings.max_output_bytes,
                output_files=settings.max_output_files,
            ),
            gpu_devices=settings.gpu_devices,
        )
        await executor.start()
        return cls(executor, fetcher=fetcher)

    @property
    def capacity(self) -> None:
        """Containers are bounded by the runner's max_running_jobs, not here."""
        return None

    async def close(self) -> None:
        await self.executor.close()

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
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
            try:
                result = await self._run(request, limits)
            except ImageNotPresent:
                if not cap.image_archive:
                    raise
                await self._load(cap)
                result = await self._run(request, limits)
        except Unavailable:
            raise  # transient (Podman or storage unreachable): the runner hands the job back
        except AnvilError as exc:
            return results.refused(str(exc))
        return result

    async def _run(self, request: ExecutionRequest, limits: ContainerLimits) -> ExecutionResult:
        cap = request.capability
        return await self.executor.run(
            cap.image,
            command=cap.command,
            output_dir=request.output_dir,
            inputs=request.inputs,
            params=request.params,
            limits=limits,
            gpu="gpu" in cap.resources,
            job_id=request.job_id,
        )

    async def _load(self, cap: LocalCapability) -> None:
        """`podman load` the capability's image archive, fetched like any object."""
        if self._fetcher is None:
            raise ImageNotPresent(
                f"image {cap.image} is missing and no fetcher can get its archive"
            )
        async with self._loading[cap.image_archive]:
            try:
                await self.executor.resolve_image(cap.image)
                return  # another job loaded it while this one waited
            except ImageNotPresent:
                pass
            log.info("loading image %s from %s", cap.image, cap.image_archive)
            try:
                async with self._fetcher.open(cap.image_archive) as archive:
                    await self.executor.load_image(archive.path)
            except Unavailable:
                raise
            except AnvilError as exc:
                raise ImageNotPresent(
                    f"image {cap.image} is missing and its archive {cap.image_archive} "
                    f"cannot be loaded: {exc}"
                ) from exc
            try:
                await self.executor.resolve_image(cap.image)
            except ImageNotPresent:
                raise ImageNotPresent(
                    f"archive {cap.image_archive} does not hold image {cap.image}"
                ) from None


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
