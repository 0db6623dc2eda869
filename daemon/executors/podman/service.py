"""A private `podman system service` on a socket in a folder: for tests, CI and benchmarks.

Production uses systemd's `podman.socket` instead (daemon/executors/podman/executor.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import podman
from podman.errors import DockerException

from daemon.exceptions import Unavailable


class PodmanService:
    """`with PodmanService(folder) as svc: PodmanExecutor(svc.socket)`.

    `containers_conf` is passed as CONTAINERS_CONF (default: the caller's
    environment, else Podman's own files).
    """

    def __init__(
        self,
        directory: Path,
        *,
        containers_conf: Path | None = None,
        private_storage: bool = False,
    ) -> None:
        self.directory = directory
        # Images and containers in `directory` instead of the host's storage.
        self.private_storage = private_storage
        self._runroot: Path | None = None
        self.socket = directory / "podman.sock"
        self.log_path = directory / "podman-service.log"
        self.containers_conf = containers_conf
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> Path:
        """Start the service and wait until it answers; return the socket path.

        Raises Unavailable when podman is not installed or does not come up
        (its log is in the message).
        """
        binary = shutil.which("podman")
        if binary is None:
            raise Unavailable("podman is not installed (run .ci/install-podman.sh)")
        self.directory.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.containers_conf is not None:
            env["CONTAINERS_CONF"] = str(self.containers_conf)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    *self._storage_flags(),
                    "system",
                    "service",
                    "--time=0",
                    f"unix://{self.socket}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # conmon leaves an empty "oom" file in its working directory when a
                # container hits its memory limit (cgroup v1): keep it in ours.
                cwd=self.directory,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        with podman.PodmanClient(base_url=f"http+unix://{self.socket}", timeout=5) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    break
                if self.socket.exists():
                    try:
                        if client.ping():
                            return self.socket
                    except (DockerException, OSError):
                        pass  # not up yet
                time.sleep(0.05)
        self.stop()
        raise Unavailable(f"podman system service did not start:\n{self.log()[-4000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _storage_flags(self) -> list[str]:
        if not self.private_storage:
            return []
        if self._runroot is None:
            # Podman refuses a runroot path of 50 characters or more.
            self._runroot = Path(tempfile.mkdtemp(prefix="anvil-podrun-"))
        # vfs: plain folders, no overlay mount left behind to stop its removal.
        return [
            f"--root={self.directory / 'storage'}",
            f"--runroot={self._runroot}",
            "--storage-driver=vfs",
        ]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the service (containers it started are not its children and keep running)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.socket.unlink(missing_ok=True)
        if self._runroot is not None:
            shutil.rmtree(self._runroot, ignore_errors=True)
            self._runroot = None

    def __enter__(self) -> PodmanService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
