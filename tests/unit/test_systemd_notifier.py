"""daemon/systemd.py against real AF_UNIX datagram sockets, path and abstract."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.systemd import Notifier, notify_address, watchdog_interval_s


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and the NOTIFY_SOCKET value that names it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if request.param == "path":
            path = str(tmp_path / "notify")
            sock.bind(path)
            value = path
        else:
            name = f"anvil-unit-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            value = "@" + name
        sock.settimeout(5)
        yield sock, value


def test_messages_arrive_as_systemd_expects(listener: tuple[socket.socket, str]) -> None:
    sock, value = listener
    with Notifier({"NOTIFY_SOCKET": value}) as notifier:
        assert notifier.enabled
        assert notifier.ready("serving on 127.0.0.1:1")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:1"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        # A newline in a status cannot smuggle in another assignment.
        assert notifier.status("draining\nREADY=1")
        assert sock.recv(4096) == b"STATUS=draining READY=1"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        assert notifier.notify(extend_timeout_usec="45000000")
        assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=45000000"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_s is None
    assert not notifier.ready() and not notifier.watchdog() and not notifier.stopping()
    notifier.close()


def test_a_vanished_socket_is_reported_once_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}) as notifier:
        assert not notifier.watchdog()
        assert not notifier.watchdog()
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_notify_socket_forms() -> None:
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@x/y"}) == "\0x/y"
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert notify_address({"NOTIFY_SOCKET": ""}) is None


def test_watchdog_interval_is_half_of_watchdog_usec_when_it_is_ours() -> None:
    me = str(os.getpid())
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "300000", "WATCHDOG_PID": me}) == 0.15
    assert watchdog_interval_s({"WATCHDOG_USEC": "300000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval_s({}) is None
    # The watchdog only counts when there is a socket to ping.
    assert Notifier({"WATCHDOG_USEC": "300000"}).watchdog_s is None
