"""A hostile tenant against the container sandbox (issue 27), through the real executor.

Each test is one of the issue's attacks, run against the private Podman
service of conftest.py, as root and, in the last test, as a daemon with its
own user and umask 0027 the way the shipped unit runs it. Nothing skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import platform
import pwd
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon import config
from daemon.capability_config import parse_capability
from daemon.executors.podman import example_image
from daemon.executors.podman.executor import ContainerLimits, PodmanExecutor
from daemon.executors.podman.job import PodmanJobExecutor
from daemon.executors.podman.service import PodmanService
from daemon.executors.result import ExecutionRequest, ExecutionResult, RunEnd, ending
from daemon.jobs.state import JobState
from tests.integration.containers import OWNER, TEXT, sh
from tests.readable_copy import readable_copy

pytestmark = pytest.mark.podman

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
DAEMON_USER = "anvil-podman-test"

# Freestanding x86-64 program (no C library): tries the system calls behind
# container escapes, one line each, "<name> <result>" (a negative errno on failure).
PROBE_C = r"""
static long sys6(long n, long a, long b, long c, long d, long e, long f) {
    long ret;
    register long r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10),
                     "r"(r8), "r"(r9) : "rcx", "r11", "memory");
    return ret;
}
static void out(const char *s) { long n = 0; while (s[n]) n++; sys6(1, 1, (long)s, n, 0, 0, 0); }
static void report(const char *what, long rc) {
    char buf[24]; int i = 23; buf[i] = 0;
    long v = rc < 0 ? -rc : rc;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    if (rc < 0) buf[--i] = '-';
    out(what); out(" "); out(buf + i); out("\n");
}
static long child_or_result(long pid) {
    if (pid == 0) sys6(60, 0, 0, 0, 0, 0, 0);  /* the child exits at once */
    return pid > 0 ? 0 : pid;
}
__attribute__((force_align_arg_pointer)) void _start(void) {
    report("clone", child_or_result(sys6(56, 0x10000000 | 0x20000 | 17, 0, 0, 0, 0, 0)));
    unsigned long args[11] = {0x10000000, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0};
    report("clone3", child_or_result(sys6(435, (long)args, 88, 0, 0, 0, 0)));
    report("mount", sys6(165, (long)"none", (long)"/tmp", (long)"tmpfs", 0, 0, 0));
    report("keyctl", sys6(250, 0, -3, 1, 0, 0, 0));  /* KEYCTL_GET_KEYRING_ID, session */
    report("ptrace", sys6(101, 0, 0, 0, 0, 0, 0));  /* PTRACE_TRACEME */
    report("bpf", sys6(321, 0, 0, 0, 0, 0, 0));
    report("io_uring_setup", sys6(425, 1, 0, 0, 0, 0, 0));
    report("perf_event_open", sys6(298, 0, 0, -1, -1, 0, 0));
    report("setns", sys6(308, 0, 0, 0, 0, 0, 0));
    report("vsock", sys6(41, 40, 1, 0, 0, 0, 0));  /* AF_VSOCK: a way to the host past netns */
    report("unshare", sys6(272, 0x10000000 | 0x20000, 0, 0, 0, 0, 0));  /* last: it would stick */
    report("getpid", sys6(39, 0, 0, 0, 0, 0, 0) > 0 ? 0 : -1);
    sys6(231, 0, 0, 0, 0, 0, 0);
}
"""
EPERM, ENOSYS = -1, -38


@pytest.fixture(scope="session")
async def probe_image(podman_socket: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The example busybox image plus /bin/probe (PROBE_C, built with Zig). Its `sha256:` id."""
    archive, image_id = await asyncio.to_thread(
        _build_probe_image, tmp_path_factory.mktemp("probe")
    )
    async with PodmanExecutor(podman_socket, owner=OWNER) as ex:
        assert await ex.load_image(archive) == (image_id.removeprefix("sha256:"),)
    return image_id


