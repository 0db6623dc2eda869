"""Objects follow membership: after peers join or leave, each peer copies the
objects it holds but no longer owns to their new HRW owner.

The built-in store puts an object on the HRW owner of its key among the live
peers of the region, and jobs are placed by the same HRW on the same key, so a
job runs where its input is. When membership changes, ownership of about 1/n of
the keys moves; until the objects move too, those jobs fetch their input across
the fabric. A pass copies each key's latest version to its owner when the owner
does not already hold the same bytes. The local copy stays (a read asks the
owner first and falls back to it), so no object is ever in one place only
during a move.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from daemon import metrics
from daemon.exceptions import AnvilError, ObjectNotFound
from daemon.storage.fabric import Fabric
from daemon.storage.local_store import LocalStore
from daemon.storage.refs import ObjectRef, Scheme
from daemon.storage.source import ObjectInfo

log = logging.getLogger(__name__)

PAGE = 500  # index rows read per step
CHECK_EVERY_S = 1.0  # how often the membership is compared with the last pass's
MAX_RETRY_S = 60.0  # after failed passes (an owner unreachable), back off to this


class Rebalancer:
    def __init__(
        self,
        *,
        fabric: Fabric,
        store: LocalStore,
        members: Callable[[], frozenset[str]],
        check_every_s: float = CHECK_EVERY_S,
    ) -> None:
        """`members()` names the live store peers of this region (their ids)."""
        self._fabric = fabric
        self._store = store
        self._members = members
        self._check_every_s = check_every_s
        self._done_for: frozenset[str] | None = None

    async def run(self) -> None:
        """Pass after every membership change (the first one at start)."""
        retry_s = self._check_every_s
        while True:
            members = self._members()
            wait_s = self._check_every_s
            if members != self._done_for and len(members) > 1:
                try:
                    moved = await self.rebalance()
                except AnvilError as exc:
                    log.warning("rebalancing objects failed, retrying in %.0f s: %s", retry_s, exc)
                    wait_s, retry_s = retry_s, min(retry_s * 2, MAX_RETRY_S)
                else:
                    self._done_for, retry_s = members, self._check_every_s
                    if moved:
                        log.info("copied %d objects to their new owners", moved)
            await asyncio.sleep(wait_s)

    async def rebalance(self) -> int:
        """One pass over the local store; return how many objects were copied.

        Raises AnvilError when an owner could not take an object (the next pass
        tries again); objects already at their owner are skipped.
        """
        copied, after, failed = 0, 0, 0
        while page := await asyncio.to_thread(self._store.latest, after_seq=after, limit=PAGE):
            for seq, info in page:
                after = seq
                try:
                    copied += await self._place(info)
                except AnvilError as exc:
                    failed += 1
                    log.debug("cannot copy %s/%s to its owner: %s", info.bucket, info.key, exc)
        metrics.OBJECTS_REBALANCED.inc(copied)
        if failed:
            raise AnvilError(f"{failed} objects could not be copied to their owners")
        return copied

    async def _place(self, info: ObjectInfo) -> int:
        owners = self._fabric.owners(info.key)
        if not owners or owners[0].peer_id == self._fabric.peer_id:
            return 0
        owner = self._fabric.client(owners[0].address)
        ref = ObjectRef(scheme=Scheme.ANVIL, bucket=info.bucket, key=info.key)
        try:
            there = await owner.head(ref)
            if there.sha256 == info.sha256:
                return 0
        except ObjectNotFound:
            pass
        await owner.put_file(
            self._store.blob_path(info.sha256 or ""),
            bucket=info.bucket,
            key=info.key,
            content_type=info.content_type,
            sha256=info.sha256,
        )
        return 1
