"""`anvil-compute serve` under a stand-in for systemd: a notify socket this test owns.

A real daemon process, a real PostgreSQL: READY=1 only once migrations and
registration are done, WATCHDOG=1 from start to stop, STOPPING=1 on SIGTERM;
a bad config stops it at start with one line on stderr and exit code 1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from daemon.capability_config import example_capabilities
from tests.e2e.cluster import free_port


@dataclass
class NotifySocket:
    """A bound AF_UNIX datagram socket that records what the daemon sends."""

    sock: socket.socket
    address: str  # the NOTIFY_SOCKET value
    received: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def receive(self, timeout_s: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append((time.monotonic(), fields))
        return fields

    def wait_for(
        self, key: str, process: subprocess.Popen[bytes], timeout_s: float
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fields = self.receive(0.2)
            if fields is not None and key in fields:
                return fields
            if fields is None and process.poll() is not None:
                break
        raise AssertionError(
            f"no {key} within {timeout_s} s (exit code {process.poll()}); got {self.received}"
        )

    def count(self, key: str) -> int:
        return sum(key in fields for _, fields in self.received)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield NotifySocket(sock=sock, address=str(path))


def serve_process(
    data_dir: Path, log_path: Path, env: dict[str, str], *args: str
) -> subprocess.Popen[bytes]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("ANVIL_", "NOTIFY_", "WATCHDOG_"))
    }
    environ.update(env)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--data-dir", str(data_dir), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
        )


def peer_row(url: str, peer_id: str) -> tuple[str, int] | None:
    """(state, capabilities registered) of a peer, None if its row is not there."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT state FROM peers WHERE peer_id = %s", (peer_id,)).fetchone()
        caps = conn.execute(
            "SELECT count(*) FROM compute_capabilities WHERE peer_id = %s", (peer_id,)
        ).fetchone()
    return None if row is None else (str(row[0]), int(caps[0]) if caps else 0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ready_watchdog_and_stopping_reach_the_notify_socket(
    tmp_path: Path, empty_database_url: str, notify_socket: NotifySocket
) -> None:
    data_dir = tmp_path / "peer"
    log_path = tmp_path / "daemon.log"
    process = serve_process(
        data_dir,
        log_path,
        {
            # A brand-new database: the daemon must migrate it before READY=1.
            "ANVIL_DATABASE_URL": empty_database_url,
            "ANVIL_METRICS_LISTEN": "",
            "ANVIL_DRAIN_GRACE_S": "5",
            "NOTIFY_SOCKET": notify_socket.address,
            "WATCHDOG_USEC": "300000",  # a ping every 0.15 s
        },
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    try:
        ready = notify_socket.wait_for("READY", process, timeout_s=90)
        ready_at = time.monotonic()
        # At READY=1 the schema exists and this peer is registered with its capabilities.
        peer_id = (data_dir / "peer_id").read_text().strip()
        state = peer_row(empty_database_url, peer_id)
        assert state == ("up", len(example_capabilities())), state
        assert ready["READY"] == "1" and peer_id in ready.get("STATUS", ""), ready
        assert notify_socket.count("WATCHDOG") >= 1, "no WATCHDOG=1 while starting"
        starting = [f for _, f in notify_socket.received if "starting" in f.get("STATUS", "")]
        assert starting, notify_socket.received

        before = notify_socket.count("WATCHDOG")
        while time.monotonic() - ready_at < 1.0:
            notify_socket.receive(0.2)
        assert notify_socket.count("WATCHDOG") - before >= 3, notify_socket.received

        process.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for("STOPPING", process, timeout_s=30)
        assert stopping["STOPPING"] == "1" and "draining" in stopping.get("STATUS", "")
        assert process.wait(60) == 0, log_path.read_text()[-3000:]
        while notify_socket.receive(0.2) is not None:
            pass
        statuses = [f["STATUS"] for _, f in notify_socket.received if "STATUS" in f]
        assert statuses[-1] == "stopped", statuses
        extend = [f for _, f in notify_socket.received if "EXTEND_TIMEOUT_USEC" in f]
        assert extend and int(extend[0]["EXTEND_TIMEOUT_USEC"]) >= 5_000_000
        # Drained and deregistered before it exited.
        assert peer_row(empty_database_url, peer_id) == ("down", 0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_abstract_notify_socket_and_no_watchdog_without_watchdog_usec(tmp_path: Path) -> None:
    """An `@name` socket works; without WATCHDOG_USEC the daemon sends no pings.

    The daemon is stopped by a bad value before it touches any database, so this
    also shows the failure reaching systemd as a STATUS= line.
    """
    name = f"anvil-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notify = NotifySocket(sock=sock, address="@" + name)
        process = serve_process(
            tmp_path / "peer",
            tmp_path / "daemon.log",
            {"NOTIFY_SOCKET": f"@{name}", "ANVIL_LEASE_S": "soon"},
        )
        assert process.wait(60) == 1
        while notify.receive(0.2) is not None:
            pass
    assert notify.count("WATCHDOG") == 0
    (status,) = [f["STATUS"] for _, f in notify.received if "STATUS" in f]
    assert status.startswith("failed: bad value for 'lease_s'"), status


def run_serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ANVIL_")}
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "serve", "--data-dir", str(tmp_path / "d"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, **env},
    )


@pytest.mark.parametrize(
    ("config_text", "env", "reason"),
    [
        ("regoin = 'eu-1'\n", {}, "unknown setting 'regoin' in "),
        ("metrics_listen = 'localhost'\n", {}, "bad value for 'metrics_listen' in "),
        ("", {"ANVIL_DRAIN_GRACE_S": "-1"}, "bad value for 'drain_grace_s' in the environment"),
        ("[capabilities.'x:y']\nwasm = 'a.wasm'\nfuel = -1\n", {}, "capabilities.'x:y'.fuel"),
        ("region = \n", {}, "cannot read config file"),
    ],
)
def test_a_bad_config_stops_serve_at_start_with_one_line(
    tmp_path: Path, config_text: str, env: dict[str, str], reason: str
) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_text)
    result = run_serve(tmp_path, "--config", str(config_file), **env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anvil-compute: "), result.stderr
    assert reason in lines[0], lines[0]
    # Nothing was started: no state was created.
    assert not (tmp_path / "d").exists()


def test_a_taken_metrics_port_stops_serve_before_any_database_work(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve(
            tmp_path,
            "--metrics-listen",
            f"127.0.0.1:{port}",
            # Unreachable on purpose: the metrics port is checked first.
            ANVIL_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"anvil-compute: cannot serve metrics on 127.0.0.1:{port}")
    assert "metrics_listen" in lines[0]
