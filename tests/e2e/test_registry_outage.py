"""A real peer whose PostgreSQL goes away and comes back (a link the test cuts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemon.convert import PROTO_TO_JOB_STATE
from daemon.jobs.state import JobState
from tests.e2e.cluster import Peer, PeerFactory
from tests.e2e.guests import examples_config
from tests.eventually import eventually
from tests.registry_link import RegistryLink

pytestmark = pytest.mark.e2e

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def link(database_url: str) -> AsyncIterator[RegistryLink]:
    link = RegistryLink(database_url)
    yield link
    await link.close()


async def health(peer: Peer) -> int:
    async with aio.insecure_channel(peer.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        return int(reply.status)


async def wordcount(peer: Peer) -> JobState:
    async with peer.client() as client:
        job = await client.submit("text:wordcount")
        final = await asyncio.wait_for(client.wait(job.job_id), 60)
    return PROTO_TO_JOB_STATE[final.state]


@pytest.mark.timeout(180)
async def test_a_peer_cut_off_from_postgresql_is_not_serving_and_fails_fast(
    link: RegistryLink, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("outage-secret-" + "o" * 40 + "\n")
    secret.chmod(0o600)
    factory = PeerFactory(tmp_path / "peers", await link.start(), secret)
    try:
        peer = await asyncio.to_thread(factory.start, config=examples_config())
        assert await wordcount(peer) is JobState.SUCCEEDED

        await link.cut()
        await eventually(lambda: _is(peer, NOT_SERVING), timeout=10)
        async with peer.client() as client:
            started = time.monotonic()
            with pytest.raises(aio.AioRpcError) as refused:
                await client.submit("text:wordcount", deadline_s=30)
            took = time.monotonic() - started
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert took < 3.0, f"SubmitJob took {took:.1f} s to fail"
        assert peer.process.poll() is None

        await link.restore()
        await eventually(lambda: _is(peer, SERVING), timeout=30)
        assert await wordcount(peer) is JobState.SUCCEEDED
    finally:
        await asyncio.to_thread(factory.stop_all)


async def _is(peer: Peer, status: int) -> bool:
    try:
        return await health(peer) == status
    except aio.AioRpcError:
        return False
