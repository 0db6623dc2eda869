"""Real daemon processes for end-to-end tests: `anvil-compute serve` in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from daemon.client import ComputeClient
from tests.eventually import eventually_sync


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Peer:
    data_dir: Path
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_address: str = ""
    extra_config: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return (self.data_dir / "client.token").read_text().strip()

    @property
    def peer_id(self) -> str:
        return (self.data_dir / "peer_id").read_text().strip()

    def client(self) -> ComputeClient:
        return ComputeClient(self.address, token=self.token)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """One sample of this peer's /metrics (0.0 when absent)."""
        url = f"http://{self.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def wait_serving(
    address: str,
    process: subprocess.Popen[bytes],
    log_path: Path,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    channel_cm = (
        grpc.secure_channel(address, credentials)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel_cm as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"peer exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        try:
            eventually_sync(serving, timeout=60)
        except AssertionError:
            raise TimeoutError(
                f"peer at {address} never became SERVING:\n{log_path.read_text()[-4000:]}"
            ) from None


class PeerFactory:
    def __init__(self, root: Path, database_url: str, secret_file: Path) -> None:
        self.root = root
        self.database_url = database_url
        self.secret_file = secret_file
        self.peers: list[Peer] = []

    def start(
        self,
        *,
        config: str = "",
        name: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        **env: str,
    ) -> Peer:
        name = name or f"peer{len(self.peers)}"
        data_dir = self.root / name
        data_dir.mkdir(parents=True, exist_ok=True)
        config_file = data_dir / "config.toml"
        config_file.write_text(config)
        port = free_port()
        address = f"127.0.0.1:{port}"
        log_path = data_dir / "daemon.log"
        metrics_address = f"127.0.0.1:{free_port()}"
        environ = {
            **os.environ,
            "ANVIL_DATABASE_URL": self.database_url,
            "ANVIL_AUTH_SECRET_FILE": str(self.secret_file),
            "ANVIL_LEASE_S": "3",
            "ANVIL_HEARTBEAT_S": "0.5",
            "ANVIL_PEER_TTL_S": "6",
            "ANVIL_POLL_INTERVAL_S": "0.5",
            "ANVIL_DRAIN_GRACE_S": "10",
            "ANVIL_METRICS_LISTEN": metrics_address,
            **env,
        }
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "daemon.cli",
                    "serve",
                    "--data-dir",
                    str(data_dir),
                    "--listen",
                    address,
                    "--config",
                    str(config_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
            )
        peer = Peer(
            data_dir=data_dir,
            address=address,
            process=process,
            log_path=log_path,
            metrics_address=environ["ANVIL_METRICS_LISTEN"],
        )
        self.peers.append(peer)
        wait_serving(address, process, log_path, credentials)
        return peer

    def wait_converged(self, peers: list[Peer], timeout: float = 30) -> None:
        """Wait until each of `peers` sees all of them as capable in its membership
        view: views follow the registry by NOTIFY, a few milliseconds behind, and a
        test that asserts placement must not race them."""

        def each_sees_all() -> bool:
            seen = [peer.metric("anvil_compute_membership_peers", kind="capable") for peer in peers]
            assert all(n >= len(peers) for n in seen), f"of {len(peers)} peers, each sees {seen}"
            return True

        eventually_sync(each_sees_all, timeout=timeout)

    def stop_all(self) -> None:
        for peer in self.peers:
            try:
                peer.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                peer.kill()


def cli(peer: Peer, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`anvil-compute ARGS` against `peer`, finding its tokens in its data directory
    (not $ANVIL_TOKEN)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            *args,
            "--endpoint",
            peer.address,
            "--data-dir",
            str(peer.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "ANVIL_TOKEN"},
    )


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode | None:
    """The status an RPC fails with; None when it succeeds."""
    try:
        await call
    except aio.AioRpcError as exc:
        return exc.code()
    return None
