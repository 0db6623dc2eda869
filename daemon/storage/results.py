"""Job outputs in this peer's store live exactly as long as their jobs keep them.

Runners store outputs under `anvil-results/<job id>/<attempt>/...`. Each peer
sweeps its own store: an object whose job is gone (pruned after
`job_retention_s`), or whose job has ended without naming it among its outputs
(an attempt that was rescued, timed out while storing, or failed), is deleted.
Objects of jobs still queued or running are left alone: their attempt may be
storing them right now. Sweeping locally needs no message between peers, and
also clears stale copies a peer kept after ownership moved.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence

from daemon.access import RESULTS_BUCKET, result_job_id
from daemon.jobs.state import JobState
from daemon.storage.local_store import LocalStore
from daemon.storage.refs import parse_ref

log = logging.getLogger(__name__)

PAGE = 1000
# job ids -> (state, output refs) of those that still exist.
OutputsLookup = Callable[
    [Sequence[uuid.UUID]], Awaitable[Mapping[uuid.UUID, tuple[JobState, tuple[str, ...]]]]
]


def kept_keys(state: JobState, refs: Sequence[str]) -> set[str] | None:
    """The result keys a job keeps; None: all of them (it has not ended). Pure."""
    if not state.terminal:
        return None
    keys = set()
    for text in refs:
        ref = parse_ref(text)
        if ref.bucket == RESULTS_BUCKET:
            keys.add(ref.key)
    return keys


def unwanted(
    keys: Sequence[str], jobs: Mapping[uuid.UUID, tuple[JobState, tuple[str, ...]]]
) -> list[str]:
    """Which of these result keys no job keeps. Pure."""
    kept = {job_id: kept_keys(*found) for job_id, found in jobs.items()}
    doomed = []
    for key in keys:
        job_id = result_job_id(key)
        if job_id is None:
            continue  # not written by a runner: not ours to judge
        if job_id not in kept:
            doomed.append(key)  # the job is gone
            continue
        keeps = kept[job_id]
        if keeps is not None and key not in keeps:
            doomed.append(key)
    return doomed


async def sweep(store: LocalStore, outputs: OutputsLookup) -> int:
    """Delete this store's result objects that no job keeps; return how many went.

    Raises the registry's errors (RegistryUnavailable): then nothing is deleted
    for the page being looked at.
    """
    deleted, after = 0, ""
    while True:
        keys = await asyncio.to_thread(store.keys, RESULTS_BUCKET, after=after, limit=PAGE)
        if not keys:
            return deleted
        after = keys[-1]
        job_ids = {j for j in (result_job_id(k) for k in keys) if j is not None}
        jobs = await outputs(sorted(job_ids))
        for key in unwanted(keys, jobs):
            if await asyncio.to_thread(store.delete, RESULTS_BUCKET, key):
                deleted += 1
        if len(keys) < PAGE:
            return deleted
