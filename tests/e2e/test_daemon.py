"""One real `anvil-compute serve` process, driven through the generated gRPC client."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc import aio

from daemon.convert import PROTO_TO_JOB_STATE
from daemon.exceptions import ResourceExhausted
from daemon.jobs.state import JobState
from daemon.pb.anvil import compute_pb2
from tests.e2e.cluster import Peer, PeerFactory
from tests.e2e.guests import REPO, guests_config
from tests.eventually import eventually

pytestmark = pytest.mark.e2e


def state(status: compute_pb2.GetJobStatusResponse) -> JobState:
    return PROTO_TO_JOB_STATE[status.state]


@pytest.fixture
async def peer(peers: PeerFactory, tmp_path: Path) -> Peer:
    return await asyncio.to_thread(peers.start, config=guests_config(tmp_path))


async def test_every_example_capability_end_to_end(peer: Peer, tmp_path: Path) -> None:
    text = "the quick brown fox\njumps over the lazy dog\nthe end\n"
    table = "city,amount\nParis,3\nLyon,4\nParis,5\n"
    width, height = 4, 2
    image = b"P5\n4 2\n255\n" + bytes(range(0, 256, 32))
    digits = (REPO / "guest_modules" / "models" / "digits-logreg.bin").read_bytes()
    zero = ",".join(["0"] * 64)
    files = {
        "text.txt": text.encode(),
        "table.csv": table.encode(),
        "img.pgm": image,
        "model.bin": digits,
        "digits.csv": (zero + "\n").encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    async with peer.client() as client:
        refs = {name: await client.upload(tmp_path / name) for name in files}
        jobs = {
            "wordcount": await client.submit("text:wordcount", inputs=[refs["text.txt"]]),
            "aggregate": await client.submit(
                "data:csv-aggregate",
                inputs=[refs["table.csv"]],
                params={"group_by": "city", "agg": "sum", "column": "amount"},
            ),
            "resize": await client.submit(
                "image:resize",
                inputs=[refs["img.pgm"]],
                params={"width": str(width * 2), "height": str(height * 2)},
            ),
            "digits": await client.submit(
                "inference:digits", inputs=[refs["digits.csv"], refs["model.bin"]]
            ),
        }
        final = {name: await client.wait(r.job_id) for name, r in jobs.items()}
    for name, status in final.items():
        assert state(status) is JobState.SUCCEEDED, (name, status.error)
        assert status.peer_id == peer.peer_id and status.attempt == 1
    counts = json.loads(final["wordcount"].output)
    assert (counts["lines"], counts["words"], counts["bytes"]) == (3, 11, len(text))
    assert counts["top"][0] == ["the", 3]
    rows = list(csv.reader(io.StringIO(final["aggregate"].output.decode())))
    assert {r[0]: float(r[1]) for r in rows[1:]} == {"Paris": 8.0, "Lyon": 4.0}
    (resized_ref,) = final["resize"].output_refs
    assert re.fullmatch(r"anvil://anvil-results/.+\?sha256=[0-9a-f]{64}", resized_ref)
    predictions = json.loads(final["digits"].output)
    assert predictions["count"] == 1 and len(predictions["predictions"]) == 1


async def test_a_corrupt_cached_input_is_fetched_again_not_fed_to_the_guest(
    peer: Peer, tmp_path: Path
) -> None:
    text = "alpha beta gamma\n" * 1000
    (tmp_path / "words.txt").write_text(text)
    async with peer.client() as client:
        ref = await client.upload(tmp_path / "words.txt")
        first = await client.wait((await client.submit("text:wordcount", inputs=[ref])).job_id)
        assert state(first) is JobState.SUCCEEDED, first.error
        # A failing disk turns "alpha" into "alphb" in the peer's cached copy.
        entry = peer.data_dir / "cache" / "objects" / ref.rpartition("sha256=")[2]
        entry.chmod(0o644)
        with entry.open("r+b") as f:
            f.seek(4)
            f.write(b"b")
        second = await client.wait((await client.submit("text:wordcount", inputs=[ref])).job_id)
    assert state(second) is JobState.SUCCEEDED, second.error
    assert json.loads(second.output) == json.loads(first.output)
    assert json.loads(second.output)["words"] == 3000
    assert await asyncio.to_thread(peer.metric, "anvil_compute_cache_corrupt_entries_total") == 1


async def test_max_store_bytes_refuses_an_upload_with_resource_exhausted(
    peers: PeerFactory, tmp_path: Path
) -> None:
    peer = await asyncio.to_thread(peers.start, ANVIL_MAX_STORE_BYTES=str(1 << 20))
    (tmp_path / "small").write_bytes(b"x" * 1000)
    (tmp_path / "big").write_bytes(b"y" * (2 << 20))
    async with peer.client() as client:
        await client.upload(tmp_path / "small")
        with pytest.raises(ResourceExhausted, match="max_store_bytes"):
            await client.upload(tmp_path / "big")


async def test_watch_sees_queued_running_succeeded(peer: Peer) -> None:
    async with peer.client() as client:
        first = await client.submit("test:sleep")
        second = await client.submit("test:sleep")  # one slot: waits behind the first
        seen = [state(s) for s in [s async for s in client.watch(second.job_id)]]
        assert seen == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
        final = await client.status(second.job_id)
        assert final.output == b"slept\n"
        assert state(await client.status(first.job_id)) is JobState.SUCCEEDED


async def test_queue_depth_shows_jobs_waiting_for_a_slot(peer: Peer) -> None:
    async with peer.client() as client:
        ids = [(await client.submit("test:sleep")).job_id for _ in range(4)]  # one slot

        async def queue_depth() -> float:
            return await asyncio.to_thread(peer.metric, "anvil_compute_queue_depth")

        async def two_waiting() -> bool:  # of the three behind the first
            return await queue_depth() >= 2

        async def none_waiting() -> bool:
            return await queue_depth() == 0

        await eventually(two_waiting, timeout=6)
        for job_id in ids:
            assert state(await client.wait(job_id)) is JobState.SUCCEEDED
        await eventually(none_waiting, timeout=10)


async def test_cancel_queued_never_runs_and_cancel_running_kills(
    peer: Peer, database_url: str
) -> None:
    async with peer.client() as client:
        running = await client.submit("test:sleep", timeout_ms=60_000)
        queued = await client.submit("test:sleep")
        async for status in client.watch(running.job_id):
            if state(status) is JobState.RUNNING:
                break
        assert state(await client.status(queued.job_id)) is JobState.QUEUED
        response = await client.cancel(queued.job_id, reason="not needed")
        assert PROTO_TO_JOB_STATE[response.state] is JobState.CANCELLED
        stopped = await client.cancel(running.job_id)
        assert PROTO_TO_JOB_STATE[stopped.state] is JobState.CANCELLED
        # The killed guest frees the slot: a new sleep job runs and finishes.
        after = await client.submit("test:sleep")
        assert state(await asyncio.wait_for(client.wait(after.job_id), 20)) is JobState.SUCCEEDED
        cancelled = await client.status(queued.job_id)
        assert state(cancelled) is JobState.CANCELLED and cancelled.error == "not needed"
        assert not cancelled.HasField("started_at")
        with pytest.raises(aio.AioRpcError) as info:
            await client.cancel(queued.job_id)
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    with psycopg.connect(database_url) as conn:
        events = conn.execute(
            "SELECT to_state::text FROM job_events WHERE job_id = %s ORDER BY event_id",
            (queued.job_id,),
        ).fetchall()
        assert [e[0] for e in events] == ["queued", "cancelled"]
    assert "slept" not in (await _output_of(peer, running.job_id))
    async with peer.client() as client:
        ended = await client.status(running.job_id)
    assert state(ended) is JobState.CANCELLED
    # The guest sleeps 1.5 s: a run that ended sooner was stopped, not awaited.
    ran = ended.finished_at.ToDatetime() - ended.started_at.ToDatetime()
    assert ran.total_seconds() < 1.5, ran
    # The journal says so, as JSON lines an operator can filter by job id.
    lines = [json.loads(line) for line in peer.log().splitlines() if line.startswith("{")]
    about = [e for e in lines if e.get("job_id") == running.job_id]
    assert any("stopped" in e["msg"] or "stopping" in e["msg"] for e in about), about


async def _output_of(peer: Peer, job_id: str) -> str:
    async with peer.client() as client:
        return (await client.status(job_id)).output.decode()


async def test_hostile_guests_end_with_a_reason_and_the_daemon_serves_on(peer: Peer) -> None:
    async with peer.client() as client:
        spin = await client.submit("test:spin")
        trap = await client.submit("test:trap")
        spun = await asyncio.wait_for(client.wait(spin.job_id), 30)
        trapped = await asyncio.wait_for(client.wait(trap.job_id), 30)
        assert state(spun) is JobState.TIMED_OUT and "timed out" in spun.error
        assert state(trapped) is JobState.FAILED and "unreachable" in trapped.error
        ok = await client.submit("text:wordcount", params={})
        assert state(await client.wait(ok.job_id)) is JobState.SUCCEEDED


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_thousand_jobs_from_sixteen_clients(peer: Peer, database_url: str) -> None:
    per_client = 1000 // 16 + 1

    async def one_client(index: int) -> list[str]:
        async with peer.client() as client:
            ids = []
            for n in range(per_client):
                response = await client.submit(
                    "text:wordcount", params={}, idempotency_key=f"c{index}-{n}"
                )
                ids.append(response.job_id)
            return ids

    ids = [i for batch in await asyncio.gather(*(one_client(i) for i in range(16))) for i in batch]
    assert len(ids) == len(set(ids)) == 16 * per_client
    async with peer.client() as client:
        finals = await asyncio.gather(*(asyncio.wait_for(client.wait(i), 240) for i in ids))
    assert Counter(state(f) for f in finals) == {JobState.SUCCEEDED: len(ids)}
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT job_id::text, count(*) FILTER (WHERE to_state = 'running'), "
            "count(*) FILTER (WHERE to_state = 'succeeded') FROM job_events GROUP BY job_id"
        ).fetchall()
    per_job: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
    per_job.update({r[0]: (r[1], r[2]) for r in rows})
    assert {per_job[i] for i in ids} == {(1, 1)}, "each job ran and succeeded exactly once"
    assert len(rows) == len(ids)


async def test_bad_requests_get_the_right_status(peer: Peer, peers: PeerFactory) -> None:
    from daemon import auth
    from daemon.client import ComputeClient

    secret = peers.secret_file.read_text().strip().encode()

    async def code_of(coro: object) -> grpc.StatusCode:
        with pytest.raises(aio.AioRpcError) as info:
            await coro  # type: ignore[misc]
        return info.value.code()

    async def refusal(coro: object) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(aio.AioRpcError) as info:
            await coro  # type: ignore[misc]
        return info.value.code(), info.value.details() or ""

    async with peer.client() as client:
        assert await code_of(client.submit("")) is grpc.StatusCode.INVALID_ARGUMENT
        # No peer can take it: the reason names what was asked for.
        code, why = await refusal(client.submit("no:such-capability"))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert "'no:such-capability'" in why and "'local'" in why, why
        code, why = await refusal(client.submit("text:wordcount", region="mars"))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert "'mars'" in why and "'text:wordcount'" in why, why
        code, why = await refusal(client.submit("text:wordcount", resources={"gpu": "1"}))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert "gpu" in why, why
        assert await code_of(client.submit("text:wordcount", inputs=["ftp://x/y"])) is (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert await code_of(client.status("not-a-uuid")) is grpc.StatusCode.INVALID_ARGUMENT
        missing = "00000000-0000-4000-8000-000000000000"
        assert await code_of(client.status(missing)) is grpc.StatusCode.NOT_FOUND
        big = {"blob": "x" * (40 * 1024 * 1024)}
        assert await code_of(client.submit("text:wordcount", params=big)) is (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert (
            await code_of(client.submit("text:wordcount", params={"p": "x" * 70_000}))
            is grpc.StatusCode.INVALID_ARGUMENT
        )
    tokens = {
        "missing": None,
        "forged": auth.issue_token(b"not-the-secret" * 3, sub="x", scopes=["*"], ttl_s=60),
        "expired": auth.issue_token(secret, sub="x", scopes=["*"], ttl_s=-10),
    }
    for why, token in tokens.items():
        async with ComputeClient(peer.address, token=token) as client:
            code = await code_of(client.submit("text:wordcount"))
            assert code is grpc.StatusCode.UNAUTHENTICATED, why
    reader = auth.issue_token(secret, sub="r", scopes=[auth.SCOPE_READ], ttl_s=60)
    async with ComputeClient(peer.address, token=reader) as client:
        assert await code_of(client.submit("text:wordcount")) is (grpc.StatusCode.PERMISSION_DENIED)
        assert await code_of(client.cancel(missing)) is grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(client.status(missing)) is grpc.StatusCode.NOT_FOUND
    # compute:register, and nothing else, lets a caller register capabilities.
    async with peer.client() as client:
        module = await client.upload(REPO / "guest_modules" / "dist" / "text-wordcount.wasm")
    registration = compute_pb2.RegisterCapabilityRequest(
        peer_id=peer.peer_id,
        region="local",
        capability="test:registered",
        max_concurrency=1,
        executor=compute_pb2.Executor(wasm=compute_pb2.WasmExecutor(module_ref=module)),
    )
    for scopes, expected in [
        (
            [auth.SCOPE_READ, auth.SCOPE_SUBMIT, auth.SCOPE_CANCEL],
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        ([auth.SCOPE_REGISTER], None),
    ]:
        token = auth.issue_token(secret, sub="reg", scopes=scopes, ttl_s=60)
        async with ComputeClient(peer.address, token=token) as client:
            call = client.stub.RegisterCapability(
                registration, metadata=client.metadata, timeout=30
            )
            if expected is None:
                registered = await call
                assert registered.capability.capability == "test:registered"
            else:
                assert await code_of(call) is expected
    async with peer.client() as client:
        listed = await client.capabilities(capability="test:registered")
    assert [c.peer_id for c in listed] == [peer.peer_id]


async def test_finished_jobs_are_pruned_after_their_retention(
    peers: PeerFactory, tmp_path: Path, database_url: str
) -> None:
    peer = await asyncio.to_thread(
        peers.start, config=guests_config(tmp_path), ANVIL_JOB_RETENTION_S="1"
    )
    async with peer.client() as client:
        done = await client.submit("text:wordcount")
        assert state(await client.wait(done.job_id)) is JobState.SUCCEEDED

        async def gone() -> grpc.StatusCode | None:
            try:
                await client.status(done.job_id)
            except aio.AioRpcError as exc:
                return exc.code()
            return None

        assert await eventually(gone, timeout=30) is grpc.StatusCode.NOT_FOUND
    # (That jobs which have not ended are never pruned: test_registry_jobs.py.)
    with psycopg.connect(database_url) as conn:
        (events,) = conn.execute(
            "SELECT count(*) FROM job_events WHERE job_id = %s", (done.job_id,)
        ).fetchone()
    assert events == 0
    assert peer.metric("anvil_compute_jobs_pruned_total") >= 1
