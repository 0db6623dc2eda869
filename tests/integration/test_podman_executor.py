"""The Podman executor against a real `podman system service`: ABI, hostile containers, daemon.

Nothing here skips: without Podman these tests fail (CI installs it with
.ci/install-podman.sh). Every container the suite starts carries the label
`anvil-compute.owner`; the service fixture (conftest.py) fails the suite if
any is left. The attacks of issue 27 are in test_podman_sandbox.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import config
from daemon.capability_config import parse_capability
from daemon.client import ComputeClient
from daemon.convert import PROTO_TO_JOB_STATE
from daemon.exceptions import ConfigError, FailedPrecondition, InvalidArgument
from daemon.executors.podman import example_image
from daemon.executors.podman.executor import (
    LABEL_JOB,
    LABEL_OWNER,
    ContainerLimits,
    PodmanExecutor,
    UserNamespace,
    check_image_ref,
    container_spec,
    cpu_quota,
    limits_not_applied,
    socket_path,
)
from daemon.executors.podman.job import PodmanJobExecutor, job_limits
from daemon.executors.podman.service import PodmanService
from daemon.executors.result import ExecutionRequest, RunEnd, ending
from daemon.jobs.state import JobState
from daemon.pb.anvil import compute_pb2
from daemon.resources import satisfies
from daemon.storage.cache import DiskCache
from daemon.storage.fetcher import Fetcher
from daemon.storage.local_store import LocalStore
from tests.e2e.cluster import PeerFactory
from tests.eventually import eventually
from tests.integration.containers import OWNER, TEXT, sh

pytestmark = pytest.mark.podman

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_DIR = REPO / "guest_modules" / "containers"
BUILD_SCRIPT = CONTAINERS_DIR / "build_busybox_image.py"


async def job_executor(
    podman_socket: Path, tmp_path: Path, **overrides: object
) -> PodmanJobExecutor:
    """The job runner's executor, built from settings as `serve` builds it."""
    settings = config.load(
        environ={},
        overrides={
            "data_dir": tmp_path / "data",
            "podman_socket": str(podman_socket),
            **overrides,
        },
    )
    return await PodmanJobExecutor.create(settings)


def out_dir(tmp_path: Path, name: str = "out") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


# -- pure parts ----------------------------------------------------------------


def test_image_refs_must_be_pinned_by_digest() -> None:
    digest = "ab" * 32
    assert check_image_ref(f"sha256:{digest}") == (None, digest)
    assert check_image_ref(f"localhost/x@sha256:{digest}") == ("localhost/x", digest)
    for ref in ("busybox", "busybox:latest", f"sha256:{digest[:-1]}", f"x@sha256:{digest.upper()}"):
        with pytest.raises(InvalidArgument, match="not pinned by digest"):
            check_image_ref(ref)


def test_limits_come_from_the_capability_and_the_job() -> None:
    defaults = ContainerLimits()
    assert job_limits(defaults, timeout_s=0, memory_mib=0, cpu_millis=0, pids=0) == defaults
    limits = job_limits(defaults, timeout_s=2.5, memory_mib=64, cpu_millis=500, pids=10)
    assert (limits.timeout_s, limits.memory_bytes, limits.cpu_millis, limits.pids) == (
        2.5,
        64 << 20,
        500,
        10,
    )
    assert cpu_quota(500) == 50_000
    with pytest.raises(InvalidArgument, match="at least 6 MiB"):
        defaults.with_overrides(memory_mib=4)
    with pytest.raises(InvalidArgument, match="pids"):
        ContainerLimits(pids=0)
    assert socket_path("unix:///run/p.sock") == socket_path("/run/p.sock") == Path("/run/p.sock")
    with pytest.raises(InvalidArgument, match="absolute"):
        socket_path("p.sock")


# -- the example capability and the ABI ---------------------------------------


