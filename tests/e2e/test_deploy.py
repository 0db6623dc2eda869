"""Deploying capabilities to running peers: through the RPC and `anvil-compute deploy`,
to one peer or a whole region, and what is refused."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc import aio

from daemon.client import ComputeClient
from daemon.convert import PROTO_TO_JOB_STATE
from daemon.jobs.state import JobState
from daemon.pb.anvil import compute_pb2
from hrw import reference
from tests.e2e.cluster import Peer, PeerFactory, cli, code_of
from tests.e2e.guests import examples_config, say, write_guest
from tests.eventually import eventually

pytestmark = pytest.mark.e2e


def operator(peer: Peer) -> ComputeClient:
    return ComputeClient(peer.address, token=(peer.data_dir / "operator.token").read_text().strip())


def state(status: compute_pb2.GetJobStatusResponse) -> JobState:
    return PROTO_TO_JOB_STATE[status.state]


def wasm(ref: str, sha256: str = "") -> compute_pb2.Executor:
    return compute_pb2.Executor(wasm=compute_pb2.WasmExecutor(module_ref=ref, module_sha256=sha256))


async def rows(client: ComputeClient, capability: str) -> dict[str, str]:
    """peer id -> status of a capability's live rows."""
    return {r.peer_id: r.status for r in await client.capabilities(capability, live_only=True)}


