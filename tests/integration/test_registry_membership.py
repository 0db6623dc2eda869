"""Capabilities, peers and LISTEN/NOTIFY on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from daemon.exceptions import CapabilityNotFound, InvalidArgument, NotFound
from daemon.registry import Registry
from daemon.registry.listener import JOB_EVENTS, MEMBERSHIP, Listener, peer_channel
from daemon.registry.models import CapabilitySpec, JobSpec, parse_uuid


def cap(peer: uuid.UUID, **overrides: object) -> CapabilitySpec:
    fields: dict[str, object] = {
        "peer_id": peer,
        "region": "eu-1",
        "capability": "inference:digits",
        "resources": {"memory_mib": "4096"},
        "max_concurrency": 4,
        "executor": {"wasm": {"module_ref": "sha256:" + "ab" * 32}},
    }
    fields.update(overrides)
    return CapabilitySpec(**fields)  # type: ignore[arg-type]


async def test_register_is_an_upsert_and_deregister_removes(registry: Registry) -> None:
    peer = uuid.uuid4()
    await registry.peers.upsert(peer_id=peer, address="127.0.0.1:1", region="eu-1", version="t")
    first = await registry.capabilities.register(cap(peer))
    assert first.max_concurrency == 4 and first.resources == {"memory_mib": "4096"}
    await registry.capabilities.register(cap(peer, max_concurrency=8))
    (row,) = await registry.capabilities.find(capability="inference:digits")
    assert row.max_concurrency == 8
    assert row.executor == {"wasm": {"module_ref": "sha256:" + "ab" * 32}}
    assert row.peer_live and row.peer_address == "127.0.0.1:1"
    await registry.capabilities.deregister(peer, "inference:digits")
    assert await registry.capabilities.find() == []
    with pytest.raises(CapabilityNotFound):
        await registry.capabilities.deregister(peer, "inference:digits")


async def test_filter_by_capability_region_resources_and_liveness(registry: Registry) -> None:
    live, stale, elsewhere = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for peer, region in ((live, "eu-1"), (stale, "eu-1"), (elsewhere, "us-1")):
        await registry.peers.upsert(peer_id=peer, address="127.0.0.1:1", region=region, version="")
    await registry.capabilities.register(cap(live, resources={"memory_mib": "8192", "gpu": "1"}))
    await registry.capabilities.register(cap(stale))
    await registry.capabilities.register(cap(elsewhere, region="us-1"))
    await registry.capabilities.register(cap(live, capability="text:wordcount"))
    async with registry.pool.connection() as conn:
        await conn.execute(
            "UPDATE peers SET heartbeat_at = now() - interval '1 hour' WHERE peer_id = %s",
            (stale,),
        )

    def peers_of(rows: list) -> set[uuid.UUID]:  # type: ignore[type-arg]
        return {r.peer_id for r in rows}

    found = await registry.capabilities.find(capability="inference:digits", region="eu-1")
    assert peers_of(found) == {live, stale}
    found = await registry.capabilities.find(
        capability="inference:digits", region="eu-1", live_only=True
    )
    assert peers_of(found) == {live}
    found = await registry.capabilities.find(
        capability="inference:digits", resources={"memory_mib": "6000"}
    )
    assert peers_of(found) == {live}
    found = await registry.capabilities.find(resources={"gpu": "1"})
    assert peers_of(found) == {live}
    assert len(await registry.capabilities.find(peer_id=live)) == 2


async def silence(registry: Registry, peer: uuid.UUID, seconds: float) -> None:
    """The peer's last heartbeat, `seconds` further in the past."""
    async with registry.pool.connection() as conn:
        await conn.execute(
            "UPDATE peers SET heartbeat_at = heartbeat_at - make_interval(secs => %s) "
            "WHERE peer_id = %s",
            (seconds, peer),
        )