def test_image_build_is_reproducible(busybox_image: str) -> None:
    # busybox_image came from the script (a subprocess); these from the package.
    first, image_id = example_image.build()
    again, _ = example_image.build()
    assert first == again
    assert image_id == busybox_image


async def test_example_capability_counts_words(
    podman_socket: Path, busybox_image: str, tmp_path: Path, text_file: Path
) -> None:
    cap = parse_capability(
        "demo:busybox-wc", {"podman_image": busybox_image, "command": ["wc", "-w"]}
    )
    job = await job_executor(podman_socket, tmp_path)
    try:
        outcome = await job.execute(
            ExecutionRequest(
                job_id="job-wc",
                capability=cap,
                module_path=None,
                inputs=(text_file,),
                params={},
                output_dir=out_dir(tmp_path),
                timeout_s=30,
            )
        )
    finally:
        await job.close()
    assert ending(outcome) == (JobState.SUCCEEDED, ""), outcome.message
    assert (outcome.stdout, outcome.exit_code) == (b"9\n", 0)


async def test_guest_abi(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path, text_file: Path
) -> None:
    second = tmp_path / "second.bin"
    second.write_bytes(b"\x00\x01binary")
    script = (
        'echo "argv: $*"; echo "env: $ANVIL_PARAM_GROUP_BY $ANVIL_PARAM_X_Y"; '
        "echo stdin: $(wc -w); cmp /input/1 /input/1 && wc -c < /input/1; "
        "cat /input/0 > /output/copy.txt; mkdir /output/sub; echo nested > /output/sub/n.txt"
    )
    result = await sh(
        executor,
        busybox_image,
        script,
        tmp_path,
        inputs=(text_file, second),
        params={"group_by": "city", "x-y": "a b"},
    )
    assert result.outcome is RunEnd.OK, (result.message, result.stderr)
    lines = result.stdout.decode().splitlines()
    assert lines == ["argv: --group_by=city --x-y=a b", "env: city a b", "stdin: 9", "8"]
    outputs = {f.name: f.path.read_bytes() for f in result.outputs}
    assert outputs == {"copy.txt": TEXT.encode(), "sub/n.txt": b"nested\n"}


