"""The guest's stdout and stderr: one upgraded HTTP connection to Podman's exec API.

`POST /exec/{id}/start` answers with an upgraded connection carrying the
command's stdout and stderr multiplexed in frames of 1 byte stream (1 stdout,
2 stderr), 3 zero bytes, 4 bytes big-endian size, then the data. The podman
package lacks this call, hence the raw connection. (Stdin could travel the
other way, but conmon 2.1 then loses the output of a command that leaves it
unread: the executor attaches none, see anvil-exec.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from daemon.exceptions import FailedPrecondition, Unavailable

# Every Podman since 4.0 serves this prefix.
API_PREFIX = "/v4.0.0/libpod"
_STDOUT, _STDERR = 1, 2


async def open_upgraded(
    socket: Path, path: str, body: Any, *, timeout_s: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """POST `body` (JSON) to `path` and return the upgraded connection.

    Raises FailedPrecondition (Podman refused with a 4xx: trying again will
    not help), Unavailable (unreachable, or a 5xx).
    """
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket))
    except OSError as exc:
        raise Unavailable(f"podman at {socket}: {exc.strerror or exc}") from exc
    try:
        payload = json.dumps(body).encode()
        request = (
            f"POST {API_PREFIX}{path} HTTP/1.1\r\n"
            "Host: podman\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        writer.write(request.encode() + payload)
        async with asyncio.timeout(timeout_s):
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
            if status not in (b"101", b"200"):
                text = (await reader.read(4096)).decode(errors="replace").strip()
                message = (
                    f"podman refused {path}: {head.splitlines()[0].decode(errors='replace')} {text}"
                )
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
        raise Unavailable(f"podman {path} failed: {exc}") from exc
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def read_output(
    reader: asyncio.StreamReader,
    stdout: bytearray,
    stderr: bytearray,
    *,
    stdout_cap: int,
    stderr_cap: int,
) -> str | None:
    """Demultiplex the stream until it ends; the stream's name if it went over its cap."""
    while True:
        try:
            header = await reader.readexactly(8)
            data = await reader.readexactly(int.from_bytes(header[4:8], "big"))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if header[0] == _STDOUT:
            buffer, cap, stream = stdout, stdout_cap, "stdout"
        elif header[0] == _STDERR:
            buffer, cap, stream = stderr, stderr_cap, "stderr"
        else:
            continue
        buffer += data
        if len(buffer) > cap:
            del buffer[cap:]
            return stream