async def test_peer_heartbeat_liveness_and_state(registry: Registry) -> None:
    reg = Registry(registry.pool, peer_ttl=timedelta(seconds=15))
    peer = uuid.uuid4()
    await reg.peers.upsert(peer_id=peer, address="127.0.0.1:9", region="eu-1", version="1")
    assert (await reg.peers.get(peer)).live
    await silence(reg, peer, 14)
    assert (await reg.peers.get(peer)).live
    await silence(reg, peer, 2)
    assert not (await reg.peers.get(peer)).live
    await reg.peers.heartbeat(peer)
    assert [p.peer_id for p in await reg.peers.find(live_only=True)] == [peer]
    await reg.peers.set_state(peer, "draining")
    assert not (await reg.peers.get(peer)).live
    await reg.peers.set_state(peer, "down")
    assert not (await reg.peers.get(peer)).live
    # Marked down during an outage, alive again at its next heartbeat.
    await reg.peers.heartbeat(peer)
    revived = await reg.peers.get(peer)
    assert revived.state == "up" and revived.live
    await reg.peers.set_state(peer, "draining")
    await reg.peers.heartbeat(peer)
    assert (await reg.peers.get(peer)).state == "draining", "a draining peer stays out"
    with pytest.raises(NotFound):
        await reg.peers.heartbeat(uuid.uuid4())
    with pytest.raises(InvalidArgument):
        await reg.peers.set_state(peer, "sideways")
    with pytest.raises(NotFound):
        await reg.peers.get(uuid.uuid4())


def test_bad_capability_specs_are_refused() -> None:
    peer = uuid.uuid4()
    with pytest.raises(InvalidArgument, match="capability must not be empty"):
        cap(peer, capability="")
    with pytest.raises(InvalidArgument, match="max_concurrency"):
        cap(peer, max_concurrency=-1)
    with pytest.raises(InvalidArgument, match="region"):
        cap(peer, region="")
    with pytest.raises(InvalidArgument, match="lowercase words"):
        cap(peer, capability="Text Wordcount")
    with pytest.raises(InvalidArgument, match="is not a UUID"):
        parse_uuid("not-a-uuid", field_name="peer_id")


async def test_notifications_for_jobs_peers_and_membership(
    registry: Registry, database_url: str
) -> None:
    peer = uuid.uuid4()
    listener = Listener(database_url, [JOB_EVENTS, MEMBERSHIP, peer_channel(peer.hex)])
    await listener.start()
    try:
        async with (
            listener.subscribe(JOB_EVENTS) as events,
            listener.subscribe(peer_channel(peer.hex)) as queue,
            listener.subscribe(MEMBERSHIP) as membership,
        ):
            job = (
                await registry.jobs.submit(
                    JobSpec(capability="text:wordcount", region="eu-1", timeout_ms=5), peer_id=peer
                )
            ).job
            note = await asyncio.wait_for(queue.get(), 5)
            assert note.payload == str(job.job_id)
            event = await asyncio.wait_for(events.get(), 5)
            assert str(job.job_id) in event.payload and '"queued"' in event.payload
            await registry.peers.upsert(peer_id=peer, address="h:1", region="eu-1", version="")
            note = await asyncio.wait_for(membership.get(), 5)
            assert note.payload == "peers"
    finally:
        await listener.close()


async def test_membership_is_announced_only_on_real_changes(
    registry: Registry, database_url: str
) -> None:
    peer = uuid.uuid4()
    await registry.peers.upsert(peer_id=peer, address="h:1", region="eu-1", version="")
    listener = Listener(database_url, [MEMBERSHIP])
    await listener.start()
    try:
        async with listener.subscribe(MEMBERSHIP) as queue:
            for _ in range(3):
                await registry.peers.heartbeat(peer)
                assert await registry.peers.mark_stale_down() == []
            # Notifications arrive in commit order: had the heartbeats or sweeps
            # announced anything, it would come before this capability's.
            await registry.capabilities.register(cap(peer))
            first = await asyncio.wait_for(queue.get(), 5)
            assert first.payload == "compute_capabilities", (
                "heartbeats and no-op sweeps must not announce anything"
            )
            await registry.peers.set_state(peer, "down")
            assert (await asyncio.wait_for(queue.get(), 5)).payload == "peers"
    finally:
        await listener.close()


async def test_start_up_prunes_capabilities_a_peer_no_longer_offers(registry: Registry) -> None:
    peer = uuid.uuid4()
    for name in ("text:wordcount", "image:resize", "old:thing"):
        await registry.capabilities.register(cap(peer, capability=name))
    removed = await registry.capabilities.prune(peer, ["text:wordcount", "image:resize"])
    assert removed == ["old:thing"]
    assert {c.capability for c in await registry.capabilities.find(peer_id=peer)} == {
        "text:wordcount",
        "image:resize",
    }
