"""`anvil-compute serve` under a stand-in for systemd: a notify socket this test owns.

A real daemon process, a real PostgreSQL: READY=1 only once migrations and
registration are done, WATCHDOG=1 from start to stop, STOPPING=1 on SIGTERM
while a job still runs (health NOT_SERVING, the job finishes); a bad config
stops it at start with one line on stderr and exit code 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemon.convert import PROTO_TO_JOB_STATE
from daemon.jobs.state import JobState
from daemon.pb.anvil import compute_pb2, compute_pb2_grpc
from tests.e2e.cluster import free_port
from tests.e2e.guests import SLEEP_WAT, write_guest
from tests.eventually import eventually_sync


class NotifySocket:
    """A bound AF_UNIX datagram socket, read all the time (as systemd does) and recorded."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # the NOTIFY_SOCKET value
        self.received: list[tuple[float, dict[str, str]]] = []
        self._empty_since = 0.0  # a read found nothing waiting from this moment on
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                self._empty_since = began
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._lock:
                self.received.append((time.monotonic(), fields))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def messages(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.received)

    def read_all_sent_before(self, moment: float) -> None:
        """Wait until every datagram sent before `moment` (time.monotonic) has been read:
        a datagram is queued on this socket when it is sent, so a read that then
        found nothing started after it was taken."""
        eventually_sync(lambda: self._empty_since > moment, timeout=5)

    def wait_for(
        self, key: str, process: subprocess.Popen[bytes], timeout_s: float
    ) -> tuple[float, dict[str, str]]:
        """The first message setting `key` (when it arrived, its fields); fails as soon
        as the process has exited without sending one."""

        def sent() -> tuple[float, dict[str, str]] | None:
            return next(((t, f) for t, f in self.messages() if key in f), None)

        def sent_or_exited() -> bool:
            return sent() is not None or process.poll() is not None

        with contextlib.suppress(AssertionError):  # reported below, with what did arrive
            eventually_sync(sent_or_exited, timeout=timeout_s)
        if process.poll() is not None:
            self.read_all_sent_before(time.monotonic())  # what it sent just before exiting
        found = sent()
        if found is None:
            raise AssertionError(
                f"no {key} within {timeout_s} s (exit code {process.poll()}); got {self.messages()}"
            )
        return found

    def count(self, key: str) -> int:
        return sum(key in fields for _, fields in self.messages())

    def statuses(self) -> list[str]:
        return [f["STATUS"] for _, f in self.messages() if "STATUS" in f]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notify = NotifySocket(sock, str(path))
        yield notify
        notify.close()


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


def job_state(stub: compute_pb2_grpc.ComputeServiceStub, job_id: str, token: str) -> JobState:
    status = stub.GetJobStatus(
        compute_pb2.GetJobStatusRequest(job_id=job_id),
        metadata=(("authorization", f"Bearer {token}"),),
        timeout=10,
    )
    return PROTO_TO_JOB_STATE[status.state]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ready_watchdog_and_stopping_reach_the_notify_socket(
    tmp_path: Path, empty_database_url: str, notify_socket: NotifySocket
) -> None:
    data_dir = tmp_path / "peer"
    log_path = tmp_path / "daemon.log"
    sleep = write_guest(tmp_path, "sleep", SLEEP_WAT.replace("NANOS", str(2_000_000_000)))
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[capabilities."test:sleep"]\nwasm = "{sleep}"\n')
    address = f"127.0.0.1:{free_port()}"
    process = serve_process(
        data_dir,
        log_path,
        {
            # A brand-new database: the daemon must migrate it before READY=1.
            "ANVIL_DATABASE_URL": empty_database_url,
            "ANVIL_METRICS_LISTEN": "",
            "ANVIL_DRAIN_GRACE_S": "20",
            "NOTIFY_SOCKET": notify_socket.address,
            "WATCHDOG_USEC": "300000",  # a ping every 0.15 s
        },
        "--listen",
        address,
        "--config",
        str(config_file),
    )
    try:
        ready_at, ready = notify_socket.wait_for("READY", process, timeout_s=90)
        # At READY=1 the schema exists and this peer is registered with its capability.
        peer_id = (data_dir / "peer_id").read_text().strip()
        assert peer_row(empty_database_url, peer_id) == ("up", 1)
        assert ready["READY"] == "1" and peer_id in ready.get("STATUS", ""), ready
        early = [t for t, f in notify_socket.messages() if "WATCHDOG" in f and t < ready_at]
        assert early, "no WATCHDOG=1 while starting"
        assert notify_socket.statuses()[0].startswith("starting"), notify_socket.statuses()

        def pings_in_the_first_second() -> bool:
            pings = [
                t
                for t, f in notify_socket.messages()
                if "WATCHDOG" in f and ready_at < t <= ready_at + 1.0
            ]
            return len(pings) >= 3

        eventually_sync(pings_in_the_first_second, timeout=ready_at + 1.5 - time.monotonic())

        token = (data_dir / "client.token").read_text().strip()
        with grpc.insecure_channel(address) as channel:
            stub = compute_pb2_grpc.ComputeServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            job_id = stub.SubmitJob(
                compute_pb2.SubmitJobRequest(capability="test:sleep", region="local"),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=30,
            ).job_id

            def job_started() -> bool:
                return job_state(stub, job_id, token) is JobState.RUNNING

            eventually_sync(job_started, timeout=30)

            stop_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stopping = notify_socket.wait_for("STOPPING", process, timeout_s=30)
            assert stopping["STOPPING"] == "1"
            assert stopping.get("STATUS", "").startswith("draining: 1 job(s) running"), stopping
            # Draining: health says so while the running job finishes.

            def health_not_serving() -> bool:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            eventually_sync(health_not_serving, timeout=10)
            assert process.poll() is None, "exited before its running job finished"
        assert process.wait(60) == 0, log_path.read_text()[-3000:]
        notify_socket.read_all_sent_before(time.monotonic())
        assert notify_socket.statuses()[-1] == "stopped", notify_socket.statuses()
        # The watchdog kept pinging through the drain (the job slept about 2 s of it).
        drain_pings = [t for t, f in notify_socket.messages() if "WATCHDOG" in f and t > stop_at]
        assert len(drain_pings) >= 5, notify_socket.messages()
        extend = [f for _, f in notify_socket.messages() if "EXTEND_TIMEOUT_USEC" in f]
        assert extend and int(extend[0]["EXTEND_TIMEOUT_USEC"]) >= 20_000_000
        # The job finished during the drain; the peer deregistered before it exited.
        with psycopg.connect(empty_database_url) as conn:
            row = conn.execute("SELECT state FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
        assert row == ("succeeded",)
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
        notify = NotifySocket(sock, "@" + name)
        process = serve_process(
            tmp_path / "peer",
            tmp_path / "daemon.log",
            {"NOTIFY_SOCKET": f"@{name}", "ANVIL_LEASE_S": "soon"},
        )
        assert process.wait(60) == 1
        notify.wait_for("STATUS", process, timeout_s=5)
        notify.close()
    assert notify.count("WATCHDOG") == 0
    (status,) = notify.statuses()
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
