"""Peer membership: addresses, regions, heartbeats and liveness."""

from __future__ import annotations

import uuid
from datetime import timedelta

from daemon.exceptions import InvalidArgument, NotFound
from daemon.registry import queries
from daemon.registry.driver import Pool, translate_errors
from daemon.registry.models import Peer, validate_region

PEER_STATES = frozenset({"up", "draining", "down"})


class PeerStore:
    def __init__(self, pool: Pool, *, peer_ttl: timedelta) -> None:
        self._pool = pool
        self.peer_ttl = peer_ttl

    async def upsert(self, *, peer_id: uuid.UUID, address: str, region: str, version: str) -> Peer:
        """Announce this peer (state up, fresh heartbeat)."""
        validate_region(region)
        if not address:
            raise InvalidArgument("peer address must not be empty")
        with translate_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    queries.get("upsert_peer"),
                    {"peer_id": peer_id, "address": address, "region": region, "version": version},
                )
                row = await cur.fetchone()
        assert row is not None
        return Peer.from_row(row)

    async def heartbeat(self, peer_id: uuid.UUID) -> None:
        """Refresh the heartbeat (reviving a peer marked down); NotFound if unknown."""
        with translate_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(queries.get("heartbeat_peer"), {"peer_id": peer_id})
                if await cur.fetchone() is None:
                    raise NotFound(f"peer {peer_id} is not registered")

    async def set_state(self, peer_id: uuid.UUID, state: str) -> Peer:
        if state not in PEER_STATES:
            raise InvalidArgument(f"peer state must be one of {sorted(PEER_STATES)}, got {state!r}")
        with translate_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    queries.get("set_peer_state"), {"peer_id": peer_id, "state": state}
                )
                row = await cur.fetchone()
        if row is None:
            raise NotFound(f"peer {peer_id} is not registered")
        return Peer.from_row({**row, "live": False})

    async def mark_stale_down(self) -> list[uuid.UUID]:
        """Peers silent for longer than the TTL are marked down; return them."""
        with translate_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    queries.get("mark_stale_peers_down"), {"ttl": self.peer_ttl}
                )
                rows = await cur.fetchall()
        return [row["peer_id"] for row in rows]

    async def get(self, peer_id: uuid.UUID) -> Peer:
        with translate_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    queries.get("get_peer"), {"peer_id": peer_id, "ttl": self.peer_ttl}
                )
                row = await cur.fetchone()
        if row is None:
            raise NotFound(f"peer {peer_id} is not registered")
        return Peer.from_row(row)

    async def find(self, *, region: str | None = None, live_only: bool = False) -> list[Peer]:
        with translate_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    queries.get("list_peers"), {"region": region or None, "ttl": self.peer_ttl}
                )
                rows = await cur.fetchall()
        peers = [Peer.from_row(row) for row in rows]
        return [p for p in peers if p.live] if live_only else peers
