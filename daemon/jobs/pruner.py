"""The end of a job's life: finished jobs past their retention are deleted, and
then the stored outputs that no job keeps any more (storage/results.py).

Runs on every peer on its own clock, so a backlog of deletes never delays a
rescue; each statement deletes a bounded batch with SKIP LOCKED, so peers
pruning at once split the work.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from daemon import metrics
from daemon.registry import Registry

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0  # finished jobs past their retention are deleted this often
PRUNE_BATCH = 1000  # rows per statement
PRUNE_BATCHES = 20  # statements per round at most: a backlog goes in steps


class Pruner:
    def __init__(
        self,
        *,
        registry: Registry,
        retention: timedelta | None,
        sweep_results: Callable[[], Awaitable[int]] | None = None,
        min_interval_s: float = 1.0,
    ) -> None:
        """`retention` None keeps jobs for ever (their stray outputs still go);
        `sweep_results` deletes this peer's stored outputs no job keeps."""
        self._registry = registry
        self._retention = retention
        self._sweep_results = sweep_results
        # A short retention (tests, scratch clusters) is enforced at its own pace.
        self.interval_s = PRUNE_EVERY_S
        if retention is not None:
            self.interval_s = min(PRUNE_EVERY_S, max(retention.total_seconds() / 4, min_interval_s))

    async def run_once(self) -> None:
        """Prune, then delete the outputs no job keeps (of pruned jobs, of attempts
        that did not end their job). Raises the registry's errors."""
        await self.prune()
        if self._sweep_results is not None:
            deleted = await self._sweep_results()
            if deleted:
                metrics.RESULT_OBJECTS_DELETED.inc(deleted)
                log.info("deleted %d output objects no job keeps", deleted)

    async def prune(self) -> int:
        """Delete finished jobs older than the retention; return how many went."""
        if self._retention is None:
            return 0
        pruned = 0
        for _ in range(PRUNE_BATCHES):
            n = await self._registry.jobs.prune(older_than=self._retention, limit=PRUNE_BATCH)
            pruned += n
            if n < PRUNE_BATCH:
                break
        if pruned:
            metrics.JOBS_PRUNED.inc(pruned)
            log.info("pruned %d jobs finished more than %s ago", pruned, self._retention)
        return pruned
