"""The pipe protocol between the daemon and its sandbox worker processes.

Frames are a 4-byte big-endian length then the payload. Each message is one
JSON frame, then as many raw byte frames as its `blobs` count says (guest
stdout and stderr travel raw, never as JSON). JSON, not pickle: the daemon
never unpickles what a process running untrusted code wrote. Pure: encoding
and decoding only; the two ends do their own I/O.

Daemon → worker: `hello` (settings), then `run` per job.
Worker → daemon: `ready` (its pid and scratch folder), or `error` (why it
cannot run guests; it exits); per job `started` (module loaded, guest
starting), then `result` (+ stdout, stderr blobs: the module's digest, the
outputs left in /output) or `error` (a bad request) — or `abandoned` (a result
without outputs, from a worker that then exits: its guest crossed a limit and
is blocked in a host call, which only the end of its process ends).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

from daemon import exceptions
from daemon.executors.result import ExecutionResult, OutputFile, RunEnd
from daemon.executors.wasm.guest_run import GuestRun
from daemon.executors.wasm.limits import Limits

HEADER = struct.Struct(">I")
MAX_FRAME = 256 << 20


class ProtocolError(Exception):
    """The other end sent something that is not this protocol (a bug or a dead peer)."""


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(payload)} bytes is over {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes is over {MAX_FRAME}")
    return int(length)


def message(kind: str, blobs: tuple[bytes, ...] = (), **fields: Any) -> bytes:
    """One message as bytes: its JSON frame then its blob frames."""
    head = json.dumps({"type": kind, "blobs": len(blobs), **fields}).encode()
    return b"".join([frame(head), *(frame(blob) for blob in blobs)])


def parse_head(payload: bytes) -> dict[str, Any]:
    try:
        head = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"not a JSON message: {exc}") from None
    if not isinstance(head, dict) or not isinstance(head.get("type"), str):
        raise ProtocolError("message without a type")
    blobs = head.get("blobs", 0)
    if not isinstance(blobs, int) or not 0 <= blobs <= 2:
        raise ProtocolError("bad blob count")
    return head


# --- run requests ------------------------------------------------------------


def request_fields(request: GuestRun) -> dict[str, Any]:
    return {
        "digest": request.digest,
        "module_path": str(request.module_path),
        "argv": list(request.argv),
        "env": [list(pair) for pair in request.env],
        "inputs": [str(path) for path in request.inputs],
        "output_dir": str(request.output_dir),
        "limits": asdict(request.limits),
    }


def request_from(head: dict[str, Any]) -> GuestRun:
    try:
        return GuestRun(
            digest=None if head["digest"] is None else str(head["digest"]),
            module_path=Path(head["module_path"]),
            argv=tuple(str(a) for a in head["argv"]),
            env=tuple((str(k), str(v)) for k, v in head["env"]),
            inputs=tuple(Path(p) for p in head["inputs"]),
            output_dir=Path(head["output_dir"]),
            limits=Limits(**head["limits"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad run request: {exc!r}") from None


# --- results -----------------------------------------------------------------


def result_message(result: ExecutionResult, *, digest: str, cached: list[str]) -> bytes:
    """A `result` message: `digest` is the module's, `cached` lists the module
    digests the worker holds in memory."""
    return message(
        "result",
        (result.stdout, result.stderr),
        **_result_fields(result),
        digest=digest,
        cached=cached,
    )


def abandoned_message(result: ExecutionResult) -> bytes:
    """An `abandoned` message: the result of a run whose worker exits next."""
    return message("abandoned", (result.stdout, result.stderr), **_result_fields(result))


def _result_fields(result: ExecutionResult) -> dict[str, Any]:
    return {
        "outcome": result.outcome.value,
        "text": result.message,
        "exit_code": result.exit_code,
        "trap_code": result.trap_code,
        "duration_s": result.duration_s,
        "fuel_consumed": result.fuel_consumed,
        "outputs": [[f.name, str(f.path), f.size] for f in result.outputs],
    }


def result_from(head: dict[str, Any], stdout: bytes, stderr: bytes) -> ExecutionResult:
    try:
        return ExecutionResult(
            outcome=RunEnd(head["outcome"]),
            message=str(head["text"]),
            exit_code=_optional_int(head["exit_code"]),
            trap_code=None if head["trap_code"] is None else str(head["trap_code"]),
            stdout=stdout,
            stderr=stderr,
            duration_s=float(head["duration_s"]),
            fuel_consumed=_optional_int(head["fuel_consumed"]),
            outputs=tuple(
                OutputFile(name=str(name), path=Path(path), size=int(size))
                for name, path, size in head["outputs"]
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad result: {exc!r}") from None


def _optional_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


# --- errors ------------------------------------------------------------------


def error_message(exc: exceptions.AnvilError) -> bytes:
    return message("error", error=type(exc).__name__, text=str(exc))


def error_from(head: dict[str, Any]) -> exceptions.AnvilError:
    """The daemon error a worker reported; only AnvilError classes are ever named."""
    cls = getattr(exceptions, str(head.get("error")), None)
    text = str(head.get("text", ""))
    if isinstance(cls, type) and issubclass(cls, exceptions.AnvilError):
        return cls(text)
    return exceptions.AnvilError(text)
