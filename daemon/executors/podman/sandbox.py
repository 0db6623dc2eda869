"""The sandbox of one container run: its Podman spec, and the checks that Podman applied it.

Pure: no I/O. `container_spec` is the body of Podman's `POST /containers/create`
(libpod's SpecGenerator); `limits_not_applied` compares it with the inspected
container before it starts; `confinement_problems` compares it with what the
kernel reports for the container's first process (/proc/<pid>/...) after it
starts and before the guest's command runs. The executor refuses to run
whenever either finds a difference (daemon/executors/podman/executor.py).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from daemon.exceptions import InvalidArgument

MIB = 1 << 20
PAGE = 4096
CPU_PERIOD_US = 100_000
MIN_MEMORY_BYTES = 6 * MIB  # Podman refuses less
# Our seccomp profile, shipped in the package: Podman (root) reads it at create.
SECCOMP_PROFILE = Path(__file__).with_name("seccomp.json")
# Where the pause process (catatonit, bind-mounted read-only from the host) sits,
# and anvil-exec, which runs the command with /input/0 as its stdin.
INIT_TARGET = "/.anvil-init"
EXEC_TARGET = "/.anvil-exec"
# Folders a guest may make in /output besides its files (inodes of the tmpfs).
OUTPUT_FOLDERS = 64
# Inspect shows the profile through the annotation Podman's own CLI writes with it.
SECCOMP_ANNOTATION = "io.podman.annotations.seccomp"
_CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
_HARDENED = ("nosuid", "nodev", "noexec")


@dataclass(frozen=True, kw_only=True, slots=True)
class ContainerLimits:
    """What one container run may use. Every field is enforced on every run."""

    timeout_s: float = 30.0  # wall clock, from the start of the command
    memory_bytes: int = 256 * MIB  # the guest's processes; no swap
    cpu_millis: int = 1000  # thousandths of a CPU (1000 = one core)
    pids: int = 64  # processes and threads
    stdout_bytes: int = 1 * MIB
    stderr_bytes: int = 64 * 1024
    output_files: int = 1000  # regular files left in /output
    output_bytes: int = 1024 * MIB  # their total size
    tmp_bytes: int = 64 * MIB  # the /tmp tmpfs

    def __post_init__(self) -> None:
        for name in ("cpu_millis", "pids", "stdout_bytes", "stderr_bytes", "tmp_bytes"):
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

    @property
    def output_tmpfs_bytes(self) -> int:
        """Size of the /output tmpfs: the byte limit plus a page per file and folder.

        tmpfs charges whole pages, so a thousand one-byte files take 4 MB of it;
        the byte limit itself is checked exactly when the files are read.
        """
        return _page_up(self.output_bytes) + (self.output_files + OUTPUT_FOLDERS) * PAGE

    @property
    def output_inodes(self) -> int:
        """Inodes of the /output tmpfs: the files, the folders, and /output itself."""
        return self.output_files + OUTPUT_FOLDERS + 1

    @property
    def tmp_inodes(self) -> int:
        return max(1024, self.tmp_bytes // PAGE)

    @property
    def cgroup_memory_bytes(self) -> int:
        """The container's memory limit: tmpfs pages are charged to it, so it holds both."""
        return self.memory_bytes + self.output_tmpfs_bytes + _page_up(self.tmp_bytes)