async def test_a_module_deployed_with_the_cli_runs_without_a_restart(
    peers: PeerFactory, tmp_path: Path
) -> None:
    peer = await asyncio.to_thread(peers.start, config=examples_config())
    module = say(tmp_path, "deployed")
    done = await asyncio.to_thread(
        cli, peer, "deploy", "test:say", str(module), "--peer", peer.peer_id, "--timeout", "5"
    )
    assert done.returncode == 0, done.stderr
    assert f"ready on peer {peer.peer_id}" in done.stdout
    async with peer.client() as client:
        job = await client.submit("test:say")
        final = await client.wait(job.job_id)
        assert (state(final), final.output) == (JobState.SUCCEEDED, b"deployed")
        (row,) = await client.capabilities("test:say")
        assert (row.source, row.status) == ("deployed", "ready")
        assert row.executor.wasm.limits.timeout_ms == 5000
        # The capability's timeout is now its ceiling, as for a configured one.
        assert await code_of(client.submit("test:say", timeout_ms=6000)) is (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    undone = await asyncio.to_thread(cli, peer, "undeploy", "test:say", "--peer", peer.peer_id)
    assert undone.returncode == 0, undone.stderr
    async with peer.client() as client:

        async def refused() -> bool:
            return await code_of(client.submit("test:say")) is grpc.StatusCode.FAILED_PRECONDITION

        await eventually(refused, timeout=10)


async def test_a_fleet_deployment_reaches_every_peer_and_those_that_join(
    peers: PeerFactory, tmp_path: Path
) -> None:
    first = await asyncio.to_thread(peers.start, config=examples_config())
    second = await asyncio.to_thread(peers.start, config=examples_config())
    async with first.client() as client:
        ref = await client.upload(say(tmp_path, "everywhere"), bucket="modules")
    async with operator(first) as admin:
        await admin.deploy("test:everywhere", wasm(ref), max_concurrency=3)

        async def ready_on(expected: set[str]) -> bool:
            found = await rows(admin, "test:everywhere")
            return found == dict.fromkeys(expected, "ready")

        await eventually(lambda: ready_on({first.peer_id, second.peer_id}), timeout=20)
        third = await asyncio.to_thread(peers.start, config=examples_config())
        everyone = {first.peer_id, second.peer_id, third.peer_id}
        await eventually(lambda: ready_on(everyone), timeout=20)
        await asyncio.to_thread(peers.wait_converged, [first, second, third])
        # A job keyed to the newcomer runs there.
        ids = [uuid.UUID(p) for p in sorted(everyone)]
        keys = (f"k{i}" for i in range(200))
        key = next(k for k in keys if str(reference.rank(k, ids)[0]) == third.peer_id)
        async with first.client() as client:
            job = await client.submit("test:everywhere", locality_key=key)
            final = await client.wait(job.job_id)
        assert (state(final), final.output, final.peer_id) == (
            JobState.SUCCEEDED,
            b"everywhere",
            third.peer_id,
        )
        await admin.undeploy("test:everywhere")
        await eventually(lambda: ready_on(set()), timeout=20)


async def test_what_cannot_run_is_refused_and_nothing_is_written(
    peers: PeerFactory, tmp_path: Path, database_url: str
) -> None:
    peer = await asyncio.to_thread(peers.start, config=examples_config())
    no_start = write_guest(tmp_path, "no-start", '(module (memory (export "memory") 1))')
    env_import = write_guest(
        tmp_path,
        "env-import",
        '(module (import "env" "host_call" (func)) (memory (export "memory") 1) '
        '(func (export "_start")))',
    )
    good = say(tmp_path, "good")
    async with peer.client() as client:
        refs = {
            p.name: await client.upload(p, bucket="modules") for p in (no_start, env_import, good)
        }
    good_ref = refs[good.name]
    async with operator(peer) as admin:
        cases = [
            (wasm("anvil://modules/not/there.wasm"), grpc.StatusCode.NOT_FOUND, "not found"),
            (wasm(good_ref.split("?")[0], "0" * 64), grpc.StatusCode.FAILED_PRECONDITION, "sha256"),
            (wasm(refs[no_start.name]), grpc.StatusCode.INVALID_ARGUMENT, "_start"),
            (wasm(refs[env_import.name]), grpc.StatusCode.INVALID_ARGUMENT, "WASI"),
            (
                compute_pb2.Executor(podman=compute_pb2.PodmanExecutor(image="busybox:latest")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "not pinned by digest",
            ),
        ]
        for executor, code, words in cases:
            for peer_id in (peer.peer_id, ""):
                with pytest.raises(aio.AioRpcError) as caught:
                    await admin.deploy("test:bad", executor, peer_id=peer_id)
                assert caught.value.code() is code, (executor, caught.value.details())
                assert words in (caught.value.details() or ""), caught.value.details()
        # A peer's config is its own: no deployment over it, no undeploying it.
        for call in (
            admin.deploy("text:wordcount", wasm(good_ref), peer_id=peer.peer_id),
            admin.undeploy("text:wordcount", peer_id=peer.peer_id),
        ):
            assert await code_of(call) is grpc.StatusCode.FAILED_PRECONDITION
        assert await code_of(admin.undeploy("test:never")) is grpc.StatusCode.NOT_FOUND
    with psycopg.connect(database_url) as conn:
        written = conn.execute(
            "SELECT (SELECT count(*) FROM compute_capabilities WHERE capability = 'test:bad')"
            " + (SELECT count(*) FROM fleet_deployments)"
        ).fetchone()
    assert written == (0,)


async def test_a_deployment_outlives_its_peers_restart(peers: PeerFactory, tmp_path: Path) -> None:
    peer = await asyncio.to_thread(peers.start, config=examples_config(), name="keeper")
    async with peer.client() as client:
        ref = await client.upload(say(tmp_path, "again"), bucket="modules")
    async with operator(peer) as admin:
        await admin.deploy("test:again", wasm(ref), peer_id=peer.peer_id)
        await eventually(lambda: _ready(admin, "test:again", peer.peer_id), timeout=20)
    assert await asyncio.to_thread(peer.terminate) == 0
    again = await asyncio.to_thread(peers.start, config=examples_config(), name="keeper")
    assert again.peer_id == peer.peer_id
    async with again.client() as client:
        final = await client.wait((await client.submit("test:again")).job_id)
    assert (state(final), final.output) == (JobState.SUCCEEDED, b"again")


async def _ready(client: ComputeClient, capability: str, peer_id: str) -> bool:
    return (await rows(client, capability)).get(peer_id) == "ready"


async def test_sighup_reloads_the_configs_capabilities(peers: PeerFactory, tmp_path: Path) -> None:
    peer = await asyncio.to_thread(peers.start, config=examples_config())
    module = say(tmp_path, "reloaded")
    config = peer.data_dir / "config.toml"
    config.write_text(
        '[capabilities."text:count"]\nwasm = "builtin:text-wordcount"\n\n'
        f'[capabilities."test:reloaded"]\nwasm = "{module}"\n'
    )
    peer.process.send_signal(signal.SIGHUP)
    async with peer.client() as client:

        async def reloaded() -> bool:
            names = {r.capability for r in await client.capabilities(live_only=True)}
            return names == {"text:count", "test:reloaded"}

        await eventually(reloaded, timeout=20)
        for capability, output in (("test:reloaded", b"reloaded"), ("text:count", None)):
            final = await client.wait((await client.submit(capability)).job_id)
            assert state(final) is JobState.SUCCEEDED, final.error
            if output is not None:
                assert final.output == output
        # A config that cannot be read keeps what runs.
        config.write_text("[capabilities.\n")
        peer.process.send_signal(signal.SIGHUP)
        await eventually(lambda: "reload refused" in peer.log(), timeout=20)
        assert {r.capability for r in await client.capabilities(live_only=True)} == {
            "text:count",
            "test:reloaded",
        }
    assert peer.process.poll() is None


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('wasm = "/nowhere/module.wasm"', "cannot read module /nowhere/module.wasm"),
        (
            'wasm = "builtin:text-wordcount"\nsha256 = "' + "0" * 64 + '"',
            "not the expected 0000",
        ),
        ('wasm = "builtin:text-countwords"', "no builtin module 'text-countwords'"),
    ],
)
def test_a_module_that_cannot_be_pinned_stops_the_start_with_one_line(
    tmp_path: Path, database_url: str, table: str, words: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[capabilities."text:x"]\n{table}\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--database-url",
            database_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("anvil-compute: ") and words in last, done.stderr[-2000:]
