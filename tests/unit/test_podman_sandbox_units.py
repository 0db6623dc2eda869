"""The container sandbox's pure parts: sizes, user namespace, seccomp profile, kernel checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.exceptions import InvalidArgument
from daemon.executors.podman.sandbox import (
    EXEC_TARGET,
    INIT_TARGET,
    MIB,
    SECCOMP_PROFILE,
    ContainerLimits,
    UserNamespace,
    confinement_problems,
    container_spec,
    guest_argv,
)

# What the issue names, and the rest of what a capability-less container never needs.
DENIED = {
    "unshare", "setns", "mount", "umount", "umount2", "mount_setattr", "move_mount",
    "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "pivot_root", "chroot",
    "keyctl", "add_key", "request_key", "bpf", "ptrace", "process_vm_readv",
    "process_vm_writev", "kcmp", "pidfd_getfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "perf_event_open", "userfaultfd", "modify_ldt", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "syslog", "quotactl", "open_by_handle_at", "lookup_dcookie",
    "settimeofday", "clock_settime", "iopl", "ioperm", "vm86", "uselib", "fanotify_init",
    "sethostname", "setdomainname", "socketcall",  # 32-bit x86: sockets past the family filter
    "personality", "socket",  # allowed only with the arguments checked below
}  # fmt: skip
CLONE_NEW = {  # every namespace flag clone(2) takes
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}


def profile() -> dict[str, object]:
    loaded: dict[str, object] = json.loads(SECCOMP_PROFILE.read_text())
    return loaded


def test_seccomp_profile_allows_no_escape_hatch() -> None:
    rules = profile()["syscalls"]
    assert isinstance(rules, list)
    unconditional = {
        name
        for rule in rules
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
        for name in rule["names"]
    }
    assert unconditional & DENIED == set()
    assert profile()["defaultAction"] == "SCMP_ACT_ERRNO" and profile()["defaultErrnoRet"] == 1
    (clone,) = [r for r in rules if r["names"] == ["clone"]]
    (arg,) = clone["args"]
    assert (arg["index"], arg["op"], arg["valueTwo"]) == (0, "SCMP_CMP_MASKED_EQ", 0)
    for flag, bit in CLONE_NEW.items():
        assert arg["value"] & bit, flag
    (clone3,) = [r for r in rules if r["names"] == ["clone3"]]
    assert (clone3["action"], clone3["errnoRet"]) == ("SCMP_ACT_ERRNO", 38)  # ENOSYS
    (socket,) = [r for r in rules if r["names"] == ["socket"]]
    assert socket["args"] == [{"index": 0, "value": 40, "valueTwo": 0, "op": "SCMP_CMP_NE"}]
    personalities = [r["args"][0]["value"] for r in rules if r["names"] == ["personality"]]
    assert sorted(personalities) == [0, 8, 0x20000, 0x20008, 0xFFFFFFFF]
    # Ordinary programs still run.
    assert {"read", "write", "execve", "mmap", "futex", "clone"} <= unconditional | {"clone"}


def test_derived_sizes() -> None:
    limits = ContainerLimits(memory_bytes=64 * MIB, output_bytes=10 * MIB, output_files=100)
    assert limits.output_tmpfs_bytes == 10 * MIB + (100 + 64) * 4096
    assert limits.output_inodes == 100 + 64 + 1
    assert limits.tmp_inodes == 64 * MIB // 4096
    assert limits.cgroup_memory_bytes == 64 * MIB + limits.output_tmpfs_bytes + 64 * MIB
    # Zero outputs allowed still gives a tmpfs with a size (size=0 would mean unbounded).
    empty = ContainerLimits(output_bytes=0, output_files=0)
    assert empty.output_tmpfs_bytes > 0 and empty.output_inodes > 0
    with pytest.raises(InvalidArgument, match="tmp_bytes"):
        ContainerLimits(tmp_bytes=0)


def test_user_namespace_leaves_out_host_root() -> None:
    userns = UserNamespace()
    assert (userns.host_uid, userns.host_gid, userns.map_text) == (589822, 589822, "0:524288:65536")
    for bad in (
        {"host_first": 0},
        {"uid": 0},
        {"gid": 0},
        {"uid": 65536},
        {"size": 0},
        {"host_first": 2**32 - 10},
    ):
        with pytest.raises(InvalidArgument):
            UserNamespace(**bad)


def test_guest_argv_follows_podman_run() -> None:
    assert guest_argv(None, ["sh"], [], []) == ["sh"]
    assert guest_argv(["/entry"], ["default"], [], []) == ["/entry", "default"]
    assert guest_argv(["/entry"], ["default"], ["wc", "-w"], [("k", "v")]) == [
        "/entry",
        "wc",
        "-w",
        "--k=v",
    ]
    assert guest_argv(None, ["default"], [], [("k", "v")]) == ["--k=v"]
    with pytest.raises(InvalidArgument, match="no entrypoint or command"):
        guest_argv(None, None, [], [])


def test_spec_runs_the_pause_process_and_hardens_every_mount(tmp_path: Path) -> None:
    spec = container_spec(
        image_id="0" * 64,
        env={"ANVIL_PARAM_X": "1"},
        limits=ContainerLimits(output_bytes=MIB, output_files=10, tmp_bytes=2 * MIB),
        userns=UserNamespace(),
        input_dir=tmp_path,
        init_path=Path("/usr/bin/catatonit"),
        exec_helper=Path("/x/anvil-exec"),
        name="n",
        labels={},
    )
    assert spec["entrypoint"] == [INIT_TARGET, "-P"] and spec["user"] == "65534:65534"
    assert spec["seccomp_profile_path"] == str(SECCOMP_PROFILE)
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert set(mounts) == {"/input", "/output", "/tmp", INIT_TARGET, EXEC_TARGET}
    for target in ("/input", "/output", "/tmp"):
        assert {"nosuid", "nodev", "noexec"} <= set(mounts[target]["options"]), target
    assert mounts["/output"]["options"][0] == f"size={MIB + 74 * 4096},nr_inodes=75"


STATUS = """Name:\tcatatonit
Uid:\t589822\t589822\t589822\t589822
Gid:\t589822\t589822\t589822\t589822
CapInh:\t0000000000000000
CapPrm:\t0000000000000000
CapEff:\t0000000000000000
CapBnd:\t0000000000000000
CapAmb:\t0000000000000000
NoNewPrivs:\t1
Seccomp:\t2
"""
MOUNTINFO = """100 75 0:41 / / ro,relatime - overlay overlay rw,lowerdir=/x
101 100 0:44 /in /input ro,nosuid,nodev,noexec,relatime - ext4 /dev/vda rw
102 100 0:46 / /output rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,size=1320k,nr_inodes=75
103 100 0:47 / /tmp rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,size=65536k,nr_inodes=16384
"""
MAP = "         0     524288      65536\n"


def check(**changes: str) -> list[str]:
    texts = {"status": STATUS, "uid_map": MAP, "gid_map": MAP, "mountinfo": MOUNTINFO, **changes}
    return confinement_problems(
        **texts,
        limits=ContainerLimits(output_bytes=1 << 20, output_files=10),
        userns=UserNamespace(),
    )


def test_the_kernel_check_passes_the_sandbox_and_names_what_is_missing() -> None:
    assert check() == []
    as_root = STATUS.replace("589822", "0")
    assert check(status=as_root) == [
        "process uids are ['0', '0', '0', '0'], not host 589822",
        "process gids are ['0', '0', '0', '0'], not host 589822",
    ]
    assert check(
        status=STATUS.replace("CapEff:\t0000000000000000", "CapEff:\t00000000a80425fb")
    ) == ["the process holds capabilities (CapEff)"]
    assert check(status=STATUS.replace("Seccomp:\t2", "Seccomp:\t0")) == [
        "no seccomp filter (Seccomp: '0')"
    ]
    assert check(status=STATUS.replace("NoNewPrivs:\t1", "NoNewPrivs:\t0")) == [
        "no-new-privileges is off"
    ]
    assert check(uid_map="0 0 4294967295") == ["uid map is '0 0 4294967295', not '0 524288 65536'"]
    writable_root = MOUNTINFO.replace("/ / ro,relatime", "/ / rw,relatime")
    assert check(mountinfo=writable_root) == ["the root filesystem is not read-only"]
    exec_output = MOUNTINFO.replace("/output rw,nosuid,nodev,noexec", "/output rw,nosuid,nodev")
    (problem,) = check(mountinfo=exec_output)
    assert problem.startswith("/output is mounted")
    unbounded = MOUNTINFO.replace(",nr_inodes=75", "")
    (problem,) = check(mountinfo=unbounded)
    assert "nr_inodes=75" in problem
    on_disk = MOUNTINFO.replace(
        "/output rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs", "/output rw - ext4 /dev/vda"
    )
    assert check(mountinfo=on_disk)[0].startswith("/output is not a tmpfs")
