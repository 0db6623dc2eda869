"""Trust between tenants, operators and peers, attacked through real gRPC on real peers.

Each test is one hostile move from SECURITY.md's list, made against a real
`anvil-compute serve` with its own tokens, and the answer it must get.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc import aio

from daemon import auth
from daemon.client import ComputeClient
from daemon.convert import PROTO_TO_JOB_STATE
from daemon.exceptions import ObjectNotFound, PermissionDenied
from daemon.jobs.state import JobState
from daemon.pb.anvil import compute_pb2
from daemon.storage.anvil_client import AnvilClient
from daemon.storage.refs import parse_ref
from tests.e2e.cluster import Peer, PeerFactory, code_of
from tests.e2e.guests import examples_config, say, write_guest
from tests.eventually import eventually

pytestmark = pytest.mark.e2e

SLEEP_FOREVER_WAT = """
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i64.store (i32.const 0) (i64.const 0))
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 600000000000))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))
"""
# Writes "bad\0input\x1b[2J" to stderr, then exits 1.
NUL_STDERR_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "bad\\00input\\1b[2J")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 13))
    (drop (call $write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const 1))))
"""


def state(status: compute_pb2.GetJobStatusResponse) -> JobState:
    return PROTO_TO_JOB_STATE[status.state]


def secret_of(peers: PeerFactory) -> bytes:
    return peers.secret_file.read_text().strip().encode()


def token(peers: PeerFactory, sub: str, *scopes: str, tenant: str = "") -> str:
    return auth.issue_token(secret_of(peers), sub=sub, scopes=scopes, ttl_s=600, tenant=tenant)


def operator(peer: Peer) -> ComputeClient:
    return ComputeClient(peer.address, token=(peer.data_dir / "operator.token").read_text().strip())


def registration(peer_id: str, capability: str, **executor: Any) -> Any:
    wasm = compute_pb2.WasmExecutor(
        module_ref=executor.get("module_ref", "sha256:" + "a" * 64),
        module_sha256=executor.get("module_sha256", ""),
    )
    return compute_pb2.RegisterCapabilityRequest(
        peer_id=peer_id,
        region=executor.get("region", "local"),
        capability=capability,
        max_concurrency=1,
        resources=executor.get("resources", {}),
        executor=compute_pb2.Executor(wasm=wasm),
    )


@pytest.fixture
async def peer(peers: PeerFactory) -> Peer:
    return await asyncio.to_thread(peers.start, config=examples_config())


# --- the registry belongs to operators and peers ------------------------------


