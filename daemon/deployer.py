"""What this peer runs, kept in step with the registry: its config, plus every
capability deployed to it or to its region while it runs.

A registration naming this peer (RegisterCapability) leaves a 'pending' row;
a fleet deployment of its region has each peer write such a row for itself,
peers that join later included. For each pending row the peer fetches the
pinned module through its verified cache and checks that a worker will run it,
then marks the row 'ready' (placement uses only ready rows) or 'failed: why',
and hands the runner its new set of capabilities. A row that goes away stops
new claims; running jobs finish. Driven by the registry's NOTIFY; a poll is the
backstop. The config wins over a deployment of the same name.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

from daemon.capability_config import LocalCapability, from_registered
from daemon.exceptions import AnvilError, FailedPrecondition, Unavailable
from daemon.modules import ModuleCheck
from daemon.registry import Registry
from daemon.registry.models import (
    SOURCE_CONFIG,
    SOURCE_FLEET,
    STATUS_PENDING,
    STATUS_READY,
    Capability,
    CapabilitySpec,
    FleetDeployment,
    failed_status,
    same_terms,
)

log = logging.getLogger(__name__)


def _key(executor: Mapping[str, Any]) -> str:
    return json.dumps(executor, sort_keys=True, separators=(",", ":"))


class Deployer:
    def __init__(
        self,
        *,
        registry: Registry,
        peer_id: uuid.UUID,
        region: str,
        config: Callable[[], tuple[LocalCapability, ...]],
        kinds: Collection[str],
        check_module: ModuleCheck,
        apply: Callable[[Mapping[str, LocalCapability]], None],
    ) -> None:
        """`config()`: the capabilities this peer's config gives now (they win over a
        deployment of the same name); `kinds`: the executors this peer has;
        `apply(capabilities)` hands the runner what to claim."""
        self._registry = registry
        self._peer_id = peer_id
        self._region = region
        self._config = config
        self._kinds = frozenset(kinds)
        self._check_module = check_module
        self._apply = apply
        # (capability, executor) this peer found runnable, or not, so that a
        # re-read costs nothing until the row is deployed again.
        self._checked: dict[tuple[str, str], LocalCapability] = {}
        self._refused: set[tuple[str, str]] = set()

    async def sync(self) -> Mapping[str, LocalCapability]:
        """One pass: materialize the region's fleet deployments, check pending rows,
        hand the runner the result (returned). Raises the registry's errors."""
        caps = self._registry.capabilities
        config = {c.name: c for c in self._config()}
        rows = {c.capability: c for c in await caps.find(peer_id=self._peer_id)}
        await self._follow_fleet(rows, config, await caps.fleet(self._region))
        running: dict[str, LocalCapability] = dict(config)
        for name, row in rows.items():
            if row.source == SOURCE_CONFIG or name in config:
                continue
            cap = await self._settle(row)
            if cap is not None:
                running[name] = cap
        self._apply(running)
        return running

    async def _follow_fleet(
        self,
        rows: dict[str, Capability],
        config: Mapping[str, LocalCapability],
        deployments: list[FleetDeployment],
    ) -> None:
        """Write this peer's row of each fleet deployment; drop rows of those gone."""
        wanted = {d.capability: d for d in deployments if d.capability not in config}
        for name, row in list(rows.items()):
            if row.source == SOURCE_FLEET and name not in wanted:
                await self._registry.capabilities.drop_fleet_row(self._peer_id, self._region, name)
                del rows[name]
        for name, deployment in wanted.items():
            mine = rows.get(name)
            if mine is not None and (mine.source != SOURCE_FLEET or same_terms(mine, deployment)):
                continue  # deployed to this peer by name (that row wins), or up to date
            rows[name] = await self._registry.capabilities.register(
                CapabilitySpec(
                    peer_id=self._peer_id,
                    region=self._region,
                    capability=name,
                    resources=deployment.resources,
                    max_concurrency=deployment.max_concurrency,
                    executor=deployment.executor,
                    source=SOURCE_FLEET,
                    status=STATUS_PENDING,
                )
            )

    async def _settle(self, row: Capability) -> LocalCapability | None:
        """The capability a deployed row gives this peer, once checked; None while it
        cannot run (its row then says why)."""
        key = (row.capability, _key(row.executor))
        known = self._checked.get(key)
        if known is not None and row.ready:
            return known
        if key in self._refused and row.status != STATUS_PENDING:
            return None
        try:
            cap = from_registered(
                row.capability,
                row.executor,
                max_concurrency=row.max_concurrency,
                resources=row.resources,
            )
            await self._check(cap)
        except Unavailable as exc:
            log.warning("cannot check deployed %s yet: %s", row.capability, exc)
            return known
        except AnvilError as exc:
            log.warning("deployed capability %s cannot run here: %s", row.capability, exc)
            self._refused.add(key)
            await self._registry.capabilities.set_status(
                self._peer_id, row.capability, executor=row.executor, status=failed_status(str(exc))
            )
            return None
        self._checked[key] = cap
        if not row.ready:
            await self._registry.capabilities.set_status(
                self._peer_id, row.capability, executor=row.executor, status=STATUS_READY
            )
            log.info(
                "deployed capability %s is ready (%s)", row.capability, cap.module or cap.image
            )
        return cap

    async def _check(self, cap: LocalCapability) -> None:
        if cap.kind not in self._kinds:
            raise FailedPrecondition(f"this peer has no {cap.kind} executor")
        if cap.kind == "wasm":
            await self._check_module(cap.module)
