"""A sandbox worker process: `python -m daemon.executors.wasm.worker`, driven over stdin/stdout.

Runs one guest at a time in its own Sandbox (its own Engine and module cache).
The daemon kills it when a guest overstays its deadline and starts another.
It exits on end of input, and dies with its parent (no orphaned guests).

First thing, before any thread exists, it enters its own mount namespace, in
which its guests' /output is a bounded tmpfs (bounded_output.py). A worker
that cannot do so answers the daemon's hello with the reason, never `ready`:
it does not run guests unbounded.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from daemon.exceptions import AnvilError, Unavailable
from daemon.executors.result import ExecutionResult
from daemon.executors.wasm import mount_ns, protocol
from daemon.executors.wasm.engine import EngineSettings
from daemon.executors.wasm.guest_run import GuestRunner
from daemon.executors.wasm.mount_ns import PrivateMounts
from daemon.executors.wasm.sandbox import Sandbox

_PR_SET_PDEATHSIG = 1


def read_message(stream: IO[bytes]) -> tuple[dict[str, Any], list[bytes]] | None:
    """The next message and its blobs, or None at a clean end of input."""
    header = stream.read(protocol.HEADER.size)
    if not header:
        return None
    head = protocol.parse_head(_read_exactly(stream, protocol.frame_length(_full(header))))
    blobs = []
    for _ in range(head["blobs"]):
        length = protocol.frame_length(_read_exactly(stream, protocol.HEADER.size))
        blobs.append(_read_exactly(stream, length))
    return head, blobs


def _full(header: bytes) -> bytes:
    if len(header) != protocol.HEADER.size:
        raise protocol.ProtocolError("input ended inside a frame header")
    return header


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise protocol.ProtocolError("input ended inside a frame")
    return data


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the daemon dies, so no guest outlives it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent is already gone
        sys.exit(0)


def _sandbox_from_hello(head: dict[str, Any]) -> Sandbox:
    if head.get("type") != "hello":
        raise protocol.ProtocolError("expected hello")
    cache_dir = head["cache_dir"]
    secret = head["cache_secret"]
    return Sandbox(
        EngineSettings(**head["engine"]),
        cache_dir=None if cache_dir is None else Path(cache_dir),
        cache_secret=None if secret is None else bytes.fromhex(secret),
        memory_cache_entries=int(head["memory_cache_entries"]),
        memory_cache_bytes=int(head["memory_cache_bytes"]),
        max_module_bytes=int(head["max_module_bytes"]),
    )


def _scratch_from_hello(head: dict[str, Any]) -> Path:
    """This worker's own scratch folder (staged inputs); the pool removes it if we die."""
    root = head.get("scratch_dir")
    if root is None:
        return Path(tempfile.mkdtemp(prefix="anvil-wasm-worker-"))
    scratch = Path(root) / f"worker-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)  # a pid reused from a crashed run
    scratch.mkdir(parents=True)
    return scratch


def serve(inp: IO[bytes], out: IO[bytes], mounts: PrivateMounts | Unavailable) -> int:
    """The worker loop: hello → ready, then run after run until end of input.

    `mounts`: this process's own mount namespace, or why it has none; then the
    hello is answered with that error and the worker exits (status 1).
    """
    sending = threading.Lock()  # the output watcher may report an abandoned run

    def send(data: bytes) -> None:
        with sending:
            out.write(data)
            out.flush()

    def abandon(result: ExecutionResult) -> None:
        try:
            send(protocol.abandoned_message(result))
        finally:
            os._exit(0)  # the guest may be blocked in a host call: only an exit ends it

    first = read_message(inp)
    if first is None:
        return 0
    if isinstance(mounts, Unavailable):
        send(protocol.error_message(mounts))
        return 1
    scratch = _scratch_from_hello(first[0])
    try:
        with _sandbox_from_hello(first[0]) as sandbox:
            try:
                runner = GuestRunner(sandbox, scratch, mounts, abandon=abandon)
            except AnvilError as exc:
                send(protocol.error_message(exc))
                return 1
            try:
                send(protocol.message("ready", pid=os.getpid(), scratch_dir=str(scratch)))
                _serve_runs(inp, send, runner)
            finally:
                runner.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _serve_runs(inp: IO[bytes], send: Callable[[bytes], None], runner: GuestRunner) -> None:
    while (received := read_message(inp)) is not None:
        head, _ = received
        if head["type"] != "run":
            raise protocol.ProtocolError(f"unexpected {head['type']!r} message")
        request = protocol.request_from(head)
        try:
            digest, result = runner.run(
                request,
                on_started=lambda level: send(protocol.message("started", cache=level.value)),
            )
        except Unavailable as exc:
            send(protocol.error_message(exc))
            return  # this worker can no longer bound /output: it exits, the daemon replaces it
        except AnvilError as exc:
            send(protocol.error_message(exc))
            continue
        send(
            protocol.result_message(
                result, digest=digest, cached=runner.sandbox.cache.memory.keys()
            )
        )


def _enter_mount_namespace() -> PrivateMounts | Unavailable:
    try:
        return mount_ns.enter()
    except Unavailable as exc:
        return exc


def main() -> int:
    mounts = _enter_mount_namespace()  # first: the kernel refuses it once a thread exists
    _die_with_parent()
    # Ctrl-C at a terminal reaches the whole process group: the daemon decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep the protocol on private descriptors; anything else that writes to
    # stdout (a library's print) lands on stderr instead of corrupting a frame.
    inp = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    return serve(inp, out, mounts)


if __name__ == "__main__":
    sys.exit(main())
