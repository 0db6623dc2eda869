"""Podman fixtures shared by the container executor's tests: one private service, one image.

Nothing skips: without Podman these fail (CI installs it with .ci/install-podman.sh).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import podman
import pytest

from daemon.executors.podman.executor import LABEL_OWNER, PodmanExecutor
from daemon.executors.podman.service import PodmanService
from tests.integration.containers import OWNER, TEXT

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_DIR = REPO / "guest_modules" / "containers"
BUILD_SCRIPT = CONTAINERS_DIR / "build_busybox_image.py"


@pytest.fixture(scope="session")
def podman_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private Podman service; afterwards, no container of ours may be left."""
    service = PodmanService(
        tmp_path_factory.mktemp("podman"), containers_conf=CONTAINERS_DIR / "containers.conf"
    )
    socket_path = service.start()
    try:
        yield socket_path
        with podman.PodmanClient(base_url=f"http+unix://{socket_path}") as client:
            left = client.containers.list(all=True, filters={"label": LABEL_OWNER})
            names = [c.name for c in left]
            for container in left:
                container.remove(force=True)
        assert names == [], f"containers left behind: {names}"
    finally:
        service.stop()


@pytest.fixture(scope="session")
async def busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The example image as an OCI archive, built by the script; (archive, `sha256:<id>`)."""
    archive = tmp_path_factory.mktemp("image") / "busybox.oci.tar"
    built = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(BUILD_SCRIPT), "--output", str(archive), "--no-load"],
        capture_output=True,
        text=True,
        check=True,
    )
    image_id = built.stdout.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image_id), built.stdout
    return archive, image_id


@pytest.fixture(scope="session")
async def busybox_image(podman_socket: Path, busybox_archive: tuple[Path, str]) -> str:
    """The example image, loaded through the API. Its id, `sha256:…`."""
    archive, image_id = busybox_archive
    async with PodmanExecutor(podman_socket, owner="anvil-tests") as ex:
        assert await ex.load_image(archive) == (image_id.removeprefix("sha256:"),)
    return image_id


@pytest.fixture
async def executor(podman_socket: Path, tmp_path: Path) -> AsyncIterator[PodmanExecutor]:
    """An executor on the test Podman service; it must leave no container behind."""
    async with PodmanExecutor(podman_socket, owner=OWNER, scratch_dir=tmp_path / "scratch") as ex:
        yield ex
        assert await ex.containers() == []


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path