@dataclass(frozen=True, kw_only=True, slots=True)
class UserNamespace:
    """Container ids 0..size-1 are host ids host_first..host_first+size-1; the guest is uid:gid.

    The host range must belong to nobody on the host (no user, no /etc/subuid
    entry): files a guest makes are owned by host_first + uid.
    """

    host_first: int = 524288
    size: int = 65536
    uid: int = 65534
    gid: int = 65534

    def __post_init__(self) -> None:
        for name in ("host_first", "size", "uid", "gid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"user namespace {name} must be an integer, got {value!r}")
        if self.host_first < 1 or self.size < 1 or self.host_first + self.size > 2**32 - 1:
            raise InvalidArgument(
                f"user namespace range {self.host_first}+{self.size} must leave out host root"
            )
        if not (0 < self.uid < self.size and 0 < self.gid < self.size):
            raise InvalidArgument(
                f"guest uid:gid {self.uid}:{self.gid} must be unprivileged (not 0) and "
                f"inside the mapped range of {self.size}"
            )

    @property
    def host_uid(self) -> int:
        return self.host_first + self.uid

    @property
    def host_gid(self) -> int:
        return self.host_first + self.gid

    @property
    def map_text(self) -> str:
        """One line of /proc/<pid>/uid_map (and of Podman's IDMappings), as `0:first:size`."""
        return f"0:{self.host_first}:{self.size}"


def cpu_quota(cpu_millis: int) -> int:
    """CFS quota in microseconds per `CPU_PERIOD_US` for `cpu_millis` thousandths of a CPU."""
    return max(1000, cpu_millis * CPU_PERIOD_US // 1000)


def guest_argv(
    entrypoint: Sequence[str] | None,
    default_cmd: Sequence[str] | None,
    command: Sequence[str],
    params: Sequence[tuple[str, str]],
) -> list[str]:
    """What runs: the image's entrypoint, then the command (else the image's CMD) and params.

    As `podman run IMAGE COMMAND...` would: the command and params replace the
    image's CMD, and follow its ENTRYPOINT. Raises InvalidArgument when nothing is left.
    """
    argv = [*command, *(f"--{key}={value}" for key, value in params)]
    full = [*(entrypoint or ()), *(argv or default_cmd or ())]
    if not full:
        raise InvalidArgument("the image has no entrypoint or command, and none is configured")
    if any("\0" in part for part in full):
        raise InvalidArgument("command contains a NUL byte")
    return full


def container_spec(
    *,
    image_id: str,
    env: Mapping[str, str],
    limits: ContainerLimits,
    userns: UserNamespace,
    input_dir: Path,
    init_path: Path,
    exec_helper: Path,
    name: str,
    labels: Mapping[str, str],
    devices: Sequence[str] = (),
    seccomp_profile: Path = SECCOMP_PROFILE,
) -> dict[str, Any]:
    """The `POST /containers/create` body of one hardened run. Pure.

    The container's own process is a pause process (catatonit -P); the guest's
    command runs beside it through exec, so that /output, a tmpfs, can still be
    read after the command exits.
    """
    user_map = [{"container_id": 0, "host_id": userns.host_first, "size": userns.size}]
    memory = limits.cgroup_memory_bytes
    return {
        "name": name,
        "image": image_id,
        "labels": dict(labels),
        "entrypoint": [INIT_TARGET, "-P"],
        "command": [],
        "env": dict(env),
        "user": f"{userns.uid}:{userns.gid}",
        "userns": {"nsmode": "private"},
        "idmappings": {"UIDMap": user_map, "GIDMap": user_map},
        "netns": {"nsmode": "none"},
        "read_only_filesystem": True,
        # No tmpfs of Podman's own on /run, /tmp, /var/tmp: only the two below.
        "read_write_tmpfs": False,
        # An image's VOLUME would be an unbounded writable folder on the host's disk.
        "image_volume_mode": "ignore",
        "privileged": False,
        "cap_drop": ["ALL"],
        "no_new_privileges": True,
        "seccomp_policy": "default",  # never a profile named by the image
        "seccomp_profile_path": str(seccomp_profile),
        "annotations": {SECCOMP_ANNOTATION: str(seccomp_profile)},
        "systemd": "false",
        "resource_limits": {
            "memory": {"limit": memory, "swap": memory},
            "cpu": {"period": CPU_PERIOD_US, "quota": cpu_quota(limits.cpu_millis)},
            "pids": {"limit": limits.pids},
        },
        "mounts": [
            _bind(input_dir, "/input", "ro", *_HARDENED),
            _bind(init_path, INIT_TARGET, "ro", "nosuid", "nodev"),
            _bind(exec_helper, EXEC_TARGET, "ro", "nosuid", "nodev"),
            # Podman 4.3 knows no nr_inodes option: it rides in `size`, which runc
            # hands to the kernel as mount data; confinement_problems checks it took.
            # U: owned by the guest's uid; notmpcopyup: nothing of the image's copied in.
            _tmpfs("/output", limits.output_tmpfs_bytes, limits.output_inodes),
            _tmpfs("/tmp", limits.tmp_bytes, limits.tmp_inodes),
        ],
        "devices": [{"path": device} for device in devices],
        # Output comes over the exec stream, capped; a log file would keep it all on disk.
        "log_configuration": {"driver": "none"},
        "stdin": False,
        "terminal": False,
        "stop_signal": int(signal.SIGKILL),
        "stop_timeout": 1,
    }


def _bind(source: Path, target: str, *options: str) -> dict[str, Any]:
    return {"type": "bind", "source": str(source), "destination": target, "options": list(options)}


def _tmpfs(target: str, size: int, inodes: int) -> dict[str, Any]:
    options = [f"size={size},nr_inodes={inodes}", "U", "notmpcopyup", *_HARDENED]
    return {"type": "tmpfs", "source": "tmpfs", "destination": target, "options": options}


def _page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def limits_not_applied(spec: Mapping[str, Any], attrs: Mapping[str, Any]) -> list[str]:
    """What an inspected container has that differs from `spec` (empty: all applied). Pure.

    CDI devices are not checked: Podman resolves them only when the container
    starts. Any other device, mount or tmpfs than the spec's is a difference.
    """
    host: Mapping[str, Any] = attrs.get("HostConfig") or {}
    config: Mapping[str, Any] = attrs.get("Config") or {}
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
    seccomp = [opt.replace(":", "=", 1) for opt in security if opt.startswith("seccomp")]
    expect("seccomp profile", seccomp, [f"seccomp={spec['seccomp_profile_path']}"])
    expect("user", config.get("User"), spec["user"])
    expect("user namespace", host.get("UsernsMode"), "private")
    mappings: Mapping[str, Any] = host.get("IDMappings") or {}
    wanted_map = [_map_text(m) for m in spec["idmappings"]["UIDMap"]]
    expect("uid map", mappings.get("UidMap"), wanted_map)
    expect("gid map", mappings.get("GidMap"), [_map_text(m) for m in spec["idmappings"]["GIDMap"]])
    limits = spec["resource_limits"]
    expect("pids limit", host.get("PidsLimit"), limits["pids"]["limit"])
    expect("memory limit", host.get("Memory"), limits["memory"]["limit"])
    expect("memory+swap limit", host.get("MemorySwap"), limits["memory"]["swap"])
    expect("CPU period", host.get("CpuPeriod"), limits["cpu"]["period"])
    expect("CPU quota", host.get("CpuQuota"), limits["cpu"]["quota"])
    if not spec["devices"]:
        expect("devices", host.get("Devices") or [], [])
    binds = {m["destination"]: m for m in spec["mounts"] if m["type"] == "bind"}
    mounts = {str(m.get("Destination")): m for m in attrs.get("Mounts") or []}
    expect("mounts", sorted(mounts), sorted(binds))
    for target, wanted in binds.items():
        mount = mounts.get(target)
        if mount is None:
            continue
        expect(f"{target} source", mount.get("Source"), wanted["source"])
        expect(f"{target} writable", mount.get("RW"), False)
        missing = set(wanted["options"]) - {"ro"} - set(mount.get("Options") or [])
        if missing:
            problems.append(f"{target} is mounted without {', '.join(sorted(missing))}")
    tmpfs = {m["destination"]: m for m in spec["mounts"] if m["type"] == "tmpfs"}
    shown: Mapping[str, str] = host.get("Tmpfs") or {}
    expect("tmpfs mounts", sorted(shown), sorted(tmpfs))
    for target, wanted in tmpfs.items():
        if target not in shown:
            continue
        have = set(str(shown[target]).split(","))
        # The size option holds a comma itself; Podman keeps notmpcopyup to itself.
        want = {part for opt in wanted["options"] for part in opt.split(",")} - {"notmpcopyup"}
        missing = want - have
        if missing:
            problems.append(f"tmpfs {target} lacks {', '.join(sorted(missing))}")
        if "tmpcopyup" in have:
            problems.append(f"tmpfs {target} gets the image's files copied in (tmpcopyup)")
    expect("image", attrs.get("Image"), spec["image"])
    return problems


def _map_text(entry: Mapping[str, int]) -> str:
    return f"{entry['container_id']}:{entry['host_id']}:{entry['size']}"


def confinement_problems(
    *,
    status: str,
    uid_map: str,
    gid_map: str,
    mountinfo: str,
    limits: ContainerLimits,
    userns: UserNamespace,
) -> list[str]:
    """What the kernel says of the container's first process that differs from the sandbox. Pure.

    `status`, `uid_map`, `gid_map` and `mountinfo` are the texts of
    /proc/<pid>/{status,uid_map,gid_map,mountinfo}, read from the host.
    """
    problems: list[str] = []
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    fields = {key: value.strip() for key, value in fields.items()}
    for key, host_id in (("Uid", userns.host_uid), ("Gid", userns.host_gid)):
        ids = fields.get(key, "").split()
        if not ids or any(i != str(host_id) for i in ids):
            problems.append(f"process {key.lower()}s are {ids!r}, not host {host_id}")
    held = [key for key in _CAP_FIELDS if int(fields.get(key, "1") or "1", 16)]
    if held:
        problems.append(f"the process holds capabilities ({', '.join(held)})")
    if fields.get("NoNewPrivs") != "1":
        problems.append("no-new-privileges is off")
    if fields.get("Seccomp") != "2":
        problems.append(f"no seccomp filter (Seccomp: {fields.get('Seccomp')!r})")
    wanted_map = userns.map_text.split(":")
    for what, text in (("uid", uid_map), ("gid", gid_map)):
        if text.split() != wanted_map:
            problems.append(
                f"{what} map is {' '.join(text.split())!r}, not {' '.join(wanted_map)!r}"
            )
    mounts = _mount_table(mountinfo)
    root = mounts.get("/")
    if root is None or "ro" not in root[0]:
        problems.append("the root filesystem is not read-only")
    inputs = mounts.get("/input")
    if inputs is None or not {"ro", *_HARDENED} <= inputs[0]:
        problems.append(f"/input is not mounted ro,nosuid,nodev,noexec ({inputs!r})")
    for target, size_bytes, inodes in (
        ("/output", limits.output_tmpfs_bytes, limits.output_inodes),
        ("/tmp", limits.tmp_bytes, limits.tmp_inodes),
    ):
        wanted = {f"size={_page_up(size_bytes) // 1024}k", f"nr_inodes={inodes}"}
        mount = mounts.get(target)
        if mount is None or mount[1] != "tmpfs":
            problems.append(f"{target} is not a tmpfs ({mount!r})")
        elif not set(_HARDENED) <= mount[0] or not wanted <= mount[2]:
            problems.append(
                f"{target} is mounted {','.join(sorted(mount[0]))} with "
                f"{','.join(sorted(mount[2]))}, not {','.join(_HARDENED)} with "
                f"{','.join(sorted(wanted))}"
            )
    return problems


def _mount_table(mountinfo: str) -> dict[str, tuple[set[str], str, set[str]]]:
    """Mount point -> (mount options, filesystem type, superblock options); the last one wins."""
    table: dict[str, tuple[set[str], str, set[str]]] = {}
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(rest) < 3:
            continue
        table[fields[4]] = (set(fields[5].split(",")), rest[0], set(rest[2].split(",")))
    return table
