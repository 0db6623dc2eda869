"""A worker process's own mount namespace, and the tmpfs mounts made in it (Linux, ctypes).

Python 3.11 has neither `os.unshare` nor `mount`: libc's are called here, the
one place that does, with errno checked. Every refusal becomes Unavailable
with a one-line reason saying what was refused and what usually refuses it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from daemon.exceptions import Unavailable

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

_TMPFS_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
_HINT = (
    "a systemd unit needs RestrictNamespaces=user mnt and SystemCallFilter= to allow mount "
    "and umount2; a container needs user namespaces or CAP_SYS_ADMIN"
)


@dataclass(frozen=True, slots=True)
class PrivateMounts:
    """Proof that this process has its own mount namespace, with nothing shared back:
    only `enter()` makes one, and only mounts given one are made."""

    # In a user namespace of its own too: not root, or root without CAP_SYS_ADMIN.
    user_namespace: bool


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


_libc: ctypes.CDLL | None = None


def _call(name: str, *args: object) -> None:
    """libc's `name`(*args); raises OSError with its errno when it returns non-zero."""
    global _libc  # noqa: PLW0603 - loaded once, on first use
    if _libc is None:
        _libc = _load_libc()
    if getattr(_libc, name)(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def enter() -> PrivateMounts:
    """Move this process into its own mount namespace whose mounts never propagate.

    As root: unshare(CLONE_NEWNS). Otherwise (or when root may not): a user
    namespace too, mapping only our own uid and gid to themselves (setgroups
    denied), which gives no power outside it. Must run before the process
    starts a thread (the kernel refuses a multi-threaded unshare). Raises
    Unavailable with the reason.
    """
    user_ns = os.geteuid() != 0
    if not user_ns:
        try:
            _call("unshare", CLONE_NEWNS)
        except OSError as exc:
            if exc.errno != errno.EPERM:
                raise _refused("unshare(CLONE_NEWNS)", exc) from exc
            user_ns = True  # root without CAP_SYS_ADMIN, e.g. in a container
    if user_ns:
        uid, gid = os.geteuid(), os.getegid()
        try:
            _call("unshare", CLONE_NEWUSER | CLONE_NEWNS)
        except OSError as exc:
            raise _refused("unshare(CLONE_NEWUSER|CLONE_NEWNS)", exc) from exc
        try:
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
            Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        except OSError as exc:
            raise _refused("mapping our uid and gid in the new user namespace", exc) from exc
    try:
        _call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    except OSError as exc:
        raise _refused("mount(/, MS_REC|MS_PRIVATE)", exc) from exc
    return PrivateMounts(user_namespace=user_ns)


def mount_tmpfs(
    _: PrivateMounts, path: Path, *, size: int, inodes: int, remount: bool = False
) -> None:
    """Mount (or remount with new bounds) a tmpfs of `size` bytes and `inodes` names
    on `path`: nosuid, nodev, noexec, mode 0700. Raises Unavailable."""
    options = f"size={size},nr_inodes={inodes}"
    flags = _TMPFS_FLAGS | (MS_REMOUNT if remount else 0)
    if not remount:
        options += ",mode=0700"
    try:
        _call("mount", b"anvil-output", os.fsencode(path), b"tmpfs", flags, options.encode())
    except OSError as exc:
        what = "remount" if remount else "mount"
        raise _refused(f"{what} of a tmpfs on {path}", exc) from exc


def unmount(_: PrivateMounts, path: Path) -> None:
    """Detach the mount on `path` (its memory is freed once nothing uses it). Raises Unavailable."""
    try:
        _call("umount2", os.fsencode(path), MNT_DETACH)
    except OSError as exc:
        raise _refused(f"umount2 of {path}", exc) from exc


def _refused(what: str, exc: OSError) -> Unavailable:
    return Unavailable(f"cannot bound /output: {what} refused: {exc.strerror} ({_HINT})")