def _build_probe_image(folder: Path) -> tuple[Path, str]:
    assert platform.machine() == "x86_64", "the probe is x86-64 code"
    (folder / "probe.c").write_text(PROBE_C)
    zig_cc = [sys.executable, "-m", "ziglang", "cc", "--target=x86_64-linux-none"]
    flags = ["-ffreestanding", "-nostdlib", "-static", "-O2"]
    subprocess.run([*zig_cc, *flags, "-o", "probe", "probe.c"], cwd=folder, check=True)
    busybox = Path("/bin/busybox")
    listed = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    layer = io.BytesIO(example_image.rootfs_layer(busybox.read_bytes(), listed.stdout.split()))
    probe = (folder / "probe").read_bytes()
    with tarfile.open(fileobj=layer, mode="a") as tar:
        info = tarfile.TarInfo("bin/probe")
        info.size, info.mode = len(probe), 0o755
        tar.addfile(info, io.BytesIO(probe))
    archive, image_id = example_image.oci_archive(
        layer.getvalue(), name="localhost/anvil-probe:latest", architecture="amd64"
    )
    (folder / "probe.oci.tar").write_bytes(archive)
    return folder / "probe.oci.tar", image_id


@dataclass(frozen=True)
class JobEnd:
    """What the runner makes of a run: its job state, error and output files."""

    state: JobState
    error: str
    output_files: tuple[Path, ...]

    @classmethod
    def of(cls, result: ExecutionResult) -> JobEnd:
        state, error = ending(result)
        return cls(state, error, tuple(f.path for f in result.outputs))


async def run_job(
    podman_socket: Path, image: str, script: str, tmp_path: Path, **settings: Any
) -> tuple[JobEnd, Path]:
    """`sh -c script` as a job of the runner's executor, built from settings as `serve` builds
    it; (how the job ends, the job's output folder)."""
    job = await PodmanJobExecutor.create(
        config.load(
            environ={},
            overrides={
                "data_dir": tmp_path / "data",
                "podman_socket": str(podman_socket),
                **settings,
            },
        )
    )
    output_dir = tmp_path / "data" / "job.out"
    cap = parse_capability("test:sandbox", {"podman_image": image, "command": ["sh", "-c", script]})
    try:
        outcome = await job.execute(
            ExecutionRequest(
                job_id="job-sandbox",
                capability=cap,
                module_path=None,
                inputs=(),
                params={},
                output_dir=output_dir,
                timeout_s=60,
            )
        )
        assert await job.executor.containers() == []
    finally:
        await job.close()
    return JobEnd.of(outcome), output_dir


def mounts_inside(stdout: bytes) -> dict[str, set[str]]:
    """Mount point -> its per-mount options, from /proc/self/mountinfo lines."""
    found = {}
    for line in stdout.decode().splitlines():
        fields = line.split()
        if len(fields) > 6 and fields[4] in ("/input", "/output", "/tmp"):
            found[fields[4]] = set(fields[5].split(","))
    return found


