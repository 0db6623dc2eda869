"""Fixtures for end-to-end tests: real daemon processes against the test PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Peer, PeerFactory


@pytest.fixture
def peers(tmp_path: Path, database_url: str) -> Iterator[PeerFactory]:
    secret = tmp_path / "auth.secret"
    secret.write_text("e2e-shared-secret-" + "x" * 40 + "\n")
    secret.chmod(0o600)
    factory = PeerFactory(tmp_path, database_url, secret)
    yield factory
    factory.stop_all()


@pytest.fixture
async def one_peer(peers: PeerFactory) -> Peer:
    return await asyncio.to_thread(peers.start)
