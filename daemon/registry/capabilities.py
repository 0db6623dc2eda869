"""The capability registry: the seed's compute_capabilities table and its executors."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from psycopg.types.json import Jsonb

from daemon.exceptions import CapabilityNotFound
from daemon.registry import queries
from daemon.registry.driver import Pool, translate_errors
from daemon.registry.models import (
    Capability,
    CapabilitySpec,
    FleetDeployment,
    validate_capability,
)
from daemon.resources import satisfies


class CapabilityStore:
    def __init__(self, pool: Pool, *, peer_ttl: timedelta) -> None:
        self._pool = pool
        self._peer_ttl = peer_ttl

    async def register(self, spec: CapabilitySpec) -> Capability:
        """Upsert (peer, capability) with its executor in one transaction."""
        params = {
            "peer_id": spec.peer_id,
            "region": spec.region,
            "capability": spec.capability,
            "resources": Jsonb(dict(spec.resources)),
            "max_concurrency": spec.max_concurrency,
            "executor": Jsonb(dict(spec.executor)),
            "source": spec.source,
            "status": spec.status,
        }
        with translate_errors():
            async with self._pool.connection() as conn, conn.transaction():
                cur = await conn.execute(queries.get("upsert_capability"), params)
                row = await cur.fetchone()
                cur = await conn.execute(queries.get("upsert_capability_executor"), params)
                executor_row = await cur.fetchone()
        assert row is not None and executor_row is not None
        return Capability.from_row({**row, **executor_row})

    async def set_status(
        self, peer_id: uuid.UUID, capability: str, *, executor: Mapping[str, Any], status: str
    ) -> bool:
        """Record the peer's verdict on its row, if the row still has `executor`
        and another status; True when it changed."""
        params = {
            "peer_id": peer_id,
            "capability": capability,
            "executor": Jsonb(dict(executor)),
            "status": status,
        }
        return await self._pool.fetch_one("set_capability_status", params) is not None

    async def deploy_fleet(self, deployment: FleetDeployment) -> FleetDeployment:
        """Upsert a deployment to every peer of its region."""
        params = {
            "region": deployment.region,
            "capability": deployment.capability,
            "resources": Jsonb(dict(deployment.resources)),
            "max_concurrency": deployment.max_concurrency,
            "executor": Jsonb(dict(deployment.executor)),
        }
        row = await self._pool.fetch_one("upsert_fleet_deployment", params)
        assert row is not None
        return FleetDeployment.from_row(row)

    async def undeploy_fleet(self, region: str, capability: str) -> None:
        """Remove a fleet deployment and every peer's row of it; CapabilityNotFound if none."""
        params = {"region": region, "capability": capability, "peer_id": None}
        with translate_errors():
            async with self._pool.connection() as conn, conn.transaction():
                cur = await conn.execute(queries.get("delete_fleet_deployment"), params)
                if await cur.fetchone() is None:
                    raise CapabilityNotFound(
                        f"capability {capability!r} is not deployed to region {region!r}"
                    )
                await conn.execute(queries.get("delete_fleet_rows"), params)

    async def drop_fleet_row(self, peer_id: uuid.UUID, region: str, capability: str) -> None:
        """Remove one peer's row of a fleet deployment (gone, or not for this peer)."""
        params = {"region": region, "capability": capability, "peer_id": peer_id}
        await self._pool.run("delete_fleet_rows", params)

    async def fleet(self, region: str | None = None) -> list[FleetDeployment]:
        rows = await self._pool.fetch_all("list_fleet_deployments", {"region": region})
        return [FleetDeployment.from_row(row) for row in rows]

    async def loads(
        self, peer_ids: list[uuid.UUID]
    ) -> dict[tuple[uuid.UUID, str], tuple[int, int]]:
        """(queued, running) jobs per (peer, capability) of these peers."""
        rows = await self._pool.fetch_all("capability_loads", {"peer_ids": peer_ids})
        return {(r["peer_id"], r["capability"]): (r["queued"], r["running"]) for r in rows}

    async def deregister(self, peer_id: uuid.UUID, capability: str) -> None:
        """Remove one row; raise CapabilityNotFound if it was not registered."""
        validate_capability(capability)
        with translate_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    queries.get("delete_capability"),
                    {"peer_id": peer_id, "capability": capability},
                )
                if await cur.fetchone() is None:
                    raise CapabilityNotFound(
                        f"peer {peer_id} has no capability {capability!r} registered"
                    )

    async def prune(self, peer_id: uuid.UUID, keep: list[str]) -> list[str]:
        """Remove this peer's rows for capabilities not in `keep`; return those removed."""
        rows = await self._pool.fetch_all(
            "prune_peer_capabilities", {"peer_id": peer_id, "keep": keep}
        )
        return [row["capability"] for row in rows]

    async def deregister_peer(self, peer_id: uuid.UUID) -> None:
        await self._pool.run("delete_peer_capabilities", {"peer_id": peer_id})

    async def find(
        self,
        *,
        capability: str | None = None,
        region: str | None = None,
        peer_id: uuid.UUID | None = None,
        resources: Mapping[str, str] | None = None,
        live_only: bool = False,
        after: tuple[str, uuid.UUID] | None = None,
        limit: int | None = None,
    ) -> list[Capability]:
        """Registered capabilities matching every filter given, in (capability, peer)
        order: all of them, or up to `limit` after the row `after` (keyset paging)."""
        params: dict[str, Any] = {
            "capability": capability or None,
            "region": region or None,
            "peer_id": peer_id,
            "live_only": live_only,
            "ttl": self._peer_ttl,
            "after_capability": after[0] if after else None,
            "after_peer_id": after[1] if after else None,
            "limit": limit,
        }
        rows = await self._pool.fetch_all("list_capabilities", params)
        found = [Capability.from_row(row) for row in rows]
        if resources:
            found = [c for c in found if satisfies(c.resources, resources)]
        return found