def disk_use(folder: Path) -> int:
    """Bytes of disk the files under `folder` take (what `du` counts)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # files come and go while a run is sampled
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


# -- host root -----------------------------------------------------------------


async def test_the_guest_is_an_unprivileged_user_mapped_to_no_host_user(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    script = """
    echo uid $(id -u) $(id -g)
    echo map $(cat /proc/self/uid_map) / $(cat /proc/self/gid_map)
    grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\t' | tr : ' '
    """
    result = await sh(executor, busybox_image, script, tmp_path)
    assert result.outcome is RunEnd.OK, result.stderr
    facts = dict(line.split(None, 1) for line in result.stdout.decode().splitlines())
    assert facts["uid"] == "65534 65534"
    # Container 0..65535 are host 524288..: the guest is host uid 589822, root is 524288.
    assert facts["map"] == "0 524288 65536 / 0 524288 65536"
    assert facts["CapEff"] == facts["CapPrm"] == facts["CapBnd"] == "0000000000000000"
    assert (facts["NoNewPrivs"], facts["Seccomp"]) == ("1", "2")


async def test_a_setuid_binary_left_in_output_is_inert_on_the_host(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path, text_file: Path
) -> None:
    script = """
    cp /bin/busybox /output/rootsh && chmod 6755 /output/rootsh && ls -ln /output/rootsh
    /output/rootsh true && echo RAN-FROM-OUTPUT
    cp /bin/busybox /tmp/sh2 && chmod 755 /tmp/sh2 && /tmp/sh2 true && echo RAN-FROM-TMP
    mknod /tmp/mem c 1 1 && echo MADE-A-DEVICE
    grep -E ' /(input|output|tmp) ' /proc/self/mountinfo
    exit 0
    """
    result = await sh(executor, busybox_image, script, tmp_path, inputs=(text_file,))
    assert result.outcome is RunEnd.OK, result.stderr
    stdout = result.stdout.decode()
    assert stdout.startswith("-rwsr-sr-x"), stdout  # the guest did set the bits, inside
    for did in ("RAN-FROM-OUTPUT", "RAN-FROM-TMP", "MADE-A-DEVICE"):
        assert did not in stdout
    mounts = mounts_inside(result.stdout)
    assert {"rw", "nosuid", "nodev", "noexec"} <= mounts["/output"]
    assert {"rw", "nosuid", "nodev", "noexec"} <= mounts["/tmp"]
    assert {"ro", "nosuid", "nodev", "noexec"} <= mounts["/input"]
    (output,) = result.outputs
    info = output.path.stat()
    # On the host: the daemon's file, never set-id, not even executable.
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_IMODE(info.st_mode) & (stat.S_ISUID | stat.S_ISGID | 0o111) == 0
    busybox = await asyncio.to_thread(Path("/bin/busybox").read_bytes)
    assert await asyncio.to_thread(output.path.read_bytes) == busybox


# -- namespaces ----------------------------------------------------------------


async def test_namespaces_mount_keyctl_and_ptrace_are_refused(
    executor: PodmanExecutor, probe_image: str, tmp_path: Path
) -> None:
    script = """
    unshare -U -m true && echo NEW-USERNS
    unshare -n true && echo NEW-NETNS
    unshare -r id && echo ROOT-IN-USERNS
    nsenter -t 1 -m true && echo JOINED-MNTNS
    mount -t tmpfs none /tmp && echo MOUNTED
    probe
    """
    result = await sh(executor, probe_image, script, tmp_path)
    assert result.outcome is RunEnd.OK, result.stderr
    lines = result.stdout.decode().splitlines()
    assert not [line for line in lines if " " not in line], lines  # none of the shell's got through
    probe = {name: int(value) for name, value in (line.split() for line in lines)}
    assert probe == {
        "clone": EPERM,  # with CLONE_NEWUSER | CLONE_NEWNS
        "clone3": ENOSYS,  # C libraries fall back to clone
        "mount": EPERM,
        "keyctl": EPERM,
        "ptrace": EPERM,
        "bpf": EPERM,
        "io_uring_setup": EPERM,
        "perf_event_open": EPERM,
        "setns": EPERM,
        "vsock": EPERM,
        "unshare": EPERM,
        "getpid": 0,  # the probe itself works
    }
    assert b"unshare(0x10020000): Operation not permitted" in result.stderr


# -- /output bounded while the job runs, nothing kept of a refused one ---------


async def test_output_past_the_byte_limit_fails_and_the_disk_stays_bounded(
    podman_socket: Path, busybox_image: str, tmp_path: Path
) -> None:
    # 1 GiB asked for, 16 MiB allowed; the guest ignores the errors and exits 0.
    script = "dd if=/dev/zero of=/output/big bs=1M count=1024 2>/dev/null; sleep 1; exit 0"
    most, stop = 0, threading.Event()

    def sample() -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, disk_use(tmp_path))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        outcome, output_dir = await run_job(
            podman_socket, busybox_image, script, tmp_path, max_output_bytes=16 * MIB
        )
    finally:
        stop.set()
        sampler.join()
    assert outcome.state is JobState.FAILED
    assert outcome.error.startswith(
        "guest output too large: more than 16 MiB left in /output, over the limit of 16 MiB"
    ), outcome.error
    assert outcome.output_files == () and not output_dir.exists()
    assert most < 16 * MIB + 64 * MIB, most  # nothing of it touched the disk, in fact


async def test_a_sparse_file_does_not_pass_for_small(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    # 100 GiB by its size, no page on the tmpfs: refused without reading 100 GiB.
    limits = ContainerLimits(output_bytes=MIB)
    started = time.monotonic()
    result = await sh(
        executor, busybox_image, "truncate -s 100G /output/sparse", tmp_path, limits=limits
    )
    assert result.outcome is RunEnd.OUTPUT_TOO_LARGE, result.message
    assert "over the limit of 1 MiB" in result.message
    assert result.outputs == ()
    assert time.monotonic() - started < 10


async def test_too_many_output_files_fail_and_nothing_is_kept(
    podman_socket: Path, busybox_image: str, tmp_path: Path
) -> None:
    many = "i=0; while [ $i -lt {n} ]; do echo $i > /output/f$i; i=$((i+1)); done; exit 0"
    outcome, output_dir = await run_job(
        podman_socket, busybox_image, many.format(n=1500), tmp_path / "a", max_output_files=1000
    )
    assert outcome.state is JobState.FAILED
    assert outcome.error.startswith(
        "guest output too large: more than 1000 files left in /output, over the limit of 1000"
    ), outcome.error
    assert outcome.output_files == () and not output_dir.exists()
    # The limit itself is fine.
    outcome, output_dir = await run_job(
        podman_socket, busybox_image, many.format(n=1000), tmp_path / "b", max_output_files=1000
    )
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    assert len(outcome.output_files) == 1000
    assert (output_dir / "f999").read_text() == "999\n"


async def test_tmp_is_writable_and_bounded(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    script = """
    dd if=/dev/zero of=/tmp/a bs=1M count=4 2>/dev/null && echo WROTE-4-MIB
    dd if=/dev/zero of=/tmp/b bs=1M count=64 2>&1 | grep -o 'No space left on device'
    exit 0
    """
    result = await sh(
        executor, busybox_image, script, tmp_path, limits=ContainerLimits(tmp_bytes=8 * MIB)
    )
    assert result.outcome is RunEnd.OK, result.stderr
    assert result.stdout.decode().split("\n")[:2] == ["WROTE-4-MIB", "No space left on device"]
    assert result.outputs == ()  # /tmp is no output


# -- reports that tell the truth -----------------------------------------------


async def test_exit_137_is_a_plain_nonzero_exit(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    for script in ("exit 137", "kill -9 $$"):
        result = await sh(executor, busybox_image, script, tmp_path)
        assert (result.outcome, result.exit_code) == (RunEnd.NONZERO_EXIT, 137), script
        assert result.message == "guest exited with code 137"


async def test_a_real_oom_is_reported_as_the_memory_limit(
    executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    # The shell keeps the whole string: far past 32 MiB plus the small tmpfs sizes.
    limits = ContainerLimits(memory_bytes=32 * MIB, output_bytes=MIB, tmp_bytes=MIB)
    script = "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo ${#x}"
    result = await sh(executor, busybox_image, script, tmp_path, limits=limits)
    assert result.outcome is RunEnd.MEMORY_LIMIT, (result.message, result.stderr)
    assert result.message.startswith("guest hit its memory limit of 32 MiB: the kernel's OOM")


async def test_a_cpu_bound_timeout_says_the_container_was_killed(
    podman_socket: Path, executor: PodmanExecutor, busybox_image: str, tmp_path: Path
) -> None:
    limits = ContainerLimits(timeout_s=1)
    result = await sh(executor, busybox_image, "while :; do :; done", tmp_path, limits=limits)
    assert result.outcome is RunEnd.TIMED_OUT
    assert result.message == (
        "guest timed out after 1 s: the container was killed at its wall-clock deadline"
    )
    assert "host call" not in result.message


# -- the daemon as its own user, as the shipped unit runs it --------------------


@pytest.fixture(scope="session")
def daemon_user() -> tuple[int, int]:
    """(uid, gid) of a system user standing in for the unit's `anvil-compute`."""
    try:
        entry = pwd.getpwnam(DAEMON_USER)
    except KeyError:
        account = ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", DAEMON_USER]
        useradd = ["useradd", "--system", "--user-group", "--no-create-home", *account]
        subprocess.run(useradd, check=True)
        entry = pwd.getpwnam(DAEMON_USER)
    assert entry.pw_uid != 0
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def user_podman_socket(daemon_user: tuple[int, int]) -> Iterator[Path]:
    """A private rootful Podman service whose socket only root and the daemon's group use."""
    folder = Path(tempfile.mkdtemp(prefix="anvil-podman-", dir="/tmp"))
    folder.chmod(0o711)
    service = PodmanService(
        folder, containers_conf=REPO / "guest_modules/containers/containers.conf"
    )
    try:
        socket = service.start()
        os.chown(socket, 0, daemon_user[1])
        socket.chmod(0o660)
        yield socket
    finally:
        service.stop()
        shutil.rmtree(folder, ignore_errors=True)


