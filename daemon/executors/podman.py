"""The Podman executor: capabilities that are not WASM run as hardened containers.

Operator notes
==============

Socket. The daemon drives `podman system service` through its REST API (the
`podman` package). In production enable systemd's socket unit and name it in
the config (`podman_socket`, or `ANVIL_PODMAN_SOCKET`)::

    systemctl enable --now podman.socket        # rootful: /run/podman/podman.sock
    podman_socket = "/run/podman/podman.sock"   # config.toml

Tests, CI and the benchmark start a private service on a socket in a temp
folder (`daemon/executors/podman_service.py`). Hosts with a hybrid cgroup
layout need runc instead of crun, and sandboxes with low hard limits need
lower default ulimits: `guest_modules/containers/containers.conf`, installed by
`.ci/install-podman.sh`.

Images are never pulled. A capability names its image by digest, either
`sha256:<image id>` (the config digest: it survives `podman save`/`podman load`
between peers) or `NAME@sha256:<manifest digest>`. Bring an image onto a peer
with `podman load -i FILE` (or `PodmanExecutor.load_image`);
`guest_modules/containers/build_busybox_image.py` builds the example image.

Every run: `network_mode=none`, read-only rootfs, all capabilities dropped,
no-new-privileges, a pids limit, a memory limit with memory+swap equal to it
(no swap), a CPU quota, the inputs bind-mounted read-only at `/input/<i>`
(input 0 also on stdin), the job's output folder bind-mounted writable at
`/output`, no container log (stdout/stderr come over an attach stream, capped
like WASM guests: over the cap the container is killed and the job fails), a
wall-clock deadline after which the container is SIGKILLed, and removal of the
container on every path (done, failed, timed out, cancelled). Containers carry
the labels `anvil-compute.owner` and `anvil-compute.job`; `start()` removes
the ones a crashed predecessor with the same owner left behind.

Limits are verified, not trusted: after create the container is inspected and
the run is refused (FailedPrecondition) when any limit or hardening option is
not what was asked for — Podman drops limits silently, e.g. rootless on
cgroup v1.

Memory-limit failures: a container reported `OOMKilled`, or ended by SIGKILL
(exit 137) that the executor did not send, is reported as a memory-limit
failure. (With cgroup v1 Podman often does not set `OOMKilled`; the kernel's
OOM killer is then the only other sender of SIGKILL to a capability-less
container, unless the guest kills itself.)

GPU. A capability registered with a `gpu` resource (`resources = { gpu = "1" }`)
gets the CDI devices of `PodmanExecutor(gpu_devices=...)`, by default
`nvidia.com/gpu=all`; jobs that require `gpu` are placed only on peers that
registered it (`daemon/resources.py`). CDI names are resolved when the
container starts, so a host without the CDI spec fails the job with
"unresolvable CDI devices" (tested here, with no GPU). To verify on a GPU host:

1. `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`, then
   `nvidia-ctk cdi list` shows `nvidia.com/gpu=all`;
2. `podman run --rm --device nvidia.com/gpu=all --network none --read-only
   --cap-drop ALL IMAGE nvidia-smi -L` lists the GPUs (IMAGE: any image with
   `nvidia-smi`, e.g. one built from a CUDA base and `podman load`-ed);
3. register a capability `[capabilities."gpu:smi"] podman_image = "sha256:…"
   command = ["nvidia-smi", "-L"] resources = { gpu = "1" }`, submit a job
   with `resources={"gpu": "1"}` and check that its output lists the GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import podman
import requests
from podman.errors import APIError, DockerException, ImageNotFound, NotFound

from daemon.exceptions import FailedPrecondition, InvalidArgument, Unavailable
from daemon.executors import result as results
from daemon.executors import staging
from daemon.executors.result import ExecutionResult, OutputFile

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/podman/podman.sock"
DEFAULT_GPU_DEVICES = ("nvidia.com/gpu=all",)
LABEL_OWNER = "anvil-compute.owner"
LABEL_JOB = "anvil-compute.job"
# The attach call is the one podman-py lacks; every Podman since 4.0 serves this prefix.
API_PREFIX = "/v4.0.0/libpod"
MIB = 1 << 20
CPU_PERIOD_US = 100_000
MIN_MEMORY_BYTES = 6 * MIB  # Podman refuses less
SIGKILL_EXIT = 128 + signal.SIGKILL
_STDOUT, _STDERR = 1, 2
_INPUT_PREFIX = "podman-in-"
_STDIN_CHUNK = 64 * 1024
_DIGEST_REF = re.compile(r"(?:(?P<name>[^@\s]+)@)?sha256:(?P<hex>[0-9a-f]{64})")
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class ContainerLimits:
    """What one container run may use. Every field is enforced on every run."""

    timeout_s: float = 30.0  # wall clock, from the start call
    memory_bytes: int = 256 * MIB  # memory and memory+swap alike: no swap
    cpu_millis: int = 1000  # thousandths of a CPU (1000 = one core)
    pids: int = 64  # processes and threads
    stdout_bytes: int = 1 * MIB
    stderr_bytes: int = 64 * 1024
    output_files: int = 1000  # files left in /output
    output_bytes: int = 1024 * MIB  # their total size

    def __post_init__(self) -> None:
        for name in ("cpu_millis", "pids", "stdout_bytes", "stderr_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"limit {name} must be an integer >= 1, got {value!r}")
        for name in ("output_files", "output_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"limit {name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.timeout_s, int | float) and 0 < self.timeout_s < math.inf):
            raise InvalidArgument(f"limit timeout_s must be > 0 seconds, got {self.timeout_s!r}")
        if not isinstance(self.memory_bytes, int) or self.memory_bytes < MIN_MEMORY_BYTES:
            raise InvalidArgument(
                f"limit memory must be at least 6 MiB (Podman's minimum), got {self.memory_bytes!r}"
            )

    def with_overrides(
        self,
        *,
        timeout_s: float | None = None,
        memory_mib: int | None = None,
        cpu_millis: int | None = None,
        pids: int | None = None,
    ) -> ContainerLimits:
        """These limits with the job's or capability's values where given (None keeps them).

        Raises InvalidArgument on a value out of range.
        """
        return replace(
            self,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            memory_bytes=self.memory_bytes if memory_mib is None else memory_mib * MIB,
            cpu_millis=self.cpu_millis if cpu_millis is None else cpu_millis,
            pids=self.pids if pids is None else pids,
        )


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


class ImageNotPresent(FailedPrecondition):
    """The pinned image is not in this peer's Podman (and is never pulled)."""