async def test_tokens_serve_writes_split_tenants_from_operators(
    peer: Peer, peers: PeerFactory
) -> None:
    for name in ("client.token", "operator.token"):
        mode = stat.S_IMODE((peer.data_dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    client_claims = auth.verify_token(peer.token, secret_of(peers))
    assert auth.SCOPE_REGISTER not in client_claims.scopes
    lifetime_days = (client_claims.exp - time.time()) / 86400
    assert 29 < lifetime_days <= 30
    async with peer.client() as client:
        code = await code_of(
            client.stub.RegisterCapability(
                registration(peer.peer_id, "text:wordcount", region="elsewhere"),
                metadata=client.metadata,
            )
        )
        assert code is grpc.StatusCode.PERMISSION_DENIED
        code = await code_of(
            client.stub.DeregisterCapability(
                compute_pb2.DeregisterCapabilityRequest(
                    peer_id=peer.peer_id, capability="text:wordcount"
                ),
                metadata=client.metadata,
            )
        )
        assert code is grpc.StatusCode.PERMISSION_DENIED
        listed = await client.capabilities("text:wordcount")
    assert [(c.region, c.peer_id) for c in listed] == [("local", peer.peer_id)]


async def test_a_peer_token_registers_for_that_peer_only(
    peer: Peer, peers: PeerFactory, tmp_path: Path
) -> None:
    async with peer.client() as client:
        ref = await client.upload(say(tmp_path, "A"))
    own = token(peers, f"peer:{peer.peer_id}", auth.SCOPE_PEER)
    other = token(peers, f"peer:{uuid.uuid4()}", auth.SCOPE_PEER)
    request = registration(peer.peer_id, "test:own", module_ref=ref)
    async with ComputeClient(peer.address, token=other) as client:
        code = await code_of(client.stub.RegisterCapability(request, metadata=client.metadata))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        # Nor may a peer deploy to a whole region: that is an operator's call.
        fleet = registration("", "test:own", module_ref=ref)
        code = await code_of(client.stub.RegisterCapability(fleet, metadata=client.metadata))
        assert code is grpc.StatusCode.PERMISSION_DENIED
    async with ComputeClient(peer.address, token=own) as client:
        reply = await client.stub.RegisterCapability(request, metadata=client.metadata)
        assert reply.capability.executor.wasm.module_sha256 == parse_ref(ref).sha256


async def test_registration_is_checked_before_anything_is_written(
    peer: Peer, database_url: str
) -> None:
    async with operator(peer) as client:
        unknown = registration(str(uuid.uuid4()), "test:phantom")
        with pytest.raises(aio.AioRpcError) as caught:
            await client.stub.RegisterCapability(unknown, metadata=client.metadata)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert "not registered" in (caught.value.details() or "")
        oversized = [
            registration(peer.peer_id, "test:big", module_ref="anvil://m/" + "k" * 20_000),
            registration(peer.peer_id, "test:big", resources={f"k{i}": "v" for i in range(65)}),
            registration(peer.peer_id, "test:big", resources={"k": "v" * 257}),
            registration(peer.peer_id, "test:big", module_sha256="not-hex"),
            # A path on another peer cannot be hashed from here: it needs its digest.
            registration(peer.peer_id, "test:big", module_ref="/opt/module.wasm"),
        ]
        for request in oversized:
            code = await code_of(client.stub.RegisterCapability(request, metadata=client.metadata))
            assert code is grpc.StatusCode.INVALID_ARGUMENT, request
    with psycopg.connect(database_url) as conn:
        (rows,) = conn.execute(
            "SELECT count(*) FROM compute_capabilities WHERE capability LIKE 'test:%'"
        ).fetchone()
    assert rows == 0


async def test_an_unpinned_module_ref_is_pinned_when_registered(peer: Peer, tmp_path: Path) -> None:
    module = say(tmp_path, "A")
    async with peer.client() as client:
        ref = await client.upload(module)
    unpinned = parse_ref(ref).location
    async with operator(peer) as client:
        reply = await client.stub.RegisterCapability(
            registration(peer.peer_id, "test:pinned", module_ref=unpinned),
            metadata=client.metadata,
        )
        wasm = reply.capability.executor.wasm
        assert wasm.module_sha256 == parse_ref(ref).sha256
        assert parse_ref(wasm.module_ref).sha256 == wasm.module_sha256
        code = await code_of(
            client.stub.RegisterCapability(
                registration(
                    peer.peer_id, "test:pinned", module_ref=unpinned, module_sha256="b" * 64
                ),
                metadata=client.metadata,
            )
        )
        assert code is grpc.StatusCode.FAILED_PRECONDITION


async def test_list_capabilities_pages_through_every_row_once(
    peer: Peer, database_url: str
) -> None:
    # 230 rows of a large fabric, written as its peers would (straight into the
    # registry: a deployment of each would make this peer run them all).
    names = [f"test:page{i:03d}" for i in range(230)]
    with psycopg.connect(database_url) as conn:
        for name in names:
            conn.execute(
                "INSERT INTO compute_capabilities VALUES (%s, 'local', %s, '{}', 1)",
                (uuid.uuid4(), name),
            )
    async with operator(peer) as client:
        seen: list[str] = []
        page_token, pages = "", 0
        while True:
            reply = await client.stub.ListCapabilities(
                compute_pb2.ListCapabilitiesRequest(page_size=100, page_token=page_token),
                metadata=client.metadata,
            )
            pages += 1
            assert len(reply.capabilities) <= 100
            seen += [c.capability for c in reply.capabilities]
            page_token = reply.next_page_token
            if not page_token:
                break
        assert sorted(n for n in seen if n.startswith("test:page")) == names
        assert len(seen) == len(set(seen)) and pages == 3
        for bad in (
            compute_pb2.ListCapabilitiesRequest(page_size=5000),
            compute_pb2.ListCapabilitiesRequest(page_token="not-a-token"),
        ):
            code = await code_of(client.stub.ListCapabilities(bad, metadata=client.metadata))
            assert code is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_tampered_row_heals_at_the_next_heartbeat(peer: Peer, database_url: str) -> None:
    async with operator(peer) as admin:
        # Not through the API: a peer's config rows are its own ...
        code = await code_of(
            admin.stub.RegisterCapability(
                registration(peer.peer_id, "text:wordcount", region="elsewhere"),
                metadata=admin.metadata,
            )
        )
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        # ... but a write straight into the registry (a restored backup, a hand).
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "UPDATE compute_capabilities SET region = 'elsewhere' "
                "WHERE peer_id = %s AND capability = 'text:wordcount'",
                (peer.peer_id,),
            )

        async def healed() -> bool:
            rows = await admin.capabilities("text:wordcount")
            return [r.region for r in rows] == ["local"] and bool(rows[0].executor.wasm.module_ref)

        await eventually(healed, timeout=20)
    async with peer.client() as client:
        job = await client.submit("text:wordcount", deadline_s=30)
        assert state(await client.wait(job.job_id)) is JobState.SUCCEEDED


# --- a tenant's jobs are its own ------------------------------------------------


async def test_another_tenant_cannot_see_watch_or_cancel_a_job(
    peers: PeerFactory, tmp_path: Path
) -> None:
    sleeper = write_guest(tmp_path, "sleep", SLEEP_FOREVER_WAT)
    config = examples_config() + f'[capabilities."test:sleep"]\nwasm = "{sleeper}"\n'
    peer = await asyncio.to_thread(peers.start, config=config)
    scopes = (auth.SCOPE_SUBMIT, auth.SCOPE_READ, auth.SCOPE_CANCEL)
    alice = ComputeClient(peer.address, token=token(peers, "alice", *scopes))
    mallory = ComputeClient(peer.address, token=token(peers, "mallory", *scopes))
    async with alice, mallory, operator(peer) as admin:
        job = await alice.submit("test:sleep", params={"secret": "alice's key"})
        for call in (
            mallory.status(job.job_id),
            mallory.cancel(job.job_id),
            mallory.wait(job.job_id),
        ):
            with pytest.raises(aio.AioRpcError) as caught:
                await call
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
            # Worded as for a job that does not exist: nothing leaks.
            assert caught.value.details() == f"job {job.job_id} not found"
        assert state(await alice.status(job.job_id)) in (JobState.QUEUED, JobState.RUNNING)
        # Same submitter name, other tenant: still not the same owner.
        other_tenant = ComputeClient(
            peer.address, token=token(peers, "alice", *scopes, tenant="acme")
        )
        async with other_tenant:
            assert await code_of(other_tenant.status(job.job_id)) is grpc.StatusCode.NOT_FOUND
        # An operator sees and cancels every tenant's jobs.
        assert (await admin.status(job.job_id)).job_id == job.job_id
        cancelled = await admin.cancel(job.job_id)
        assert PROTO_TO_JOB_STATE[cancelled.state] is JobState.CANCELLED


async def test_outputs_are_readable_by_their_submitter_only(
    peers: PeerFactory, tmp_path: Path
) -> None:
    # Every stdout spills to an object here.
    peer = await asyncio.to_thread(
        peers.start, config=examples_config(), ANVIL_MAX_INLINE_OUTPUT="1"
    )
    (tmp_path / "notes.txt").write_bytes(b"word " * 1000)
    async with peer.client() as uploader:
        ref = await uploader.upload(tmp_path / "notes.txt")
    # Alice may submit and read her jobs, and read nothing else: no object scope at all.
    alice_token = token(peers, "alice", auth.SCOPE_SUBMIT, auth.SCOPE_READ, "object:read|inputs/*")
    mallory_token = token(peers, "mallory", *auth.CLIENT_SCOPES)
    async with ComputeClient(peer.address, token=alice_token) as alice:
        job = await alice.submit("text:wordcount", inputs=[ref], params={"top": "1"}, deadline_s=30)
        final = await alice.wait(job.job_id)
    assert state(final) is JobState.SUCCEEDED, final.error
    outputs = list(final.output_refs)
    assert outputs and not final.output
    result = parse_ref(outputs[0])
    async with AnvilClient.connect(peer.address, token=alice_token) as objects:
        assert (await objects.head(result)).sha256 == result.sha256
    async with AnvilClient.connect(peer.address, token=mallory_token) as objects:
        with pytest.raises(ObjectNotFound):
            await objects.head(result)
        with pytest.raises(ObjectNotFound):
            async with objects.open(result):
                pass

        async def forged() -> AsyncIterator[bytes]:
            yield b"forged result"

        with pytest.raises(PermissionDenied):
            await objects.put(forged(), bucket=result.bucket, key=result.key)
    # Nor can Mallory have a guest read it for her.
    async with ComputeClient(peer.address, token=mallory_token) as mallory:
        code = await code_of(mallory.submit("text:wordcount", inputs=[outputs[0]]))
        assert code is grpc.StatusCode.NOT_FOUND


async def test_bucket_scopes_bound_reads_writes_and_job_inputs(
    peer: Peer, peers: PeerFactory
) -> None:
    async def one(data: bytes) -> AsyncIterator[bytes]:
        yield data

    async with AnvilClient.connect(peer.address, token=peer.token) as owner:
        await owner.put(one(b"top secret"), bucket="private", key="plans.txt")
        await owner.put(one(b"hello photos"), bucket="photos", key="2026/a.txt")
    scoped = token(
        peers,
        "bob",
        auth.SCOPE_SUBMIT,
        auth.SCOPE_READ,
        "object:read|photos/*",
        "object:write|photos/2026/*",
    )
    async with AnvilClient.connect(peer.address, token=scoped) as bob:
        assert (await bob.head(parse_ref("anvil://photos/2026/a.txt"))).size == 12
        with pytest.raises(PermissionDenied):
            await bob.head(parse_ref("anvil://private/plans.txt"))
        await bob.put(one(b"mine"), bucket="photos", key="2026/b.txt")
        for bucket, key in (("photos", "2025/old.txt"), ("private", "plans.txt")):
            with pytest.raises(PermissionDenied):
                await bob.put(one(b"overwrite"), bucket=bucket, key=key)
    async with (
        AnvilClient.connect(peer.address, token=peer.token) as owner,
        owner.open(parse_ref("anvil://private/plans.txt")) as reader,
    ):
        assert b"".join([c async for c in reader.chunks]) == b"top secret"
    async with ComputeClient(peer.address, token=scoped) as client:
        assert (
            await code_of(client.submit("text:wordcount", inputs=["anvil://private/plans.txt"]))
            is grpc.StatusCode.PERMISSION_DENIED
        )
        # A digest names bytes wherever they are: it takes read rights on every bucket.
        digest = "sha256:" + "0" * 64
        assert (
            await code_of(client.submit("text:wordcount", inputs=[digest]))
            is grpc.StatusCode.PERMISSION_DENIED
        )
        job = await client.submit("text:wordcount", inputs=["anvil://photos/2026/a.txt"])
        assert state(await client.wait(job.job_id)) is JobState.SUCCEEDED


async def test_submit_scopes_can_name_capabilities(peer: Peer, peers: PeerFactory) -> None:
    text_only = token(peers, "carol", "compute:submit|text:*", auth.SCOPE_READ)
    async with ComputeClient(peer.address, token=text_only) as client:
        job = await client.submit("text:wordcount")
        assert state(await client.wait(job.job_id)) is JobState.SUCCEEDED
        code = await code_of(client.submit("data:csv-aggregate"))
        assert code is grpc.StatusCode.PERMISSION_DENIED


# --- limits a job may only lower, and what a guest says ----------------------


async def test_a_job_may_only_lower_its_capabilitys_timeout(
    peers: PeerFactory, tmp_path: Path
) -> None:
    config = examples_config().replace(
        '[capabilities."text:wordcount"]', '[capabilities."text:wordcount"]\ntimeout_ms = 5000'
    )
    peer = await asyncio.to_thread(peers.start, config=config, ANVIL_MAX_JOB_TIMEOUT_S="60")
    async with peer.client() as client:
        for capability, timeout_ms in (("text:wordcount", 5001), ("data:csv-aggregate", 60_001)):
            with pytest.raises(aio.AioRpcError) as caught:
                await client.submit(capability, timeout_ms=timeout_ms)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        job = await client.submit("text:wordcount", timeout_ms=4000)
        assert state(await client.wait(job.job_id)) is JobState.SUCCEEDED


async def test_sleeping_guests_cannot_take_every_worker(peers: PeerFactory, tmp_path: Path) -> None:
    sleeper = write_guest(tmp_path, "sleep", SLEEP_FOREVER_WAT)
    config = examples_config() + (
        f'[capabilities."test:sleep"]\nwasm = "{sleeper}"\nmax_concurrency = 8\n'
    )
    peer = await asyncio.to_thread(peers.start, config=config, ANVIL_WASM_WORKERS="3")
    async with peer.client() as client:
        sleepers = [await client.submit("test:sleep") for _ in range(5)]

        async def two_running() -> bool:
            states = [state(await client.status(j.job_id)) for j in sleepers]
            return states.count(JobState.RUNNING) == 2

        await eventually(two_running)
        # Three workers: the sleepers hold two, and the ones left wait QUEUED, not
        # RUNNING (a job waiting for a worker has not started).
        states = [state(await client.status(j.job_id)) for j in sleepers]
        assert states.count(JobState.QUEUED) == 3, states
        job = await client.submit("text:wordcount", deadline_s=30)
        final = await asyncio.wait_for(client.wait(job.job_id), 30)
        assert state(final) is JobState.SUCCEEDED
        for sleeping in sleepers:
            await client.cancel(sleeping.job_id)


async def test_control_bytes_in_a_guests_message_are_kept_escaped(
    peers: PeerFactory, tmp_path: Path
) -> None:
    guest = write_guest(tmp_path, "nul", NUL_STDERR_WAT)
    config = examples_config() + f'[capabilities."test:nul"]\nwasm = "{guest}"\n'
    peer = await asyncio.to_thread(peers.start, config=config)
    async with peer.client() as client:
        job = await client.submit("test:nul")
        final = await client.wait(job.job_id)
    assert state(final) is JobState.FAILED
    assert final.error == "bad\\x00input\\x1b[2J"


async def test_a_configured_module_runs_the_bytes_pinned_at_start(
    peers: PeerFactory, tmp_path: Path
) -> None:
    first = await asyncio.to_thread(peers.start, config=examples_config())
    original = say(tmp_path, "A")
    async with first.client() as client:
        ref = await client.upload(original)
    location = parse_ref(ref)
    config = f'[capabilities."test:letter"]\nwasm = "{location.location}"\n'
    peer = await asyncio.to_thread(peers.start, config=config)
    # A tenant with write access to that key replaces the module's bytes.
    replacement = say(tmp_path, "B")
    async with AnvilClient.connect(peer.address, token=peer.token) as objects:
        await objects.put_file(replacement, bucket=location.bucket, key=location.key)
        assert (await objects.head(parse_ref(location.location))).sha256 != location.sha256
    async with peer.client() as client:
        listed = await client.capabilities("test:letter")
        assert listed[0].executor.wasm.module_sha256 == location.sha256
        job = await client.submit("test:letter")
        final = await client.wait(job.job_id)
    assert state(final) is JobState.SUCCEEDED, final.error
    assert final.output == b"A"


def test_token_issue_mints_narrower_tokens(peers: PeerFactory, tmp_path: Path) -> None:
    def issue(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", "token", "issue", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "ANVIL_CONFIG": "/dev/null", **env},
        )

    secret_env = {"ANVIL_AUTH_SECRET_FILE": str(peers.secret_file)}
    made = issue("--sub", "dave", "--bucket", "photos/2026", "--ttl", "2h", **secret_env)
    assert made.returncode == 0, made.stderr
    claims = auth.verify_token(made.stdout.strip(), secret_of(peers))
    assert claims.sub == "dave"
    assert "object:read|photos/2026*" in claims.scopes
    assert not any(s in claims.scopes for s in ("object:read", "compute:register"))
    assert 7100 < claims.exp - time.time() <= 7200
    bad = issue("--sub", "x", "--scope", "compute:everything", **secret_env)
    assert bad.returncode == 1 and "unknown action" in bad.stderr
    missing = issue("--sub", "x", ANVIL_DATA_DIR=str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no auth secret" in missing.stderr
    assert not (tmp_path / "nowhere" / "auth.secret").exists()


async def test_outputs_go_with_their_pruned_job(peers: PeerFactory) -> None:
    peer = await asyncio.to_thread(
        peers.start,
        config=examples_config(),
        ANVIL_MAX_INLINE_OUTPUT="1",
        ANVIL_JOB_RETENTION_S="1",
    )
    async with peer.client() as client:
        job = await client.submit("text:wordcount")
        final = await client.wait(job.job_id)
    assert state(final) is JobState.SUCCEEDED and final.output_refs
    result = parse_ref(final.output_refs[0])
    # An operator may read any result: what it gets is the object's own answer.
    admin_token = (peer.data_dir / "operator.token").read_text().strip()
    async with AnvilClient.connect(peer.address, token=admin_token) as objects:

        async def gone() -> bool:
            try:
                await objects.head(result)
            except ObjectNotFound:
                return True
            return False

        await eventually(gone, timeout=30)
    assert peer.metric("anvil_compute_result_objects_deleted_total") >= 1
