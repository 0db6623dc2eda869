"""What a peer has done by the time it says READY."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.cluster import PeerFactory
from tests.e2e.guests import examples_config

pytestmark = pytest.mark.e2e


async def test_placement_kernels_are_loaded_before_ready(peers: PeerFactory) -> None:
    # hrw's numba kernels are compiled (or read from their cache) during start,
    # off the event loop: the first SubmitJob does not wait for them.
    peer = await asyncio.to_thread(peers.start, config=examples_config())
    assert peer.metric("anvil_compute_ready") == 1
    assert peer.metric("anvil_compute_peer_info", hrw_backend="jit") == 1
    assert "hrw jit" in peer.log()