NON_ROOT_RUN = """
import asyncio, json, os, stat, sys
from pathlib import Path

os.umask(0o027)  # the shipped unit's UMask=
from daemon.executors.podman.executor import PodmanExecutor

async def main(socket, image):
    data = Path.cwd() / "data"
    data.mkdir()
    text = data / "text.txt"
    text.write_text({text!r})
    script = (
        "wc -w; id -u; cat /input/0 > /output/copy.txt; mkdir /output/sub; "
        "id -u > /output/sub/uid"
    )
    scratch = data / "podman-scratch"
    async with PodmanExecutor(socket, owner="anvil-non-root", scratch_dir=scratch) as ex:
        result = await ex.run(image, command=["sh", "-c", script], inputs=[text],
                              output_dir=data / "job.out", job_id="non-root")
        left = await ex.containers()
    files = {{}}
    for f in result.outputs:
        info = f.path.stat()
        files[f.name] = [f.path.read_text(), oct(stat.S_IMODE(info.st_mode)), info.st_uid]
    print(json.dumps({{
        "outcome": result.outcome.value, "message": result.message,
        "stdout": result.stdout.decode(), "stderr": result.stderr.decode(),
        "files": files, "input_mode": oct(stat.S_IMODE(text.stat().st_mode)),
        "uid": os.getuid(), "left": left,
    }}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_daemon_running_as_its_own_user_with_umask_0027_runs_containers(
    user_podman_socket: Path, busybox_image: str, daemon_user: tuple[int, int]
) -> None:
    uid, _ = daemon_user
    report = await asyncio.to_thread(_run_as, daemon_user, user_podman_socket, busybox_image)
    assert report["uid"] == uid
    assert (report["outcome"], report["stderr"]) == ("ok", ""), report
    assert report["stdout"] == "9\n65534\n"
    # Written by the daemon from the guest's tmpfs: its own files, under its umask.
    assert report["files"] == {
        "copy.txt": [TEXT, "0o640", uid],
        "sub/uid": ["65534\n", "0o640", uid],
    }
    assert report["input_mode"] == "0o640"  # copied for the guest, never changed
    assert report["left"] == []


def _run_as(user: tuple[int, int], socket: Path, image: str) -> dict[str, Any]:
    """NON_ROOT_RUN as `user` in a folder of its own; its report."""
    uid, gid = user
    work = Path(tempfile.mkdtemp(prefix="anvil-non-root-", dir="/tmp"))
    try:
        os.chown(work, uid, gid)
        work.chmod(0o700)
        script = work / "run.py"
        script.write_text(NON_ROOT_RUN.format(text=TEXT))
        os.chown(script, uid, gid)
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(work),
            "PYTHONPATH": readable_copy(work / "src"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--"]
        done = subprocess.run(
            [*as_user, sys.executable, str(script), str(socket), image],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report: dict[str, Any] = json.loads(done.stdout)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
