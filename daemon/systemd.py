"""A small sd_notify client: readiness, status, watchdog and stopping messages to systemd.

systemd passes `NOTIFY_SOCKET` (a datagram socket path, or `@name` in the
abstract namespace) to a `Type=notify` service, and `WATCHDOG_USEC` (with
`WATCHDOG_PID`) when `WatchdogSec=` is set. Without `NOTIFY_SOCKET` every call
is a no-op, so the daemon runs the same way outside systemd. Sending never
raises: a lost notification must not take the daemon down, systemd's own
timeouts are the backstop.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

# A send blocks at most this long (systemd reads its socket promptly; a stuck
# reader must not stall the event loop for long).
SEND_TIMEOUT_S = 1.0


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The socket address in `NOTIFY_SOCKET` ('\\0'-prefixed when abstract), or None.

    Only AF_UNIX addresses are supported (a path or `@name`); anything else
    (e.g. systemd's `vsock:` form) is logged and ignored.
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX path or @name; not notifying", value)
    return None


def watchdog_interval_s(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """How often to send WATCHDOG=1 (half of `WATCHDOG_USEC`), or None when not asked to.

    Like sd_watchdog_enabled(3): a `WATCHDOG_PID` naming another process means
    the watchdog is not ours; a missing, zero or malformed value means off.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2 / 1_000_000


class Notifier:
    """Sends sd_notify(3) messages to `NOTIFY_SOCKET`; every method is a no-op without it.

    `close()` (or `with`) releases the socket. Safe to call from the event loop:
    a send blocks at most SEND_TIMEOUT_S.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.address = notify_address(environ)
        self.watchdog_s = watchdog_interval_s(environ) if self.address else None
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str) -> bool:
        """Send `KEY=value` lines (keys upper-cased) as one datagram; True if it was sent."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            # systemd splits on newlines: one line per assignment, no injection.
            lines.append(f"{key.upper()}={' '.join(value.splitlines())}")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: a dead socket would repeat it every ping
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """READY=1: start-up is complete (and an optional STATUS= line)."""
        return self.notify(ready="1", **({"status": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def watchdog(self) -> bool:
        return self.notify(watchdog="1")

    def stopping(self, status: str = "") -> bool:
        """STOPPING=1: shutdown has begun (and an optional STATUS= line)."""
        return self.notify(stopping="1", **({"status": status} if status else {}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
