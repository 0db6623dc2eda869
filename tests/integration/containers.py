"""What the Podman tests share: their containers' owner label, a small input, and
a shell script run in a container."""

from __future__ import annotations

import time
from pathlib import Path

from daemon.executors.podman.executor import ContainerLimits, PodmanExecutor
from daemon.executors.result import ExecutionResult

OWNER = "anvil-tests"
TEXT = "the quick brown fox\njumps over the lazy dog\n"  # 9 words


async def sh(
    ex: PodmanExecutor,
    image: str,
    script: str,
    tmp_path: Path,
    *,
    inputs: tuple[Path, ...] = (),
    limits: ContainerLimits | None = None,
    params: dict[str, str] | None = None,
) -> ExecutionResult:
    """Run `sh -c SCRIPT` ($0 is "guest") in `image`, its /output a new folder in tmp_path."""
    return await ex.run(
        image,
        command=["sh", "-c", script, "guest"],
        output_dir=tmp_path / f"out-{time.monotonic_ns()}",
        inputs=inputs,
        params=params or {},
        limits=limits,
        job_id="test",
    )