def check_image_ref(ref: str) -> tuple[str | None, str]:
    """(name or None, digest hex) of an image pinned by digest. Raises InvalidArgument."""
    match = _DIGEST_REF.fullmatch(ref)
    if match is None:
        raise InvalidArgument(
            f"image {ref!r} is not pinned by digest: use 'sha256:<image id>' or "
            "'NAME@sha256:<manifest digest>'"
        )
    return match["name"], match["hex"]


def cpu_quota(cpu_millis: int) -> int:
    """CFS quota in microseconds per `CPU_PERIOD_US` for `cpu_millis` thousandths of a CPU."""
    return max(1000, cpu_millis * CPU_PERIOD_US // 1000)


def container_name(job_id: str) -> str:
    """A unique, valid container name that shows which job it runs."""
    safe = _NAME_UNSAFE.sub("-", job_id)[:40] or "run"
    return f"anvil-{safe}-{uuid.uuid4().hex[:8]}"


def create_options(
    *,
    image_id: str,
    command: Sequence[str],
    params: Sequence[tuple[str, str]],
    limits: ContainerLimits,
    input_dir: Path,
    output_dir: Path,
    name: str,
    labels: Mapping[str, str],
    devices: Sequence[str] = (),
) -> dict[str, Any]:
    """The `containers.create` keyword arguments of one hardened run. Pure.

    argv is the command then `--key=value` per param (with no command, the
    params follow the image's entrypoint); the params are also in the
    environment as `ANVIL_PARAM_<KEY>` (guest_modules/GUIDE.md).
    """
    argv = [*command, *(f"--{key}={value}" for key, value in params)]
    return {
        "image": image_id,
        "command": argv or None,
        "name": name,
        "labels": dict(labels),
        "environment": dict(staging.guest_env(params)),
        "stdin_open": True,
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        # podman-py maps `security_opt` to SELinux options: this is the real switch.
        "no_new_privileges": True,
        "pids_limit": limits.pids,
        "mem_limit": limits.memory_bytes,
        "memswap_limit": limits.memory_bytes,
        # podman-py silently ignores `nano_cpus`: period and quota do apply.
        "cpu_period": CPU_PERIOD_US,
        "cpu_quota": cpu_quota(limits.cpu_millis),
        "mounts": [
            {"type": "bind", "source": str(input_dir), "target": "/input", "read_only": True},
            {"type": "bind", "source": str(output_dir), "target": "/output"},
        ],
        "devices": list(devices),
        # Output comes over the attach stream, capped; a log file would keep it all on disk.
        "log_config": {"Type": "none"},
        "stop_signal": int(signal.SIGKILL),
        "stop_timeout": 1,
    }


def limits_not_applied(options: Mapping[str, Any], attrs: Mapping[str, Any]) -> list[str]:
    """What an inspected container has that differs from `options` (empty: all applied). Pure.

    CDI devices are not checked: Podman resolves them only when the container starts.
    """
    host: Mapping[str, Any] = attrs.get("HostConfig") or {}
    problems: list[str] = []

    def expect(what: str, actual: Any, wanted: Any) -> None:
        if actual != wanted:
            problems.append(f"{what} is {actual!r}, not {wanted!r}")

    expect("network mode", host.get("NetworkMode"), "none")
    expect("read-only rootfs", host.get("ReadonlyRootfs"), True)
    expect("privileged", host.get("Privileged"), False)
    if host.get("CapAdd"):
        problems.append(f"capabilities added: {host.get('CapAdd')!r}")
    if not host.get("CapDrop"):
        problems.append("no capability dropped")
    if attrs.get("EffectiveCaps"):
        problems.append(f"effective capabilities: {attrs.get('EffectiveCaps')!r}")
    security = [str(opt) for opt in host.get("SecurityOpt") or []]
    if "no-new-privileges" not in security:
        problems.append(f"no-new-privileges is not set (security options {security!r})")
    if any(opt.replace(":", "=") == "seccomp=unconfined" for opt in security):
        problems.append("seccomp is disabled")
    expect("pids limit", host.get("PidsLimit"), options["pids_limit"])
    expect("memory limit", host.get("Memory"), options["mem_limit"])
    expect("memory+swap limit", host.get("MemorySwap"), options["memswap_limit"])
    expect("CPU period", host.get("CpuPeriod"), options["cpu_period"])
    expect("CPU quota", host.get("CpuQuota"), options["cpu_quota"])
    mounts = {m.get("Destination"): m for m in attrs.get("Mounts") or []}
    for target, writable in (("/input", False), ("/output", True)):
        mount = mounts.get(target)
        if mount is None:
            problems.append(f"{target} is not mounted")
        else:
            expect(f"{target} writable", mount.get("RW"), writable)
    expect("image", attrs.get("Image"), options["image"])
    return problems


def _explain(exc: BaseException) -> str:
    """Podman's own words for an API error, else the exception's."""
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip() or type(exc).__name__


class PodmanExecutor:
    """`async with PodmanExecutor(socket) as ex: await ex.run(...)` — safe from many tasks.

    The `podman` package is synchronous: its calls run in threads. Output is
    read from an attach stream on the event loop.
    """

    def __init__(
        self,
        socket: str | Path = DEFAULT_SOCKET,
        *,
        owner: str = "anvil-compute",
        scratch_dir: Path | None = None,
        default_limits: ContainerLimits | None = None,
        gpu_devices: Sequence[str] = DEFAULT_GPU_DEVICES,
        api_timeout_s: float = 60.0,
    ) -> None:
        self.socket = socket_path(socket)
        self.owner = owner
        self.default_limits = default_limits or ContainerLimits()
        self.gpu_devices = tuple(gpu_devices)
        self._scratch_dir = scratch_dir
        self._api_timeout_s = api_timeout_s
        self._client: Any = None

    async def start(self) -> None:
        """Connect and check that the service answers. Raises Unavailable.

        Containers (and input folders in `scratch_dir`) that a crashed
        predecessor with the same owner left behind are removed.
        """
        self._client = podman.PodmanClient(
            base_url=f"http+unix://{self.socket}", timeout=self._api_timeout_s
        )
        try:
            if not await self._call(self._client.ping):
                raise Unavailable(f"podman at {self.socket} does not answer its ping")
            if self._scratch_dir is not None:
                await asyncio.to_thread(_clear_scratch, self._scratch_dir)
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
            raise FailedPrecondition(f"podman refused: {_explain(exc)}") from exc
        except (DockerException, OSError) as exc:
            raise Unavailable(f"podman at {self.socket}: {_explain(exc)}") from exc

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
        _, digest = check_image_ref(ref)
        try:
            image = await asyncio.to_thread(self.client.images.get, ref)
        except (ImageNotFound, NotFound) as exc:
            raise ImageNotPresent(
                f"image {ref} is not present on this peer (images are never pulled): "
                "load it with `podman load -i FILE`, or name its archive in the "
                "capability's podman_archive"
            ) from exc
        except (DockerException, OSError) as exc:
            raise Unavailable(f"podman at {self.socket}: {_explain(exc)}") from exc
        image_id = str(image.id).removeprefix("sha256:")
        digests = {str(image.attrs.get("Digest") or "")} | {
            str(d).rpartition("@")[2] for d in image.attrs.get("RepoDigests") or []
        }
        if digest != image_id and f"sha256:{digest}" not in digests:
            raise FailedPrecondition(f"image {ref} resolved to {image_id}, whose digest differs")
        return image_id

    async def load_image(self, archive: Path) -> tuple[str, ...]:
        """`podman load` an image archive (docker or OCI); return the ids of the images in it.

        The archive is streamed, not read into memory. Raises InvalidArgument
        (unreadable or not an image archive), Unavailable.
        """

        def load() -> list[str]:
            with archive.open("rb") as body:
                response = self.client.api.post(
                    "/images/load", data=body, headers={"Content-type": "application/x-tar"}
                )
            response.raise_for_status()
            return [str(name) for name in response.json().get("Names") or []]

        try:
            names = await asyncio.to_thread(load)
        except FileNotFoundError as exc:
            raise InvalidArgument(f"image archive {archive} does not exist") from exc
        except (APIError, DockerException, requests.HTTPError) as exc:
            # HTTPError is an OSError too, but a refused archive is no outage:
            # loading it again elsewhere would fail the same way.
            raise InvalidArgument(f"podman cannot load {archive}: {_explain(exc)}") from exc
        except OSError as exc:
            raise Unavailable(f"podman at {self.socket}: {_explain(exc)}") from exc
        ids = []
        for name in names:
            image = await self._call(self.client.images.get, name)
            ids.append(str(image.id).removeprefix("sha256:"))
        return tuple(dict.fromkeys(ids))

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

        `output_dir` is created if missing (and removed again when the guest
        leaves nothing in it); an existing one must be empty. Afterwards it
        holds the outputs and nothing else. `gpu` adds the CDI devices. The container is
        removed on every path.

        Guest failures come back as a result, never raised. Raises
        InvalidArgument (bad image ref, params, inputs, folder),
        FailedPrecondition (image absent, or Podman did not apply a limit:
        nothing ran), Unavailable (Podman unreachable). Cancelling the call
        kills the container.
        """
        limits = limits or self.default_limits
        pairs = staging.param_pairs(params)
        if any("\0" in part for part in command):
            raise InvalidArgument("command contains a NUL byte")
        created, input_dir, staged = await asyncio.to_thread(
            _prepare, output_dir, inputs, self._scratch_dir
        )
        try:
            image_id = await self.resolve_image(image)
            options = create_options(
                image_id=image_id,
                command=command,
                params=pairs,
                limits=limits,
                input_dir=input_dir,
                output_dir=output_dir,
                name=container_name(job_id),
                labels={LABEL_OWNER: self.owner, LABEL_JOB: job_id},
                devices=self.gpu_devices if gpu else (),
            )
            result = await self._run_container(options, limits, staged[0] if staged else None)
        except BaseException:
            if created:
                await asyncio.shield(asyncio.to_thread(shutil.rmtree, output_dir, True))
            raise
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, input_dir, True))
        outputs = await asyncio.to_thread(staging.close_output_dir, output_dir, created=created)
        return _with_outputs(result, outputs, limits)

    async def _run_container(
        self, options: dict[str, Any], limits: ContainerLimits, stdin: Path | None
    ) -> ExecutionResult:
        name, client = options["name"], self.client
        try:
            container = await self._call(client.containers.create, **options)
            await self._call(container.reload)
            problems = limits_not_applied(options, container.attrs)
            if problems:
                raise FailedPrecondition(
                    "podman did not apply the sandbox as asked, refusing to run: "
                    + "; ".join(problems)
                )
            return await self._attach_and_run(container, limits, stdin)
        finally:
            # Shielded: a cancelled job still gets its container killed and removed.
            await asyncio.shield(self._remove(name, client))

    async def _attach_and_run(
        self, container: Any, limits: ContainerLimits, stdin: Path | None
    ) -> ExecutionResult:
        reader, writer = await self._attach(str(container.id))
        stdout, stderr = bytearray(), bytearray()
        feeder: asyncio.Task[None] | None = None
        killed_for: str | None = None
        started = time.monotonic()
        try:
            try:
                async with asyncio.timeout(limits.timeout_s):
                    try:
                        await asyncio.to_thread(container.start)
                    except (DockerException, OSError) as exc:
                        return results.crashed(
                            f"podman could not start the container: {_explain(exc)}"
                        )
                    feeder = asyncio.create_task(_feed_stdin(writer, stdin))
                    killed_for = await _read_output(reader, stdout, stderr, limits)
                    if killed_for is None:
                        # The stream ends a moment before Podman records the exit.
                        state = await self._wait_exited(container)
            except TimeoutError:
                killed_for = "timeout"
            if killed_for is not None:
                # Hang up first: conmon blocked writing to an unread stream delays the kill.
                writer.close()
                await self._kill(container)
                state = await self._wait_exited(container)
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder
            writer.close()
        result = _verdict(state, killed_for, limits)
        return result.with_capture(
            stdout=bytes(stdout),
            stderr=bytes(stderr),
            duration_s=time.monotonic() - started,
            fuel_consumed=None,
        )

    async def _attach(self, container_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An attach stream (stdin, stdout, stderr) to a created container, before it starts.

        Attaching first loses no output, and lets stdin reach EOF when we half-close.
        """
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket))
        except OSError as exc:
            raise Unavailable(f"podman at {self.socket}: {exc.strerror or exc}") from exc
        try:
            query = "stream=true&stdin=true&stdout=true&stderr=true&logs=false"
            request = (
                f"POST {API_PREFIX}/containers/{container_id}/attach?{query} HTTP/1.1\r\n"
                "Host: podman\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                "Content-Length: 0\r\n\r\n"
            )
            writer.write(request.encode())
            async with asyncio.timeout(self._api_timeout_s):
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
                if status not in (b"101", b"200"):
                    body = await reader.read(4096)
                    message = (
                        f"podman refused to attach to {container_id}: "
                        f"{head.splitlines()[0].decode(errors='replace')} "
                        f"{body.decode(errors='replace').strip()}"
                    )
                    # 4xx: this container cannot run here (e.g. an unresolvable CDI
                    # device); trying again will not help. Else Podman is in trouble.
                    if status.startswith(b"4"):
                        raise FailedPrecondition(message)
                    raise Unavailable(message)
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
        ) as exc:
            writer.close()
            raise Unavailable(f"podman attach to {container_id} failed: {exc}") from exc
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _wait_exited(self, container: Any) -> Mapping[str, Any]:
        """The container's State once it has exited (or after 30 s, whatever it is then)."""
        delay, deadline = 0.005, time.monotonic() + 30
        while True:
            await self._call(container.reload)
            state: Mapping[str, Any] = container.attrs.get("State") or {}
            if state.get("Status") in ("exited", "stopped") or time.monotonic() > deadline:
                return state
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _kill(self, container: Any) -> None:
        try:
            await asyncio.to_thread(container.kill, int(signal.SIGKILL))
        except (DockerException, OSError) as exc:
            # Already exited: nothing to kill.
            log.debug("kill %s: %s", container.name, _explain(exc))

    async def _remove(self, name: str, client: Any = None) -> None:
        """Kill and remove the container; a container that does not exist is fine."""
        try:
            client = client or self.client
            await asyncio.to_thread(client.containers.remove, name, force=True, v=True)
        except NotFound:
            pass
        except (DockerException, OSError, Unavailable) as exc:
            log.error("cannot remove container %s: %s", name, _explain(exc))


