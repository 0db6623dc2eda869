"""Print the cost of one trivial job in a Podman container vs the same job as a WASM guest.

    python benchmarks/podman_bench.py            # full run (~10 s)
    python benchmarks/podman_bench.py --quick    # fewer repeats, for a smoke run

Both jobs print "ok" and exit 0, measured end to end through the executors the
daemon uses, in the same run:

- WASM: `WasmExecutor.run` of a trivial WASI command (one worker process,
  memory-cache hit after the first run): digest, staging, pipe round trip,
  output collection.
- Podman: `PodmanExecutor.run` of `echo ok` in the example busybox image,
  against a private `podman system service`: image check, create, inspect
  (sandbox verification), start, kernel check (/proc), exec, exit, read of
  /output, remove. Beside it, the `podman run` CLI with the same hardening
  flags, for reference (it has no pause process, exec or /output read).

Goal: the WASM executor >= 100x faster than a container per job. Figures are
medians with [min-max]; ratios divide medians. Needs Podman
(.ci/install-podman.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from wasm_bench import Stats, measure, measure_async, trivial_module

from daemon.executors.podman.executor import PodmanExecutor
from daemon.executors.podman.sandbox import SECCOMP_PROFILE
from daemon.executors.podman.service import PodmanService
from daemon.executors.result import RunEnd
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.pool import PoolSettings

REPO = Path(__file__).resolve().parent.parent
CONTAINERS = REPO / "guest_modules" / "containers"


class Outputs:
    """Fresh empty output folders, one per run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._n = 0

    def __call__(self) -> Path:
        self._n += 1
        path = self.root / f"out-{self._n}"
        path.mkdir()
        return path


async def wasm_job(root: Path, outputs: Outputs, repeat: int) -> Stats:
    module = root / "ok.wasm"
    module.write_bytes(trivial_module())
    digest = hashlib.sha256(module.read_bytes()).hexdigest()
    async with WasmExecutor(PoolSettings(workers=1)) as ex:

        async def once() -> None:
            result = await ex.run(module, digest=digest, output_dir=outputs())
            assert result.outcome is RunEnd.OK and result.stdout == b"ok\n", result

        await once()
        return await measure_async(once, repeat)


def build_image(root: Path) -> tuple[Path, str]:
    archive = root / "busybox.oci.tar"
    script = CONTAINERS / "build_busybox_image.py"
    built = subprocess.run(
        [sys.executable, str(script), "--output", str(archive), "--no-load"],
        capture_output=True,
        text=True,
        check=True,
    )
    return archive, built.stdout.strip()


async def podman_job(socket: Path, archive: Path, outputs: Outputs, repeat: int) -> Stats:
    async with PodmanExecutor(socket, owner="anvil-bench") as ex:
        (image_id,) = await ex.load_image(archive)

        async def once() -> None:
            result = await ex.run(
                f"sha256:{image_id}", command=["echo", "ok"], output_dir=outputs()
            )
            assert result.outcome is RunEnd.OK and result.stdout == b"ok\n", result

        await once()
        return await measure_async(once, repeat)


async def load_image(socket: Path, archive: Path) -> None:
    async with PodmanExecutor(socket, owner="anvil-bench") as ex:
        await ex.load_image(archive)


def podman_run_command(socket: Path, image: str) -> list[str]:
    """`podman run` of `echo ok` with the executor's hardening, as flags."""
    podman = shutil.which("podman") or "podman"
    return [
        podman,
        "--url",
        f"unix://{socket}",
        "run",
        "--rm",
        "--network=none",
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        f"--security-opt=seccomp={SECCOMP_PROFILE}",
        "--uidmap=0:524288:65536",
        "--gidmap=0:524288:65536",
        "--user=65534:65534",
        "--read-only-tmpfs=false",
        "--tmpfs=/tmp:size=64m,nosuid,nodev,noexec",
        "--tmpfs=/output:size=1g,nosuid,nodev,noexec",
        "--pids-limit=64",
        "--memory=256m",
        "--memory-swap=256m",
        image,
        "echo",
        "ok",
    ]


def podman_cli(socket: Path, image: str, repeat: int) -> Stats:
    cmd = podman_run_command(socket, image)

    def once() -> None:
        assert subprocess.run(cmd, check=True, capture_output=True).stdout == b"ok\n"

    once()
    return measure(once, repeat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    wasm_repeat, podman_repeat = (30, 5) if args.quick else (200, 20)

    with tempfile.TemporaryDirectory(prefix="podman-bench-") as tmp:
        root = Path(tmp)
        outputs = Outputs(root)
        archive, image = build_image(root)
        with PodmanService(root / "service", containers_conf=CONTAINERS / "containers.conf") as svc:
            wasm = asyncio.run(wasm_job(root, outputs, wasm_repeat))
            container = asyncio.run(podman_job(svc.socket, archive, outputs, podman_repeat))
            cli = podman_cli(svc.socket, image, podman_repeat)

    print("per job, trivial guest that prints 'ok' (end to end through the executor):")
    print(f"  WASM   (WasmExecutor, worker pool)      {wasm.text()}")
    print(f"  Podman (PodmanExecutor, REST API)       {container.text()}")
    print(f"  Podman (`podman run --rm`, same flags)  {cli.text()}")
    print(
        f"  Podman executor / WASM executor  {container.median / wasm.median:8.0f}x (goal >= 100x)"
    )
    print(f"  podman run / WASM executor       {cli.median / wasm.median:8.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
