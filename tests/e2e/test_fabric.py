"""Several real peers on one registry: HRW placement, locality, failover, drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections import Counter
from pathlib import Path

import grpc
import psycopg
import pytest

import hrw
from daemon.convert import PROTO_TO_JOB_STATE
from daemon.jobs.state import JobState
from daemon.pb.anvil import compute_pb2
from daemon.storage.refs import parse_ref
from tests.e2e.cluster import Peer, PeerFactory
from tests.e2e.guests import fabric_config
from tests.eventually import eventually

pytestmark = pytest.mark.e2e


def state(status: compute_pb2.GetJobStatusResponse) -> JobState:
    return PROTO_TO_JOB_STATE[status.state]


async def start_peers(peers: PeerFactory, n: int, config: str, **env: str) -> list[Peer]:
    cluster = [await asyncio.to_thread(peers.start, config=config, **env) for _ in range(n)]
    await asyncio.to_thread(peers.wait_converged, cluster)
    return cluster


def events_per_job(database_url: str) -> dict[str, Counter[str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT job_id::text, to_state::text, count(*) FROM job_events GROUP BY 1, 2"
        ).fetchall()
    out: dict[str, Counter[str]] = {}
    for job_id, to_state, n in rows:
        out.setdefault(job_id, Counter())[to_state] = n
    return out


async def wait_all(
    peer: Peer, ids: list[str], timeout: float
) -> list[compute_pb2.GetJobStatusResponse]:
    """Follow every job to its end, all at once on one client (which bounds its
    own streams in flight: daemon/client.py)."""
    async with peer.client() as client:
        return list(await asyncio.wait_for(asyncio.gather(*(client.wait(i) for i in ids)), timeout))


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_three_peers_run_3000_jobs_once_each_where_hrw_says(
    peers: PeerFactory, tmp_path: Path, database_url: str
) -> None:
    # Capacity and balance out of reach: placement must be plain HRW.
    cluster = await start_peers(
        peers, 3, fabric_config(tmp_path, max_concurrency=10_000), ANVIL_BALANCE="1000000"
    )
    ids_by_peer = [uuid.UUID(p.peer_id) for p in cluster]
    keys = [f"key-{i}" for i in range(3000)]

    async def front_door(index: int) -> list[tuple[str, str]]:
        peer = cluster[index % 3]
        async with peer.client() as client:
            out = []
            for key in keys[index::16]:
                response = await client.submit("text:wordcount", locality_key=key)
                out.append((key, response.job_id))
            return out

    submitted = [
        x for batch in await asyncio.gather(*(front_door(i) for i in range(16))) for x in batch
    ]
    assert len(submitted) == 3000
    finals = await wait_all(cluster[0], [job_id for _, job_id in submitted], 300)
    assert Counter(state(f) for f in finals) == {JobState.SUCCEEDED: 3000}
    expected_output = finals[0].output
    assert json.loads(expected_output)["words"] == 0
    for (key, _), final in zip(submitted, finals, strict=True):
        assert final.peer_id == str(hrw.rank(key, ids_by_peer)[0]), key
        assert final.attempt == 1 and final.output == expected_output
    per_job = events_per_job(database_url)
    assert {(c["running"], c["succeeded"]) for c in per_job.values()} == {(1, 1)}
    assert len({f.peer_id for f in finals}) == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_kill_9_of_a_peer_loses_no_job(
    peers: PeerFactory, tmp_path: Path, database_url: str
) -> None:
    # A peer claims a job only with a worker free for it (daemon/jobs/slots.py): the
    # victim runs 15 naps at once (16 workers, one kept for other capabilities)
    # and holds the rest of its share queued.
    cluster = await start_peers(
        peers,
        3,
        fabric_config(tmp_path, max_concurrency=120, nap_s=1.0),
        ANVIL_WASM_WORKERS="16",
        ANVIL_MAX_RUNNING_JOBS="120",
    )
    victim = cluster[2]
    slots = 15
    keys = [f"k{i}" for i in range(360)]
    # Submitted from 8 streams at once, so the victim's share arrives far faster
    # than its workers finish 1 s naps, however fast this machine submits.
    async with cluster[0].client() as client:

        async def stream(part: list[str]) -> list[tuple[str, str]]:
            return [
                (k, (await client.submit("test:nap", locality_key=k, max_attempts=5)).job_id)
                for k in part
            ]

        key_of = {
            job_id: k
            for part in await asyncio.gather(*(stream(keys[s::8]) for s in range(8)))
            for k, job_id in part
        }
        ids = list(key_of)
    # Wait until every slot of the victim runs a job and a backlog waits queued
    # for it, then kill it: both kinds must end, none twice.
    with psycopg.connect(database_url, autocommit=True) as conn:

        def victim_full_with_a_backlog() -> bool:
            by_peer = conn.execute(
                "SELECT peer_id::text, state::text, count(*) FROM jobs GROUP BY 1, 2"
            ).fetchall()
            mine = {s: n for p, s, n in by_peer if p == victim.peer_id}
            assert mine.get("running", 0) >= slots and mine.get("queued", 0) >= 30, (
                f"victim {victim.peer_id} alive={victim.process.poll() is None}: {by_peer}"
            )
            return True

        await eventually(victim_full_with_a_backlog, timeout=60)
    victim.kill()
    finals = await wait_all(cluster[0], ids, 120)
    assert Counter(state(f) for f in finals) == {JobState.SUCCEEDED: 360}
    rescued = [f for f in finals if f.attempt > 1]
    # A nap or two may end between the last look and the kill.
    assert len(rescued) >= slots - 3
    # A job rescued from the victim (its first attempt ran there, its second
    # ended it) went to the next peer in its HRW order, the victim left out.
    with psycopg.connect(database_url) as conn:
        from_victim = {
            str(job_id)
            for (job_id,) in conn.execute(
                "SELECT job_id FROM job_events WHERE attempt = 1 AND to_state = 'running'"
                " AND peer_id = %s",
                (victim.peer_id,),
            )
        }
    ids_by_peer = [uuid.UUID(p.peer_id) for p in cluster]
    checked = [f for f in rescued if f.attempt == 2 and f.job_id in from_victim]
    assert len(checked) >= slots - 3
    for f in checked:
        order = [str(p) for p in hrw.rank(key_of[f.job_id], ids_by_peer)]
        assert f.peer_id == next(p for p in order if p != victim.peer_id), f.job_id
    per_job = events_per_job(database_url)
    assert all(per_job[i]["succeeded"] == 1 for i in ids), "a result was written twice"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_peers_ride_out_a_postgresql_restart(tmp_path: Path) -> None:
    from daemon.registry.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    secret = tmp_path / "secret"
    secret.write_text("restart-secret-" + "z" * 40)
    factory = PeerFactory(tmp_path / "peers", url, secret)
    try:
        cluster = await start_peers(factory, 2, fabric_config(tmp_path, max_concurrency=8))
        async with cluster[0].client() as client:
            ids = [
                (await client.submit("test:nap", locality_key=f"r{i}", max_attempts=10)).job_id
                for i in range(40)
            ]

        def some_running() -> bool:
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM jobs WHERE state = 'running'").fetchone()
            return row is not None and row[0] > 0

        await eventually(lambda: asyncio.to_thread(some_running), timeout=30)
        await asyncio.to_thread(pg.close)
        # The outage lasts real seconds: the peers' connect and heartbeat timeouts
        # run on the wall clock, which no test can move.
        await asyncio.sleep(3.0)
        pg = EmbeddedPostgres(tmp_path / "pg")
        assert await asyncio.to_thread(pg.start) == url
        finals = await wait_all(cluster[1], ids, 150)
        assert Counter(state(f) for f in finals) == {JobState.SUCCEEDED: 40}
        assert all(p.process.poll() is None for p in cluster), "a peer died with the database"
    finally:
        factory.stop_all()
        pg.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_jobs_run_where_their_input_lives(peers: PeerFactory, tmp_path: Path) -> None:
    cluster = await start_peers(
        peers, 3, fabric_config(tmp_path, max_concurrency=64), ANVIL_BALANCE="1000000"
    )
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = random.Random(7)
    async with cluster[0].client() as client:
        refs = []
        for i in range(100):
            path = inputs / f"doc{i}.txt"
            path.write_text(" ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(20000)))
            refs.append(await client.upload(path))
        local = [(await client.submit("text:wordcount", inputs=[r])).job_id for r in refs]
        scattered = [
            (
                await client.submit("text:wordcount", inputs=[r], locality_key=uuid.uuid4().hex)
            ).job_id
            for r in refs
        ]
    local_finals = await wait_all(cluster[0], local, 120)
    scattered_finals = await wait_all(cluster[0], scattered, 120)
    assert all(state(f) is JobState.SUCCEEDED for f in local_finals + scattered_finals)
    zero = sum(f.bytes_fetched_remote == 0 for f in local_finals)
    local_bytes = sum(f.bytes_fetched_remote for f in local_finals)
    random_bytes = sum(f.bytes_fetched_remote for f in scattered_finals)
    print(f"\nbytes fetched across peers: placed by input {local_bytes}, at random {random_bytes}")
    ids_by_peer = [uuid.UUID(p.peer_id) for p in cluster]
    misplaced = [
        (f.peer_id[:8], str(hrw.rank(parse_ref(r).key, ids_by_peer)[0])[:8], f.bytes_fetched_remote)
        for f, r in zip(local_finals, refs, strict=True)
        if f.bytes_fetched_remote
    ]
    assert zero >= 99, f"only {zero}/100 jobs ran where their input lives: {misplaced}"
    assert random_bytes > 50 * 100_000  # about two thirds of 100 inputs of ~120 kB moved


@pytest.mark.timeout(200)
async def test_a_full_peer_spills_to_the_next_in_hrw_order(
    peers: PeerFactory, tmp_path: Path
) -> None:
    cluster = await start_peers(peers, 2, fabric_config(tmp_path, max_concurrency=1, nap_s=2))
    ids_by_peer = [uuid.UUID(p.peer_id) for p in cluster]
    order = [str(p) for p in hrw.rank("same-key", ids_by_peer)]
    async with cluster[0].client() as client:
        first = await client.submit("test:nap", locality_key="same-key")
        second = await client.submit("test:nap", locality_key="same-key")
    assert (first.peer_id, second.peer_id) == (order[0], order[1])
    finals = await wait_all(cluster[0], [first.job_id, second.job_id], 60)
    assert [f.peer_id for f in finals] == order


@pytest.mark.timeout(200)
async def test_sigterm_drains_without_failing_a_job(
    peers: PeerFactory, tmp_path: Path, database_url: str
) -> None:
    cluster = await start_peers(
        peers, 2, fabric_config(tmp_path, max_concurrency=2, nap_s=1), ANVIL_BALANCE="1000000"
    )
    leaving, staying = cluster
    ids_by_peer = [uuid.UUID(p.peer_id) for p in cluster]
    keys = [
        k for k in (f"d{i}" for i in range(200)) if hrw.rank(k, ids_by_peer)[0] == ids_by_peer[0]
    ]
    async with staying.client() as client:
        ids = [(await client.submit("test:nap", locality_key=k)).job_id for k in keys[:8]]

        async def one_running() -> bool:  # on the leaving peer: all 8 are placed there
            return any([state(await client.status(i)) is JobState.RUNNING for i in ids])

        await eventually(one_running, timeout=30)
    assert await asyncio.to_thread(leaving.terminate, 60) == 0
    finals = await wait_all(staying, ids, 60)
    assert Counter(state(f) for f in finals) == {JobState.SUCCEEDED: 8}
    assert {f.peer_id for f in finals} == {leaving.peer_id, staying.peer_id}
    with psycopg.connect(database_url) as conn:
        (left,) = conn.execute(
            "SELECT count(*) FROM compute_capabilities WHERE peer_id = %s", (leaving.peer_id,)
        ).fetchone()
    assert left == 0, "the drained peer deregistered its capabilities"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_job_handed_back_by_a_drain_keeps_its_only_attempt(
    peers: PeerFactory, tmp_path: Path
) -> None:
    # Drain grace far shorter than a job: the leaving peer hands its running
    # jobs back, and a job allowed a single attempt must still run to its end.
    cluster = await start_peers(
        peers,
        2,
        fabric_config(tmp_path, max_concurrency=2, nap_s=3),
        ANVIL_BALANCE="1000000",
        ANVIL_DRAIN_GRACE_S="0.5",
    )
    leaving, staying = cluster
    ids_by_peer = [uuid.UUID(p.peer_id) for p in cluster]
    keys = [
        k for k in (f"h{i}" for i in range(100)) if hrw.rank(k, ids_by_peer)[0] == ids_by_peer[0]
    ]
    async with staying.client() as client:
        ids = [
            (await client.submit("test:nap", locality_key=k, max_attempts=1)).job_id
            for k in keys[:2]
        ]
        placed = [(await client.status(i)).peer_id for i in ids]
        decisions = staying.metric("anvil_compute_placements_total", decision="rank0")
        assert placed == [leaving.peer_id] * 2, (placed, leaving.peer_id, decisions)

        async def both_running() -> bool:
            return {state(await client.status(i)) for i in ids} == {JobState.RUNNING}

        await eventually(both_running, timeout=30)
    assert await asyncio.to_thread(leaving.terminate, 60) == 0
    finals = await wait_all(staying, ids, 60)
    assert [state(f) for f in finals] == [JobState.SUCCEEDED] * 2, [f.error for f in finals]
    assert {f.peer_id for f in finals} == {staying.peer_id}
    # Handed back at least once, and run to success although one attempt was allowed.
    seen = [(f.attempt, f.max_attempts, f.error) for f in finals]
    assert all(f.attempt >= 2 and f.max_attempts == 1 for f in finals), seen


def stored_keys(peer: Peer) -> set[str]:
    """Keys in a peer's built-in store, read from its index (the peer keeps running)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(peer.data_dir / "objects" / "index.sqlite3")) as db:
        return {key for (key,) in db.execute("SELECT DISTINCT key FROM objects")}


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_objects_follow_ownership_to_a_peer_that_joins(
    peers: PeerFactory, tmp_path: Path
) -> None:
    config = fabric_config(tmp_path, max_concurrency=64)
    cluster = await start_peers(peers, 2, config, ANVIL_BALANCE="1000000")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    async with cluster[0].client() as client:
        refs = []
        for i in range(60):
            path = inputs / f"doc{i}.txt"
            path.write_text(f"document {i} " * 2000)
            refs.append(await client.upload(path))
    newcomer = await asyncio.to_thread(peers.start, config=config, ANVIL_BALANCE="1000000")
    cluster.append(newcomer)
    await asyncio.to_thread(peers.wait_converged, cluster)
    ids = [uuid.UUID(p.peer_id) for p in cluster]
    keys = {parse_ref(r).key: r for r in refs}
    now_owned = {k for k in keys if hrw.rank(k, ids)[0] == ids[2]}
    assert len(now_owned) >= 5, "too few keys moved to test anything"

    def newcomer_holds_what_it_owns() -> bool:
        missing = now_owned - stored_keys(newcomer)
        assert not missing, missing
        return True

    await eventually(newcomer_holds_what_it_owns, timeout=60)
    # Jobs on those inputs now run on the newcomer and read nothing across peers.
    async with cluster[0].client() as client:
        ids_ = [(await client.submit("text:wordcount", inputs=[keys[k]])).job_id for k in now_owned]
    finals = await wait_all(cluster[0], ids_, 120)
    assert all(state(f) is JobState.SUCCEEDED for f in finals)
    assert {f.peer_id for f in finals} == {newcomer.peer_id}
    assert [f.bytes_fetched_remote for f in finals] == [0] * len(finals)
    assert sum(p.metric("anvil_compute_objects_rebalanced_total") for p in cluster[:2]) >= len(
        now_owned
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_job_runs_only_in_its_region(peers: PeerFactory, tmp_path: Path) -> None:
    config = fabric_config(tmp_path, max_concurrency=16)
    east = await asyncio.to_thread(peers.start, config=config, ANVIL_REGION="east")
    west = await asyncio.to_thread(peers.start, config=config, ANVIL_REGION="west")
    await asyncio.to_thread(peers.wait_converged, [east, west])
    async with east.client() as client:  # one front door for both regions
        by_region = {
            region: [
                (await client.submit("text:wordcount", region=region, locality_key=f"r{i}")).job_id
                for i in range(20)
            ]
            for region in ("east", "west")
        }
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.submit("text:wordcount", region="south")
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "'south'" in (info.value.details() or "")
    for region, peer in (("east", east), ("west", west)):
        finals = await wait_all(east, by_region[region], 60)
        assert {state(f) for f in finals} == {JobState.SUCCEEDED}
        assert {f.peer_id for f in finals} == {peer.peer_id}, region
