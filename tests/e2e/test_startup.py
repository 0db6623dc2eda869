"""What a peer has done by the time it says READY."""

from __future__ import annotations

import asyncio

import pytest

from daemon.convert import PROTO_TO_JOB_STATE
from daemon.jobs.state import JobState
from tests.e2e.cluster import PeerFactory, cli
from tests.e2e.guests import examples_config

pytestmark = pytest.mark.e2e


async def test_placement_kernels_are_loaded_before_ready(peers: PeerFactory) -> None:
    # hrw's numba kernels are compiled (or read from their cache) during start,
    # off the event loop: the first SubmitJob does not wait for them.
    peer = await asyncio.to_thread(peers.start, config=examples_config())
    assert peer.metric("anvil_compute_ready") == 1
    assert peer.metric("anvil_compute_peer_info", hrw_backend="jit") == 1
    assert "hrw jit" in peer.log()


async def test_a_job_that_names_no_region_runs_in_the_receiving_peers(
    peers: PeerFactory,
) -> None:
    peer = await asyncio.to_thread(peers.start, config=examples_config(), ANVIL_REGION="eu-2")
    async with peer.client() as client:
        final = await client.wait((await client.submit("text:wordcount", region="")).job_id)
    assert (final.region, PROTO_TO_JOB_STATE[final.state]) == ("eu-2", JobState.SUCCEEDED)
    # The CLI leaves the region to the peer too.
    done = await asyncio.to_thread(cli, peer, "submit", "text:wordcount", "--wait")
    assert done.returncode == 0, done.stderr
