"""The rescuer's sweep against a real registry: where a lost job goes, and with which policy;
why a job that no peer can take waits, and that it fails at its queue timeout.

Three peers registered in PostgreSQL, the peer view and the Placer a daemon
builds over them; time moves in SQL (a lease put in the past, a heartbeat made
old, a job queued long ago), never by sleeping.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, timedelta

import pytest

from daemon import metrics
from daemon.jobs.peer_view import PeerView
from daemon.jobs.placer import PlacementPolicy, Placer
from daemon.jobs.rescuer import Rescuer
from daemon.jobs.state import JobState
from daemon.registry import Registry
from daemon.registry.models import CapabilitySpec, JobSpec
from hrw import reference

CAPABILITY = "text:wordcount"
ORPHAN = "test:orphan"  # no peer registers it
LEASE = timedelta(seconds=30)
NO_PEER = f"no live peer in region 'local' has registered capability {ORPHAN!r}"


@dataclass
class Fabric:
    registry: Registry
    peers: list[uuid.UUID]
    view: PeerView
    woken: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)

    def rescuer(self, *, balance: float = 1.25) -> Rescuer:
        placer = Placer(
            view=self.view,
            dispatch=lambda peer, address, job: self.woken.append((peer, job)),
            policy=PlacementPolicy(balance=balance),
        )
        return Rescuer(registry=self.registry, view=self.view, placer=placer)

    async def submit(
        self,
        key: str,
        *,
        peer: uuid.UUID | None,
        capability: str = CAPABILITY,
        queue_timeout_ms: int = 0,
    ) -> uuid.UUID:
        spec = JobSpec(
            capability=capability,
            region="local",
            timeout_ms=0,
            locality_key=key,
            queue_timeout_ms=queue_timeout_ms,
        )
        return (await self.registry.jobs.submit(spec, peer_id=peer, locality_key=key)).job.job_id

    async def sql(self, statement: str, *params: object) -> None:
        async with self.registry.pool.connection() as conn:
            await conn.execute(statement, params)


@pytest.fixture
async def fabric(registry: Registry) -> AsyncIterator[Fabric]:
    peers = [uuid.uuid4() for _ in range(3)]
    for i, peer in enumerate(peers):
        await registry.peers.upsert(
            peer_id=peer, address=f"127.0.0.1:{5000 + i}", region="local", version="t"
        )
        await registry.capabilities.register(
            CapabilitySpec(peer_id=peer, region="local", capability=CAPABILITY, max_concurrency=100)
        )
    view = PeerView(registry, None)
    await view.refresh()
    await view.refresh_loads()
    yield Fabric(registry=registry, peers=peers, view=view)
    await view.close()


async def test_a_job_whose_lease_expired_goes_to_the_next_peer_in_its_hrw_order(
    fabric: Fabric,
) -> None:
    key = "lost-lease"
    first, second = reference.rank(key, fabric.peers)[:2]
    job_id = await fabric.submit(key, peer=first)
    assert await fabric.registry.jobs.claim(job_id, first, lease=LEASE) is not None
    rescuer = fabric.rescuer()
    assert await rescuer.sweep() == 0  # the lease is still good: nothing moves
    await fabric.sql(
        "UPDATE jobs SET lease_expires_at = clock_timestamp() - interval '1 s' WHERE job_id = %s",
        job_id,
    )
    assert await rescuer.sweep() == 1
    job = await fabric.registry.jobs.get(job_id)
    assert (job.state, job.peer_id, job.attempt) == (JobState.QUEUED, second, 1)
    assert "lease expired on peer" in job.error
    assert fabric.woken == [(second, job_id)]
    assert await rescuer.sweep() == 0, "a rescued job is not moved twice"


@pytest.mark.parametrize(("balance", "spills"), [(1000.0, False), (1.0, True)])
async def test_an_unplaced_job_is_placed_with_the_peers_balance(
    fabric: Fabric, balance: float, spills: bool
) -> None:
    key = "handed-back"
    first, second = reference.rank(key, fabric.peers)[:2]
    for _ in range(6):  # the data-local peer is busy
        await fabric.submit(key, peer=first)
    await fabric.view.refresh_loads()
    job_id = await fabric.submit(key, peer=None)  # e.g. handed back by a draining peer
    assert await fabric.rescuer(balance=balance).sweep() == 1
    placed = (await fabric.registry.jobs.get(job_id)).peer_id
    assert placed == (second if spills else first)
    assert fabric.woken == [(placed, job_id)]


async def test_a_silent_peers_queue_moves_to_the_live_peers(fabric: Fabric) -> None:
    key = "silent"
    first = reference.rank(key, fabric.peers)[0]
    job_id = await fabric.submit(key, peer=first)
    await fabric.sql(
        "UPDATE peers SET heartbeat_at = clock_timestamp() - interval '1 hour' WHERE peer_id = %s",
        first,
    )
    rescuer = fabric.rescuer()
    await rescuer.sweep()  # marks it down and takes its queued job off it
    await fabric.view.refresh()  # as the NOTIFY of that change makes every peer do
    await rescuer.sweep()
    job = await fabric.registry.jobs.get(job_id)
    assert job.state is JobState.QUEUED and job.peer_id in set(fabric.peers) - {first}
    assert (await fabric.registry.peers.get(first)).state == "down"


async def test_a_job_queued_past_its_queue_timeout_fails_saying_no_peer_ran_it(
    fabric: Fabric,
) -> None:
    stranded = await fabric.submit("s", peer=None, capability=ORPHAN, queue_timeout_ms=60_000)
    fresh = await fabric.submit("f", peer=None, capability=ORPHAN, queue_timeout_ms=60_000)
    unstarted = await fabric.submit("u", peer=fabric.peers[0], queue_timeout_ms=1_500)
    for job_id, seconds in ((stranded, 61), (fresh, 50), (unstarted, 2)):
        await fabric.sql(
            "UPDATE jobs SET queued_at = clock_timestamp() - make_interval(secs => %s) "
            "WHERE job_id = %s",
            seconds,
            job_id,
        )
    since = {j: (await fabric.registry.jobs.get(j)).queued_at for j in (stranded, unstarted)}
    failed_before = metrics.REGISTRY.get_sample_value(
        "anvil_compute_jobs_queue_timed_out_total", {"capability": ORPHAN}
    )
    rescuer = fabric.rescuer()
    assert await rescuer.sweep() == 2

    def iso(job_id: uuid.UUID) -> str:
        return since[job_id].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    job = await fabric.registry.jobs.get(stranded)
    assert job.state is JobState.FAILED
    assert job.error == (
        f"no peer ran this job within its queue timeout of 60 s (queued since {iso(stranded)}): "
        + NO_PEER
    )
    job = await fabric.registry.jobs.get(unstarted)
    assert job.state is JobState.FAILED
    assert job.error == (
        f"no peer ran this job within its queue timeout of 1.5 s (queued since "
        f"{iso(unstarted)}): it stayed queued on peer {fabric.peers[0]}, which did not start it"
    )
    waiting = await fabric.registry.jobs.get(fresh)
    assert (waiting.state, waiting.error) == (JobState.QUEUED, "waiting for a peer: " + NO_PEER)
    assert (
        metrics.REGISTRY.get_sample_value(
            "anvil_compute_jobs_queue_timed_out_total", {"capability": ORPHAN}
        )
        == (failed_before or 0) + 1
    )

    assert await rescuer.sweep() == 0, "an ended job is not failed twice"
    assert await fabric.registry.jobs.get(fresh) == waiting, "the reason is written once"
    await fabric.sql(
        "UPDATE jobs SET queued_at = queued_at - interval '11 s' WHERE job_id = %s", fresh
    )
    assert await rescuer.sweep() == 1
    assert (await fabric.registry.jobs.get(fresh)).state is JobState.FAILED


async def test_an_unplaced_job_says_why_it_waits_until_a_capable_peer_comes(
    fabric: Fabric,
) -> None:
    job_id = await fabric.submit("w", peer=None, capability=ORPHAN)
    rescuer = fabric.rescuer()
    assert await rescuer.sweep() == 0
    job = await fabric.registry.jobs.get(job_id)
    assert (job.state, job.peer_id, job.error) == (
        JobState.QUEUED,
        None,
        "waiting for a peer: " + NO_PEER,
    )
    assert fabric.woken == []
    newcomer = fabric.peers[1]
    await fabric.registry.capabilities.register(
        CapabilitySpec(peer_id=newcomer, region="local", capability=ORPHAN, max_concurrency=1)
    )
    await fabric.view.refresh()  # as the NOTIFY of that registration makes every peer do
    assert await rescuer.sweep() == 1
    job = await fabric.registry.jobs.get(job_id)
    assert (job.state, job.peer_id, job.error) == (JobState.QUEUED, newcomer, "")
    assert fabric.woken == [(newcomer, job_id)]