def _verdict(
    state: Mapping[str, Any], killed_for: str | None, limits: ContainerLimits
) -> ExecutionResult:
    """How the run ended, from the exited container's State and what the executor did."""
    exit_code = state.get("ExitCode")
    if killed_for == "timeout":
        return results.timed_out(limits.timeout_s, killed=True)
    if killed_for == "stdout":
        return results.stream_too_large("stdout", limits.stdout_bytes)
    if killed_for == "stderr":
        return results.stream_too_large("stderr", limits.stderr_bytes)
    if state.get("Status") not in ("exited", "stopped") or not isinstance(exit_code, int):
        return results.crashed(f"the container did not exit cleanly (state {dict(state)!r})")
    if state.get("OOMKilled") or exit_code == SIGKILL_EXIT:
        how = (
            "killed by the kernel's OOM killer"
            if state.get("OOMKilled")
            else "killed by SIGKILL (exit 137), which only the OOM killer sends here"
        )
        return replace(results.memory_limit(limits.memory_bytes, how), exit_code=exit_code)
    if exit_code != 0:
        return results.nonzero_exit(exit_code)
    return results.ok()


async def _read_output(
    reader: asyncio.StreamReader,
    stdout: bytearray,
    stderr: bytearray,
    limits: ContainerLimits,
) -> str | None:
    """Demultiplex the attach stream until it ends; the stream's name if it went over its cap.

    Frames: 1 byte stream (1 stdout, 2 stderr), 3 zero bytes, 4 bytes big-endian size.
    """
    while True:
        try:
            header = await reader.readexactly(8)
            data = await reader.readexactly(int.from_bytes(header[4:8], "big"))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if header[0] == _STDOUT:
            buffer, cap, stream = stdout, limits.stdout_bytes, "stdout"
        elif header[0] == _STDERR:
            buffer, cap, stream = stderr, limits.stderr_bytes, "stderr"
        else:
            continue
        buffer += data
        if len(buffer) > cap:
            del buffer[cap:]
            return stream


