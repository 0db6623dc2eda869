"""The client commands as a user runs them, against a real peer; reflection; auth off."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from daemon.client import ComputeClient
from tests.e2e.cluster import Peer, PeerFactory, cli
from tests.e2e.guests import examples_config

pytestmark = pytest.mark.e2e


@pytest.fixture
async def peer(peers: PeerFactory) -> Peer:
    return await asyncio.to_thread(peers.start, config=examples_config())


async def test_submit_wait_status_capabilities_cancel(peer: Peer, tmp_path: Path) -> None:
    mode = stat.S_IMODE((peer.data_dir / "client.token").stat().st_mode)
    assert mode == 0o600
    text = tmp_path / "words.txt"
    text.write_text("to be or not to be\n")
    done = await asyncio.to_thread(
        cli, peer, "submit", "text:wordcount", "--input", str(text), "--wait"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["words"] == 6
    job_id = (await asyncio.to_thread(cli, peer, "submit", "text:wordcount")).stdout.strip()
    status = await asyncio.to_thread(cli, peer, "status", job_id)
    assert json.loads(status.stdout)["job_id"] == job_id
    watched = await asyncio.to_thread(cli, peer, "watch", job_id)
    assert watched.returncode == 0 and "SUCCEEDED" in watched.stdout
    cancel = await asyncio.to_thread(cli, peer, "cancel", job_id)
    assert cancel.returncode == 1 and "FAILED_PRECONDITION" in cancel.stderr
    caps = await asyncio.to_thread(cli, peer, "capabilities", "--live")
    assert caps.returncode == 0
    assert {line.split()[0] for line in caps.stdout.splitlines()[1:]} == {
        "text:wordcount",
        "data:csv-aggregate",
        "image:resize",
        "inference:digits",
    }
    bad = await asyncio.to_thread(cli, peer, "submit", "no:such", "--param", "x")
    assert bad.returncode == 1 and "--param 'x': expected KEY=VALUE" in bad.stderr


def test_reflection_lists_every_service(peer: Peer) -> None:
    with grpc.insecure_channel(peer.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "anvil.ComputeService",
        "anvil.PeerService",
        "anvil.ObjectService",
        "grpc.health.v1.Health",
    } <= services


async def test_auth_can_be_switched_off_only_explicitly(peers: PeerFactory) -> None:
    peer = await asyncio.to_thread(peers.start, config=examples_config(), ANVIL_AUTH="off")
    async with ComputeClient(peer.address) as client:
        caps = await client.capabilities("text:wordcount")
    assert [c.capability for c in caps] == ["text:wordcount"]
    assert not (peer.data_dir / "client.token").exists()
    with pytest.raises(RuntimeError, match="bad value for 'auth'"):
        await asyncio.to_thread(peers.start, config=examples_config(), ANVIL_AUTH="no")


async def test_a_nearly_spent_deadline_is_refused_before_writing(
    peer: Peer, database_url: str
) -> None:
    import psycopg
    from grpc import aio

    from daemon.pb.anvil import compute_pb2

    async with peer.client() as client:
        await client.capabilities()  # connected: the next call's budget is all server time
        for _ in range(20):
            with pytest.raises(aio.AioRpcError) as info:
                await client.stub.SubmitJob(
                    compute_pb2.SubmitJobRequest(capability="text:wordcount", region="local"),
                    metadata=client.metadata,
                    timeout=0.004,
                )
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def bare_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with no --data-dir: only --token or $ANVIL_TOKEN can authenticate it."""
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


async def test_the_token_comes_from_the_flag_then_the_environment(
    peer: Peer, tmp_path: Path
) -> None:
    import os

    base = {k: v for k, v in os.environ.items() if k != "ANVIL_TOKEN"}
    base["HOME"] = str(tmp_path)  # no client.token to fall back on
    where = ["capabilities", "--endpoint", peer.address]
    none = await asyncio.to_thread(bare_cli, *where, env=base)
    assert none.returncode != 0 and "UNAUTHENTICATED" in none.stderr, none.stderr
    flag = await asyncio.to_thread(bare_cli, *where, "--token", peer.token, env=base)
    assert flag.returncode == 0 and "text:wordcount" in flag.stdout, flag.stderr
    env = await asyncio.to_thread(bare_cli, *where, env={**base, "ANVIL_TOKEN": peer.token})
    assert env.returncode == 0 and "text:wordcount" in env.stdout, env.stderr
    # The flag wins over the environment.
    wrong = {**base, "ANVIL_TOKEN": "not-a-token"}
    both = await asyncio.to_thread(bare_cli, *where, "--token", peer.token, env=wrong)
    assert both.returncode == 0, both.stderr


@pytest.mark.timeout(180)
async def test_serve_with_no_arguments_runs_on_the_embedded_defaults(tmp_path: Path) -> None:
    """`anvil-compute serve` alone: embedded PostgreSQL and the store under
    ~/.local/share/anvil-compute, the examples offered, on 127.0.0.1:50051."""
    import os
    import signal
    import socket

    from tests.e2e.cluster import wait_serving

    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", 50051)) != 0, "something already listens on 50051"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("ANVIL_") and k != "XDG_DATA_HOME"
    }
    env["HOME"] = str(tmp_path)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    env["ANVIL_CONFIG"] = str(empty)  # not the host's /etc file: no settings at all
    env["ANVIL_METRICS_LISTEN"] = ""  # 9464 may be taken on a shared machine
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: ASYNC220 - starts it and returns at once
            [sys.executable, "-m", "daemon.cli", "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        await asyncio.to_thread(wait_serving, "127.0.0.1:50051", process, log_path)
        data_dir = tmp_path / ".local" / "share" / "anvil-compute"
        token = (data_dir / "client.token").read_text().strip()
        assert (data_dir / "peer_id").is_file()
        async with ComputeClient("127.0.0.1:50051", token=token) as client:
            offered = {c.capability for c in await client.capabilities(live_only=True)}
            assert offered == {
                "text:wordcount",
                "data:csv-aggregate",
                "image:resize",
                "inference:digits",
            }
            final = await client.wait((await client.submit("text:wordcount")).job_id)
            assert final.error == "" and json.loads(final.output)["words"] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 60)
    assert code == 0, log_path.read_text()[-3000:]
    # The registry was the embedded PostgreSQL, and the store the built-in one.
    assert (data_dir / "postgres" / "PG_VERSION").is_file()
    assert (data_dir / "objects" / "index.sqlite3").is_file()


async def test_watch_prints_each_state_as_it_happens(peers: PeerFactory, tmp_path: Path) -> None:
    from tests.e2e.guests import guests_config

    peer = await asyncio.to_thread(peers.start, config=guests_config(tmp_path))
    # test:sleep runs one job at a time, 1.5 s each: three ahead keep the watched
    # job queued for 4.5 s, however slowly the CLI starts on a loaded machine.
    async with peer.client() as client:
        ahead = [(await client.submit("test:sleep")).job_id for _ in range(3)]
    first = ahead[0]
    second = (await asyncio.to_thread(cli, peer, "submit", "test:sleep")).stdout.strip()
    watched = await asyncio.to_thread(cli, peer, "watch", second)  # queued behind the others
    assert watched.returncode == 0, watched.stderr
    states = [line.split()[0] for line in watched.stdout.splitlines() if "attempt" in line]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"], watched.stdout
    assert f"on {peer.peer_id}" in watched.stdout
    assert watched.stdout.rstrip().endswith("slept")
    done = await asyncio.to_thread(cli, peer, "status", first)
    assert "SUCCEEDED" in done.stdout
