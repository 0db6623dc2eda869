"""The Podman executor: capabilities that are not WASM run as hardened containers.

A run: a pause process (catatonit) as the container's PID 1, the capability's
command started beside it through the exec API by anvil-exec, /output and /tmp
size-limited tmpfs mounts read through the archive API, the container removed
on every path. Every hardening setting is checked by inspect (and against the
kernel's view of the pause process) before the command runs. How to set a
peer up for it, and every setting of a run: systemd/podman.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import podman
import requests
import urllib3
from podman.errors import APIError, DockerException, NotFound

from daemon.exceptions import FailedPrecondition, InvalidArgument, Unavailable
from daemon.executors import result as results
from daemon.executors import staging
from daemon.executors.podman import host as podman_host
from daemon.executors.podman import images
from daemon.executors.podman import stream as podman_stream
from daemon.executors.podman.images import ImageNotPresent, check_image_ref, explain
from daemon.executors.podman.output import OutputRead, read_archive
from daemon.executors.podman.sandbox import (
    EXEC_TARGET,
    SECCOMP_PROFILE,
    ContainerLimits,
    UserNamespace,
    container_spec,
    cpu_quota,
    guest_argv,
    limits_not_applied,
)
from daemon.executors.result import ExecutionResult

__all__ = [
    "DEFAULT_SOCKET",
    "LABEL_JOB",
    "LABEL_OWNER",
    "ContainerLimits",
    "ImageNotPresent",
    "PodmanExecutor",
    "UserNamespace",
    "check_image_ref",
    "container_name",
    "container_spec",
    "cpu_quota",
    "limits_not_applied",
    "socket_path",
]

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/podman/podman.sock"
DEFAULT_GPU_DEVICES = ("nvidia.com/gpu=all",)
LABEL_OWNER = "anvil-compute.owner"
LABEL_JOB = "anvil-compute.job"
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")
_TIMEOUT_HOW = "the container was killed at its wall-clock deadline"
_REMOVE_ATTEMPTS = 5
# anvil-exec's status and words when it finds the sandbox is not ours.
_HELPER_FAILED = 125
_HELPER_REFUSED = b"anvil-exec: sandbox:"
T = TypeVar("T")


def socket_path(socket: str | Path) -> Path:
    """The filesystem path of `/path.sock` or `unix:///path.sock`. Raises InvalidArgument."""
    text = str(socket)
    for prefix in ("unix://", "http+unix://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    path = Path(text)
    if not path.is_absolute():
        raise InvalidArgument(f"podman socket {socket!r} must be an absolute path")
    return path


def container_name(job_id: str) -> str:
    """A unique, valid container name that shows which job it runs."""
    safe = _NAME_UNSAFE.sub("-", job_id)[:40] or "run"
    return f"anvil-{safe}-{uuid.uuid4().hex[:8]}"


class PodmanExecutor:
    """`async with PodmanExecutor(socket) as ex: await ex.run(...)` — safe from many tasks.

    The `podman` package is synchronous: its calls run in threads. The guest's
    streams are read on the event loop.
    """

    def __init__(
        self,
        socket: str | Path = DEFAULT_SOCKET,
        *,
        owner: str = "anvil-compute",
        scratch_dir: Path | None = None,
        default_limits: ContainerLimits | None = None,
        gpu_devices: Sequence[str] = DEFAULT_GPU_DEVICES,
        userns: UserNamespace | None = None,
        init_path: Path | None = None,
        exec_helper: Path | None = None,
        seccomp_profile: Path = SECCOMP_PROFILE,
        api_timeout_s: float = 60.0,
    ) -> None:
        self.socket = socket_path(socket)
        self.owner = owner
        self.default_limits = default_limits or ContainerLimits()
        self.gpu_devices = tuple(gpu_devices)
        self.userns = userns or UserNamespace()
        self.seccomp_profile = seccomp_profile
        # Found by start(): the host's catatonit, our anvil-exec for this machine.
        self._wanted = (init_path, exec_helper)
        self.init_path = init_path or podman_host.DEFAULT_INIT_PATHS[-1]
        self.exec_helper = exec_helper or podman_host.EXEC_HELPERS / "anvil-exec"
        self._scratch_dir = scratch_dir
        self._api_timeout_s = api_timeout_s
        self._client: Any = None

    async def start(self) -> None:
        """Connect and check that the service answers and the sandbox's files are here.

        Containers (and input folders in `scratch_dir`) that a crashed
        predecessor with the same owner left behind are removed. Raises
        Unavailable (Podman does not answer), FailedPrecondition (no
        catatonit, anvil-exec or seccomp profile).
        """
        self.init_path = podman_host.find_init(self._wanted[0])
        self.exec_helper = podman_host.find_exec_helper(self._wanted[1])
        if not self.seccomp_profile.is_file():
            raise FailedPrecondition(f"the seccomp profile {self.seccomp_profile} is missing")
        self._client = podman.PodmanClient(
            base_url=f"http+unix://{self.socket}", timeout=self._api_timeout_s
        )
        try:
            if not await self._call(self._client.ping):
                raise Unavailable(f"podman at {self.socket} does not answer its ping")
            if self._scratch_dir is not None:
                await asyncio.to_thread(podman_host.clear_scratch, self._scratch_dir)
            for name in await self.containers():
                log.warning("removing container %s left by an earlier run", name)
                await self._remove(name)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    async def __aenter__(self) -> PodmanExecutor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def client(self) -> Any:
        """The `podman.PodmanClient`. Raises Unavailable before `start` or after `close`."""
        if self._client is None:
            raise Unavailable("the podman executor is not started")
        return self._client

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` in a thread, Podman's errors translated.

        Raises FailedPrecondition (Podman refused), Unavailable (unreachable).
        """
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except APIError as exc:
            raise FailedPrecondition(f"podman refused: {explain(exc)}") from exc
        except (DockerException, OSError) as exc:
            raise Unavailable(f"podman at {self.socket}: {explain(exc)}") from exc

    async def containers(self) -> list[str]:
        """Names of this owner's containers, whatever their state."""
        found = await self._call(
            self.client.containers.list,
            all=True,
            # A string: podman-py turns a list into the filter "['...']", which matches nothing.
            filters={"label": f"{LABEL_OWNER}={self.owner}"},
        )
        return sorted(str(c.name) for c in found)

    async def resolve_image(self, ref: str) -> str:
        """The image id (hex) of `ref`, an image present on this host and pinned by digest.

        Never pulls. Raises InvalidArgument (not pinned), FailedPrecondition
        (not present), Unavailable.
        """
        image_id, _ = await images.find(self.client, ref, where=str(self.socket))
        return image_id

    async def load_image(self, archive: Path) -> tuple[str, ...]:
        """`podman load` an image archive; the ids of the images in it (images.load)."""
        return await images.load(self.client, archive, where=str(self.socket))

    async def run(
        self,
        image: str,
        *,
        output_dir: Path,
        command: Sequence[str] = (),
        inputs: Sequence[Path] = (),
        params: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        limits: ContainerLimits | None = None,
        gpu: bool = False,
        job_id: str = "",
    ) -> ExecutionResult:
        """Run `command` in a fresh container of `image` once, under `limits`.

        `output_dir` is created if missing (and removed again when the run
        leaves nothing in it); an existing one must be empty. Afterwards it
        holds the outputs of a successful run and nothing else; after any
        other result it is empty (removed, if this call made it). `gpu` adds
        the CDI devices. The container is removed on every path.

        Guest failures come back as a result, never raised. Raises
        InvalidArgument (bad image ref, params, inputs, folder, no command),
        FailedPrecondition (image absent, or Podman did not apply the
        sandbox: the command did not run), Unavailable (Podman unreachable,
        outputs not storable). Cancelling the call kills the container.
        """
        limits = limits or self.default_limits
        pairs = staging.param_pairs(params)
        if any("\0" in part for part in command):
            raise InvalidArgument("command contains a NUL byte")
        created, input_dir = await asyncio.to_thread(
            podman_host.prepare, output_dir, inputs, self._scratch_dir
        )
        try:
            image_id, attrs = await images.find(self.client, image, where=str(self.socket))
            config: Mapping[str, Any] = attrs.get("Config") or {}
            argv = guest_argv(config.get("Entrypoint"), config.get("Cmd"), command, pairs)
            spec = container_spec(
                image_id=image_id,
                env=dict(staging.guest_env(pairs)),
                limits=limits,
                userns=self.userns,
                input_dir=input_dir,
                init_path=self.init_path,
                exec_helper=self.exec_helper,
                name=container_name(job_id),
                labels={LABEL_OWNER: self.owner, LABEL_JOB: job_id},
                devices=self.gpu_devices if gpu else (),
                seccomp_profile=self.seccomp_profile,
            )
            result = await self._run_container(spec, argv, limits, output_dir)
        except BaseException:
            await asyncio.shield(
                asyncio.to_thread(podman_host.empty_output_dir, output_dir, created)
            )
            raise
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, input_dir, True))
        if not result.succeeded or (created and not result.outputs):
            await asyncio.to_thread(podman_host.empty_output_dir, output_dir, created)
        return result

    async def _run_container(
        self,
        spec: dict[str, Any],
        argv: list[str],
        limits: ContainerLimits,
        output_dir: Path,
    ) -> ExecutionResult:
        name, client = spec["name"], self.client
        try:
            container_id = str((await self._api("post", "/containers/create", spec))["Id"])
            problems = limits_not_applied(spec, await self._api("get", f"/containers/{name}/json"))
            if problems:
                raise FailedPrecondition(
                    "podman did not apply the sandbox as asked, refusing to run: "
                    + "; ".join(problems)
                )
            try:
                await asyncio.to_thread(
                    lambda: client.api.post(f"/containers/{container_id}/start").raise_for_status()
                )
            except (APIError, requests.HTTPError) as exc:
                # Podman's own refusal at start (e.g. an unresolvable CDI device).
                return results.crashed(f"podman could not start the container: {explain(exc)}")
            except (DockerException, OSError) as exc:
                raise Unavailable(f"podman at {self.socket}: {explain(exc)}") from exc
            attrs = await self._api("get", f"/containers/{container_id}/json")
            state: Mapping[str, Any] = attrs.get("State") or {}
            problems = await asyncio.to_thread(podman_host.confinement, state, limits, self.userns)
            if problems:
                raise FailedPrecondition(
                    "the container is not confined as asked, refusing to run: "
                    + "; ".join(problems)
                )
            cgroup = str(state.get("CgroupPath") or "")
            return await self._exec(
                container_id,
                cgroup=cgroup,
                argv=argv,
                limits=limits,
                output_dir=output_dir,
            )
        finally:
            # Shielded: a cancelled job still gets its container killed and removed.
            await asyncio.shield(self._remove(name, client))

    async def _exec(
        self,
        container_id: str,
        *,
        cgroup: str,
        argv: list[str],
        limits: ContainerLimits,
        output_dir: Path,
    ) -> ExecutionResult:
        """Run the command in the started container and judge how it ended."""
        # No stdin through the API (output is lost when it is left unread):
        # anvil-exec gives the command /input/0 as its stdin.
        body = {
            "Cmd": [EXEC_TARGET, *argv],
            "User": f"{self.userns.uid}:{self.userns.gid}",
            "AttachStdin": False,
            "AttachStdout": True,
            "AttachStderr": True,
            "Tty": False,
        }
        exec_id = str((await self._api("post", f"/containers/{container_id}/exec", body))["Id"])
        stdout, stderr = bytearray(), bytearray()
        writer: asyncio.StreamWriter | None = None
        killed_for: str | None = None
        exit_code: int | None = None
        started = time.monotonic()
        try:
            try:
                async with asyncio.timeout(limits.timeout_s):
                    reader, writer = await podman_stream.open_upgraded(
                        self.socket,
                        f"/exec/{exec_id}/start",
                        {"Detach": False, "Tty": False},
                        timeout_s=self._api_timeout_s,
                    )
                    killed_for = await podman_stream.read_output(
                        reader,
                        stdout,
                        stderr,
                        stdout_cap=limits.stdout_bytes,
                        stderr_cap=limits.stderr_bytes,
                    )
                    if killed_for is None:
                        # The stream ends a moment before Podman records the exit.
                        exit_code = await self._exit_code(exec_id)
            except TimeoutError:
                killed_for = "timeout"
            if killed_for is not None:
                if writer is not None:
                    # Hang up first: conmon blocked writing to an unread stream delays the kill.
                    writer.close()
                await self._kill(container_id)
        finally:
            if writer is not None:
                writer.close()
        duration = time.monotonic() - started
        if exit_code == _HELPER_FAILED and stderr.startswith(_HELPER_REFUSED):
            # anvil-exec found the seccomp profile missing: the command did not run.
            raise FailedPrecondition(
                "the container is not confined as asked, refusing to run: "
                + stderr.decode(errors="replace").strip()
            )
        result = await self._verdict(
            container_id,
            cgroup=cgroup,
            exit_code=exit_code,
            killed_for=killed_for,
            limits=limits,
            output_dir=output_dir,
        )
        return result.with_capture(
            stdout=bytes(stdout), stderr=bytes(stderr), duration_s=duration, fuel_consumed=None
        )

    async def _verdict(
        self,
        container_id: str,
        *,
        cgroup: str,
        exit_code: int | None,
        killed_for: str | None,
        limits: ContainerLimits,
        output_dir: Path,
    ) -> ExecutionResult:
        """How the run ended; the outputs of a successful one read into `output_dir`."""
        if killed_for == "timeout":
            return results.timed_out(limits.timeout_s, how=_TIMEOUT_HOW)
        if killed_for == "stdout":
            return results.stream_too_large("stdout", limits.stdout_bytes)
        if killed_for == "stderr":
            return results.stream_too_large("stderr", limits.stderr_bytes)
        if exit_code is None:
            return results.crashed("podman did not report how the command ended")
        if exit_code != 0:
            kills = await asyncio.to_thread(podman_host.oom_kills, cgroup)
            if kills:
                how = f"the kernel's OOM killer killed {kills} of its processes (exit {exit_code})"
                return replace(results.memory_limit(limits.memory_bytes, how), exit_code=exit_code)
        # A failed run is read too, without keeping anything: did it fill /output?
        try:
            read = await self._read_outputs(
                container_id, output_dir if exit_code == 0 else None, limits
            )
        except (APIError, tarfile.TarError) as exc:
            return results.crashed(f"cannot read /output: {explain(exc)}")
        except (DockerException, OSError, urllib3.exceptions.HTTPError) as exc:
            raise Unavailable(f"cannot read /output through {self.socket}: {explain(exc)}") from exc
        if read.over is not None:
            return replace(results.output_too_large(read.over), exit_code=exit_code)
        if exit_code != 0:
            return results.nonzero_exit(exit_code)
        return results.ok().with_outputs(read.files)

    async def _read_outputs(
        self, container_id: str, directory: Path | None, limits: ContainerLimits
    ) -> OutputRead:
        """/output of the running container, read (into `directory`, else only counted)."""
        return await read_archive(
            self.client,
            container_id,
            directory,
            max_files=limits.output_files,
            max_bytes=limits.output_bytes,
        )

    async def _api(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer of one API call. Raises FailedPrecondition (refused), Unavailable."""
        client = self.client

        def call() -> Any:
            if method == "get":
                response = client.api.get(path)
            else:
                data = None if body is None else json.dumps(body)
                response = client.api.post(
                    path, data=data, headers={"Content-Type": "application/json"}
                )
            response.raise_for_status()
            return response.json() if response.content else None

        return await self._call(call)

    async def _exit_code(self, exec_id: str) -> int:
        """The exec'd command's exit code, once Podman has recorded it.

        Its streams can end before it does (a guest may close them): the
        caller's deadline bounds the wait.
        """
        delay = 0.005
        while True:
            session = await self._api("get", f"/exec/{exec_id}/json")
            code = session.get("ExitCode")
            if not session.get("Running") and isinstance(code, int):
                return code
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _kill(self, container_id: str) -> None:
        try:
            await self._api("post", f"/containers/{container_id}/kill?signal=KILL")
        except (FailedPrecondition, Unavailable) as exc:
            # Already exited: nothing to kill (removal follows on every path).
            log.debug("kill %s: %s", container_id, exc)

    async def _remove(self, name: str, client: Any = None) -> None:
        """Kill and remove the container; a container that does not exist is fine.

        Tried a few times: Podman 4.3 sometimes fails a forced removal while the
        container's own cleanup still holds its /dev/shm ("device or resource busy").
        """
        for attempt in range(_REMOVE_ATTEMPTS):
            try:
                client = client or self.client
                await asyncio.to_thread(client.containers.remove, name, force=True, v=True)
                return
            except NotFound:
                return
            except (DockerException, OSError, Unavailable) as exc:
                if attempt + 1 == _REMOVE_ATTEMPTS:
                    log.error("cannot remove container %s: %s", name, explain(exc))
                else:
                    log.debug("removing container %s, again: %s", name, explain(exc))
                    await asyncio.sleep(0.1 * (attempt + 1))