async def _feed_stdin(writer: asyncio.StreamWriter, path: Path | None) -> None:
    """Write input 0 to the container's stdin, then half-close: the guest sees EOF."""
    try:
        if path is not None:
            body = await asyncio.to_thread(path.open, "rb")
            try:
                while chunk := await asyncio.to_thread(body.read, _STDIN_CHUNK):
                    writer.write(chunk)
                    await writer.drain()
            finally:
                body.close()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass  # the guest exited without reading all of its stdin


def _clear_scratch(scratch_dir: Path) -> None:
    scratch_dir.mkdir(parents=True, exist_ok=True)
    for stale in scratch_dir.glob(f"{_INPUT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _prepare(
    output_dir: Path, inputs: Sequence[Path], scratch_dir: Path | None
) -> tuple[bool, Path, list[Path]]:
    """(whether output_dir was created, a fresh /input folder, the staged inputs).

    Raises InvalidArgument.
    """
    created = staging.open_output_dir(output_dir)
    input_dir = Path(tempfile.mkdtemp(prefix=_INPUT_PREFIX, dir=scratch_dir))
    try:
        input_dir.chmod(0o755)
        return created, input_dir, staging.stage_inputs(inputs, input_dir)
    except BaseException:
        shutil.rmtree(input_dir, ignore_errors=True)
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _with_outputs(
    result: ExecutionResult, outputs: tuple[OutputFile, ...], limits: ContainerLimits
) -> ExecutionResult:
    """Attach the outputs; a successful run that left too much in /output fails."""
    if result.succeeded:
        total = sum(f.size for f in outputs)
        detail = ""
        if len(outputs) > limits.output_files:
            detail = (
                f"{len(outputs)} files left in /output, over the limit of {limits.output_files}"
            )
        elif total > limits.output_bytes:
            detail = (
                f"{results.size_text(total)} left in /output, over the limit of "
                f"{results.size_text(limits.output_bytes)}"
            )
        if detail:
            result = replace(
                results.output_too_large(detail),
                exit_code=result.exit_code,
                stdout=result.stdout,
                stderr=result.stderr,
                duration_s=result.duration_s,
            )
    return result.with_outputs(outputs)