async def test_failure_is_exit_code_and_stderr(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    result = await sh(
        executor, busybox_image, "echo partial; echo 'line 7: bad' >&2; exit 3", tmp_path
    )
    assert result.outcome is RunEnd.NONZERO_EXIT and result.exit_code == 3
    assert (result.stdout, result.stderr) == (b"partial\n", b"line 7: bad\n")


async def test_stdout_over_the_cap_fails_the_job(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    limits = ContainerLimits(stdout_bytes=64 * 1024)
    started = time.monotonic()
    result = await sh(executor, busybox_image, "yes", tmp_path, limits=limits)
    assert result.outcome is RunEnd.OUTPUT_TOO_LARGE
    assert "more than 64 KiB written to stdout" in result.message
    assert len(result.stdout) == 64 * 1024
    assert time.monotonic() - started < 10


# -- the sandbox really applies ------------------------------------------------


async def test_kernel_limits_and_hardening_inside_the_container(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    # cgroup v1 files, else the v2 ones: what the kernel enforces, not what Podman says.
    script = """
    if [ -f /sys/fs/cgroup/cpu.max ]; then
        read quota period < /sys/fs/cgroup/cpu.max; echo cpu $quota $period
        echo memory $(cat /sys/fs/cgroup/memory.max) $(cat /sys/fs/cgroup/memory.swap.max)
        echo pids $(cat /sys/fs/cgroup/pids.max)
    else
        echo cpu $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us)
        echo memory $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes \
            /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes)
        echo pids $(cat /sys/fs/cgroup/pids/pids.max)
    fi
    grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
    """
    limits = ContainerLimits(cpu_millis=250, memory_bytes=48 << 20, pids=20)
    result = await sh(executor, busybox_image, script, tmp_path, limits=limits)
    assert result.outcome is RunEnd.OK, result.stderr
    facts = dict(line.split(None, 1) for line in result.stdout.decode().splitlines())
    assert facts["cpu"] == "25000 100000"
    memory, memsw = facts["memory"].split()
    # The guest's 48 MiB plus the /output and /tmp tmpfs sizes, whose pages the
    # cgroup is charged for. v1 memsw = memory + swap = the limit; v2 swap.max = 0.
    cgroup = limits.cgroup_memory_bytes
    assert cgroup == (48 << 20) + limits.output_tmpfs_bytes + limits.tmp_bytes
    assert memory == str(cgroup) and memsw in {str(cgroup), "0"}
    assert facts["pids"] == "20"
    assert facts["CapEff:"] == facts["CapBnd:"] == "0000000000000000"
    assert facts["NoNewPrivs:"] == "1"
    assert facts["Seccomp:"] == "2"


async def test_inspect_check_names_every_dropped_limit(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    spec = container_spec(
        image_id=await executor.resolve_image(busybox_image),
        env={},
        limits=ContainerLimits(),
        userns=UserNamespace(),
        input_dir=out_dir(tmp_path, "in"),
        init_path=executor.init_path,
        exec_helper=executor.exec_helper,
        name="anvil-inspect-check",
        labels={LABEL_OWNER: OWNER},
    )
    attrs = await asyncio.to_thread(_create_and_inspect, executor.client, spec)
    assert limits_not_applied(spec, attrs) == []
    host, config = attrs["HostConfig"], attrs["Config"]
    tmpfs = host["Tmpfs"]
    for key, value, words in [
        ("PidsLimit", 0, "pids limit"),
        ("Memory", 0, "memory limit"),
        ("MemorySwap", -1, "memory+swap limit"),
        ("CpuQuota", 0, "CPU quota"),
        ("NetworkMode", "bridge", "network mode"),
        ("ReadonlyRootfs", False, "read-only rootfs"),
        ("SecurityOpt", [f"seccomp={spec['seccomp_profile_path']}"], "no-new-privileges"),
        ("SecurityOpt", ["no-new-privileges"], "seccomp profile"),
        ("SecurityOpt", ["no-new-privileges", "seccomp=unconfined"], "seccomp profile"),
        ("CapAdd", ["CAP_SYS_ADMIN"], "capabilities added"),
        ("UsernsMode", "host", "user namespace"),
        ("IDMappings", {**host["IDMappings"], "UidMap": ["0:0:4294967295"]}, "uid map"),
        ("Devices", [{"PathOnHost": "/dev/kvm", "PathInContainer": "/dev/kvm"}], "devices"),
        ("Tmpfs", {**tmpfs, "/output": "rw,size=1g"}, "tmpfs /output lacks"),
        ("Tmpfs", {**tmpfs, "/var/tmp": "rw"}, "tmpfs mounts"),
    ]:
        broken = {**attrs, "HostConfig": {**host, key: value}}
        problems = limits_not_applied(spec, broken)
        assert len(problems) == 1 and words in problems[0], (key, problems)
    as_root = limits_not_applied(spec, {**attrs, "Config": {**config, "User": "0:0"}})
    assert as_root == ["user is '0:0', not '65534:65534'"]
    mounts = [{**m, "RW": m["Destination"] == "/input"} for m in attrs["Mounts"]]
    assert limits_not_applied(spec, {**attrs, "Mounts": mounts}) == [
        "/input writable is True, not False"
    ]
    loose = [{**m, "Options": ["rbind"]} if m["Destination"] == "/input" else m for m in mounts]
    assert "/input is mounted without nodev, noexec, nosuid" in limits_not_applied(
        spec, {**attrs, "Mounts": loose}
    )
    volume = {"Destination": "/data", "Type": "volume", "RW": True}
    extra = limits_not_applied(spec, {**attrs, "Mounts": [*attrs["Mounts"], volume]})
    assert len(extra) == 1 and extra[0].startswith("mounts is"), extra


def _create_and_inspect(client: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Create a container from `spec` through the API, inspect it, remove it."""
    created = client.api.post("/containers/create", data=json.dumps(spec))
    created.raise_for_status()
    try:
        inspected = client.api.get(f"/containers/{created.json()['Id']}/json")
        inspected.raise_for_status()
        return dict(inspected.json())
    finally:
        client.containers.remove(created.json()["Id"], force=True)


def _create_dropping(executor: PodmanExecutor, monkeypatch: pytest.MonkeyPatch, drop: Any) -> None:
    """Make the executor's create call lose what `drop(body)` removes, as Podman might."""
    real_post = executor.client.api.post

    def post(path: str, *args: Any, **kwargs: Any) -> Any:
        if path == "/containers/create":
            body = json.loads(kwargs["data"])
            drop(body)
            kwargs["data"] = json.dumps(body)
        return real_post(path, *args, **kwargs)

    monkeypatch.setattr(executor.client.api, "post", post)


async def test_refuses_to_run_when_podman_drops_a_limit(
    executor: PodmanExecutor,
    busybox_image: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What Podman does on hosts that cannot apply a limit: create without it.
    _create_dropping(executor, monkeypatch, lambda body: body["resource_limits"].pop("pids"))
    out = out_dir(tmp_path)
    with pytest.raises(FailedPrecondition, match=r"refusing to run: pids limit is \S+, not 64"):
        await executor.run(busybox_image, command=["touch", "/tmp/ran"], output_dir=out)
    assert await executor.containers() == []


async def test_refuses_to_run_without_our_seccomp_profile(
    executor: PodmanExecutor,
    busybox_image: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The profile dropped while inspect still shows it: Podman's default profile
    # (which lets unshare through) is in force, and anvil-exec refuses to run.
    _create_dropping(executor, monkeypatch, lambda body: body.pop("seccomp_profile_path"))
    with pytest.raises(FailedPrecondition, match="seccomp profile of anvil-compute is not in"):
        await executor.run(
            busybox_image, command=["sh", "-c", "echo RAN"], output_dir=out_dir(tmp_path)
        )
    assert await executor.containers() == []


async def test_images_are_pinned_and_never_pulled(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument, match="not pinned by digest"):
        await executor.run("localhost/anvil-busybox:latest", output_dir=out_dir(tmp_path, "a"))
    absent = "docker.io/library/busybox@sha256:" + "0" * 64
    with pytest.raises(FailedPrecondition, match=r"never pulled.*podman load"):
        await executor.run(absent, output_dir=out_dir(tmp_path, "b"))
    # A manifest digest of the loaded image also pins it.
    image = await asyncio.to_thread(executor.client.images.get, busybox_image)
    by_manifest = f"localhost/anvil-busybox@{image.attrs['Digest']}"
    assert await executor.resolve_image(by_manifest) == busybox_image.removeprefix("sha256:")


# -- hostile containers --------------------------------------------------------


async def test_fork_bomb_is_held_by_the_pids_limit(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    # Only builtins once the bomb is off: no fork is left for anything else. The
    # kernel's own count of the container's tasks (pids.current) is sampled: a
    # /proc listing would also count zombies, which no longer hold a pid charge.
    # It counts the forks it refused for the limit in pids.events ("max N").
    script = """
    bomb() { bomb | bomb & }
    bomb &
    for f in /sys/fs/cgroup/pids/pids.current /sys/fs/cgroup/pids.current; do
        [ -r $f ] && current=$f
    done
    most=0; i=0; full=0
    while [ $i -lt 100000 ] && [ $full -lt 3000 ]; do
        read n < $current; [ $n -gt $most ] && most=$n
        [ $most -ge 20 ] && full=$((full + 1))
        i=$((i + 1))
    done
    echo most $most
    for f in /sys/fs/cgroup/pids/pids.events /sys/fs/cgroup/pids.events; do
        [ -r $f ] && read event count < $f && echo $event $count
    done
    exit 0
    """
    limits = ContainerLimits(pids=24, timeout_s=60)
    result = await sh(executor, busybox_image, script, tmp_path, limits=limits)
    assert result.outcome is RunEnd.OK, (result.message, result.stderr[-500:])
    facts = dict(line.split() for line in result.stdout.decode().splitlines())
    # Forks past the limit are refused. The kernel's count may still exceed it by a
    # task moved into the cgroup rather than forked there (the runtime's own
    # helper), which pids.max does not refuse: allow that one, never a runaway.
    assert int(facts["most"]) <= 24 + 1, facts
    assert int(facts["max"]) > 0, facts  # and the bomb did run into it
    assert b"can't fork" in result.stderr


async def test_memory_hog_is_killed_and_reported_as_memory_limit(
    podman_socket: Path, busybox_image: str, tmp_path: Path
) -> None:
    cap = parse_capability(
        "test:hog",
        {
            "podman_image": busybox_image,
            "command": ["sh", "-c", "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo ${#x}"],
            "memory_mib": 32,
        },
    )
    # The cgroup also holds the /output and /tmp tmpfs sizes: keep them small.
    job = await job_executor(podman_socket, tmp_path, max_output_bytes=8 << 20)
    assert job.executor.default_limits.output_bytes == 8 << 20
    try:
        outcome = await job.execute(
            ExecutionRequest(
                job_id="job-hog",
                capability=cap,
                module_path=None,
                inputs=(),
                params={},
                output_dir=out_dir(tmp_path),
                timeout_s=60,
            )
        )
    finally:
        await job.close()
    state, error = ending(outcome)
    assert state is JobState.FAILED
    assert error.startswith("guest hit its memory limit of 32 MiB: the kernel's OOM killer")
    assert (outcome.stdout, outcome.exit_code) == (b"", 137)


async def test_network_egress_is_impossible(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    # A listener on every host address: the container must reach none of them.
    accepted: list[object] = []
    with socket.create_server(("0.0.0.0", 0)) as server:
        server.settimeout(0.2)
        port = server.getsockname()[1]
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    accepted.append(server.accept())

        thread = threading.Thread(target=accept)
        thread.start()
        try:
            host_ip = _host_address()
            script = f"""
            cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '
            echo probe | nc -w 2 {host_ip} {port} && echo CONNECTED
            echo probe | nc -w 2 127.0.0.1 {port} && echo CONNECTED
            wget -q -T 2 -O - http://{host_ip}:{port}/ && echo CONNECTED
            exit 0
            """
            result = await sh(executor, busybox_image, script, tmp_path)
        finally:
            stop.set()
            thread.join()
    assert result.outcome is RunEnd.OK, result.stderr
    assert result.stdout.decode().split() == ["lo"]  # no interface but loopback
    assert b"CONNECTED" not in result.stdout
    assert b"unreachable" in result.stderr.lower() or b"refused" in result.stderr.lower()
    assert accepted == []


def _host_address() -> str:
    """An address of this host other than loopback (the default route's source)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            address = str(probe.getsockname()[0])
        except OSError:
            address = "127.0.0.1"
    return address if not address.startswith("127.") else socket.gethostbyname(socket.gethostname())


async def test_writes_to_rootfs_and_input_are_refused(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path, text_file: Path
) -> None:
    script = """
    for target in /etc/passwd /bin/new /new /var/tmp/new /input/0 /input/new; do
        if echo x > $target; then echo "WROTE $target"; fi
    done
    rm -f /bin/busybox && echo "REMOVED busybox"
    chmod 666 /input/0 && echo "CHMOD input"
    mount -o remount,rw / && echo "REMOUNTED"
    echo fine > /output/ok.txt
    exit 0
    """
    result = await sh(executor, busybox_image, script, tmp_path, inputs=(text_file,))
    assert result.outcome is RunEnd.OK, result.stderr
    assert result.stdout == b"", result.stdout
    assert result.stderr.count(b"Read-only file system") >= 7, result.stderr
    assert await asyncio.to_thread(text_file.read_text) == TEXT
    assert [(f.name, f.path.read_bytes()) for f in result.outputs] == [("ok.txt", b"fine\n")]


async def test_sleep_past_the_deadline_is_killed_and_removed(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    result = await sh(
        executor,
        busybox_image,
        "echo started; sleep 60",
        tmp_path,
        limits=ContainerLimits(timeout_s=1),
    )
    elapsed = time.monotonic() - started
    assert result.outcome is RunEnd.TIMED_OUT, result.message
    assert result.message == (
        "guest timed out after 1 s: the container was killed at its wall-clock deadline"
    )
    assert result.stdout == b"started\n"
    assert 1 <= elapsed < 10, elapsed
    assert await executor.containers() == []


async def test_cancelling_the_run_kills_and_removes_the_container(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    task = asyncio.create_task(sh(executor, busybox_image, "sleep 60", tmp_path))
    await eventually(lambda: _running(executor), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await executor.containers() == []


async def _running(executor: PodmanExecutor) -> bool:
    found = await asyncio.to_thread(
        executor.client.containers.list, all=True, filters={"label": f"{LABEL_OWNER}={OWNER}"}
    )
    return any(c.attrs.get("State") == "running" for c in found)  # list(): State is a string


async def test_containers_left_by_a_crashed_peer_are_removed_at_start(
    podman_socket: Path, busybox_image: str, tmp_path: Path
) -> None:
    async with PodmanExecutor(podman_socket, owner=OWNER) as first:
        await asyncio.to_thread(
            first.client.containers.create,
            busybox_image.removeprefix("sha256:"),
            command=["sleep", "60"],
            labels={LABEL_OWNER: "crashed-peer", LABEL_JOB: "lost"},
        )
        left = await asyncio.to_thread(
            first.client.containers.list, all=True, filters={"label": f"{LABEL_JOB}=lost"}
        )
        assert len(left) == 1
    async with PodmanExecutor(podman_socket, owner="crashed-peer") as second:
        assert await second.containers() == []


# -- GPU -----------------------------------------------------------------------


async def test_gpu_capability_gets_the_cdi_devices(
    podman_socket: Path, busybox_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = parse_capability(
        "gpu:smi",
        {"podman_image": busybox_image, "command": ["true"], "resources": {"gpu": "1"}},
    )
    job = await job_executor(podman_socket, tmp_path)
    sent: list[dict[str, Any]] = []
    _create_dropping(job.executor, monkeypatch, sent.append)
    try:
        outcome = await job.execute(
            ExecutionRequest(
                job_id="job-gpu",
                capability=cap,
                module_path=None,
                inputs=(),
                params={},
                output_dir=out_dir(tmp_path),
                timeout_s=30,
            )
        )
        assert await job.executor.containers() == []
    finally:
        await job.close()
    # Placement: a job that requires a GPU fits this capability, not one without `gpu`.
    assert satisfies(cap.resources, {"gpu": "1"})
    assert not satisfies(
        parse_capability("cpu:only", {"podman_image": busybox_image}).resources, {"gpu": "1"}
    )
    (payload,) = sent
    assert payload["devices"] == [{"path": "nvidia.com/gpu=all"}]
    chosen = await job_executor(
        podman_socket, tmp_path, gpu_devices=["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
    )
    await chosen.close()
    assert chosen.executor.gpu_devices == ("nvidia.com/gpu=0", "nvidia.com/gpu=1")
    assert payload["netns"] == {"nsmode": "none"} and payload["read_only_filesystem"] is True
    # No GPU and no CDI spec on this host: Podman itself refuses the device, at start.
    state, error = ending(outcome)
    assert state is JobState.FAILED
    assert "CDI" in error and "nvidia.com/gpu=all" in error, error

    configured = container_spec(
        image_id="0" * 64,
        env={},
        limits=ContainerLimits(),
        userns=UserNamespace(),
        input_dir=tmp_path,
        init_path=tmp_path,
        exec_helper=tmp_path,
        name="n",
        labels={},
        devices=["nvidia.com/gpu=0", "nvidia.com/gpu=1"],
    )
    assert configured["devices"] == [{"path": "nvidia.com/gpu=0"}, {"path": "nvidia.com/gpu=1"}]


# -- through a real daemon -----------------------------------------------------


@pytest.mark.timeout(180)
async def test_daemon_runs_the_example_capability(
    podman_socket: Path, busybox_image: str, tmp_path: Path, database_url: str, text_file: Path
) -> None:
    secret = tmp_path / "auth.secret"
    secret.write_text("podman-e2e-secret-" + "x" * 40 + "\n")
    secret.chmod(0o600)
    peers = PeerFactory(tmp_path / "peers", database_url, secret)
    config = f"""
[capabilities."demo:busybox-wc"]
podman_image = "{busybox_image}"
command = ["wc", "-w"]
memory_mib = 64
pids = 32
"""
    try:
        peer = await asyncio.to_thread(
            peers.start, config=config, ANVIL_PODMAN_SOCKET=str(podman_socket)
        )
        async with peer.client() as client:
            ref = await client.upload(text_file)
            submitted = await client.submit("demo:busybox-wc", inputs=[ref])
            final = await asyncio.wait_for(client.wait(submitted.job_id), 60)
            # A container capability deployed through the API runs in the same
            # executor, with the same hardening, once its peer has taken it.
            operator = (peer.data_dir / "operator.token").read_text().strip()
            async with ComputeClient(peer.address, token=operator) as admin:
                await admin.deploy(
                    "demo:busybox-id",
                    compute_pb2.Executor(
                        podman=compute_pb2.PodmanExecutor(image=busybox_image, command=["id"])
                    ),
                    peer_id=peer.peer_id,
                )

                async def ready() -> bool:
                    rows = await admin.capabilities("demo:busybox-id")
                    return [r.status for r in rows] == ["ready"]

                await eventually(ready, timeout=30)
            deployed = await client.submit("demo:busybox-id")
            who = await asyncio.wait_for(client.wait(deployed.job_id), 60)
    finally:
        await asyncio.to_thread(peers.stop_all)
    assert PROTO_TO_JOB_STATE[final.state] is JobState.SUCCEEDED, (final.error, peer.log()[-3000:])
    assert final.output == b"9\n"
    assert final.peer_id == peer.peer_id
    assert PROTO_TO_JOB_STATE[who.state] is JobState.SUCCEEDED, (who.error, peer.log()[-3000:])
    assert who.output.startswith(b"uid=65534"), who.output


@pytest.fixture
def empty_podman(tmp_path: Path) -> Iterator[Path]:
    """A private Podman service of its own: no image loaded in it."""
    service = PodmanService(
        tmp_path / "podman",
        containers_conf=CONTAINERS_DIR / "containers.conf",
        private_storage=True,
    )
    try:
        yield service.start()
    finally:
        service.stop()


async def test_a_missing_image_is_loaded_from_its_archive_object(
    empty_podman: Path, busybox_archive: tuple[Path, str], tmp_path: Path, text_file: Path
) -> None:
    archive, image_id = busybox_archive
    store = LocalStore(tmp_path / "store")
    info = store.put_file(archive, bucket="images", key="busybox.oci.tar")
    fetcher = Fetcher(DiskCache(tmp_path / "cache", max_bytes=1 << 30), local=store)
    good = parse_capability(
        "demo:busybox-wc",
        {
            "podman_image": image_id,
            "podman_archive": f"anvil://images/busybox.oci.tar?sha256={info.sha256}",
            "command": ["wc", "-w"],
        },
    )
    wrong = parse_capability(
        "demo:other",
        {
            "podman_image": "sha256:" + "0" * 64,
            "podman_archive": f"anvil://images/busybox.oci.tar?sha256={info.sha256}",
        },
    )
    junk = store.put_bytes(b"not an image archive", bucket="images", key="junk.tar")
    unloadable = parse_capability(
        "demo:junk",
        {
            "podman_image": image_id,
            "podman_archive": f"anvil://images/junk.tar?sha256={junk.sha256}",
        },
    )
    settings = config.load(
        environ={},
        overrides={"data_dir": tmp_path / "data", "podman_socket": str(empty_podman)},
    )
    job = await PodmanJobExecutor.create(settings, fetcher=fetcher)

    def request(cap: Any, name: str) -> ExecutionRequest:
        return ExecutionRequest(
            job_id=name,
            capability=cap,
            module_path=None,
            inputs=(text_file,),
            params={},
            output_dir=tmp_path / name,
            timeout_s=30,
        )

    try:
        with pytest.raises(FailedPrecondition, match="not present"):
            await job.executor.resolve_image(image_id)
        # An archive Podman refuses fails the job (not handed back as an outage).
        junked = await job.execute(request(unloadable, "j-junk"))
        state, error = ending(junked)
        assert state is JobState.FAILED
        assert "cannot be loaded" in error, error
        # Three jobs at once find the image missing: it is loaded once, all run.
        outcomes = await asyncio.gather(*(job.execute(request(good, f"j{i}")) for i in range(3)))
        assert [(ending(o)[0], o.stdout) for o in outcomes] == [(JobState.SUCCEEDED, b"9\n")] * 3
        assert await job.executor.resolve_image(image_id) == image_id.removeprefix("sha256:")
        refused = await job.execute(request(wrong, "j-wrong"))
    finally:
        await job.close()
    state, error = ending(refused)
    assert state is JobState.FAILED
    assert "does not hold image" in error


def test_an_image_archive_needs_a_pinned_image_and_a_valid_ref() -> None:
    with pytest.raises(ConfigError, match="needs podman_image"):
        parse_capability("x:y", {"wasm": "m.wasm", "podman_archive": "anvil://b/k"})
    with pytest.raises(ConfigError, match="podman_archive"):
        parse_capability("x:y", {"podman_image": "sha256:" + "a" * 64, "podman_archive": "ftp://x"})


@pytest.mark.timeout(180)
async def test_daemon_loads_its_image_from_an_uploaded_archive(
    empty_podman: Path,
    busybox_archive: tuple[Path, str],
    tmp_path: Path,
    database_url: str,
    text_file: Path,
) -> None:
    """A fresh host: the image is not there; the capability names its archive object."""
    archive, image_id = busybox_archive
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    # The ref `upload` will give it: content-addressed, known before the peer starts.
    archive_ref = f"anvil://inputs/{digest}/{archive.name}?sha256={digest}"
    secret = tmp_path / "auth.secret"
    secret.write_text("podman-load-secret-" + "x" * 40 + "\n")
    secret.chmod(0o600)
    peers = PeerFactory(tmp_path / "peers", database_url, secret)
    config = f"""
[capabilities."demo:busybox-wc"]
podman_image = "{image_id}"
podman_archive = "{archive_ref}"
command = ["wc", "-w"]
"""
    try:
        peer = await asyncio.to_thread(
            peers.start, config=config, ANVIL_PODMAN_SOCKET=str(empty_podman)
        )
        async with peer.client() as client:
            assert await client.upload(archive) == archive_ref
            ref = await client.upload(text_file)
            submitted = await client.submit("demo:busybox-wc", inputs=[ref])
            final = await asyncio.wait_for(client.wait(submitted.job_id), 120)
    finally:
        await asyncio.to_thread(peers.stop_all)
    assert PROTO_TO_JOB_STATE[final.state] is JobState.SUCCEEDED, (final.error, peer.log()[-3000:])
    assert final.output == b"9\n"
    assert "loading image" in peer.log()
