"""Whether the registry answers: a `SELECT 1` every second, on a connection of its own.

While PostgreSQL cannot be reached, the pool hands out no connection (calls that
need the registry fail at once with RegistryUnavailable, so UNAVAILABLE, instead
of waiting out the pool's timeout) and `on_change(False)` tells the server to
report NOT_SERVING. The first probe that succeeds again refreshes the pool's
idle connections (those the outage broke are replaced) and reopens it, then
`on_change(True)`. The probe has its own connection, so a pool busy with work
never reads as an outage, and it is abandoned (not awaited) past its timeout,
so a server that stopped answering is noticed as fast as one that refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from daemon.loops import Background
from daemon.registry.driver import CONNECT_OPTIONS, Pool

log = logging.getLogger(__name__)

# libpq's least connect_timeout; the probe's own deadline is shorter anyway.
_CONNECT_S = 2


class RegistryWatch:
    """Probes the registry every `interval_s`; flips the pool and `on_change` on a change."""

    def __init__(
        self,
        url: str,
        pool: Pool,
        *,
        on_change: Callable[[bool], Awaitable[None]],
        interval_s: float = 1.0,
        timeout_s: float = 1.0,
    ) -> None:
        self._url = url
        self._pool = pool
        self._on_change = on_change
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._background = Background()
        self._abandoned: set[asyncio.Task[Any]] = set()
        self.reachable = True

    async def start(self) -> None:
        self._background.start("registry-watch", self._run())

    async def close(self) -> None:
        await self._background.close()
        for task in list(self._abandoned):
            await task  # each ends within the driver's cancel timeout, and never raises
        await self._drop_connection()

    async def probe(self) -> str | None:
        """Run one probe; None if the registry answered in time, else why not."""
        task = asyncio.create_task(self._select_one())
        done, _ = await asyncio.wait([task], timeout=self._timeout_s)
        if not done:
            # Cancelling a query may wait to cancel it on the server too: let
            # that finish in the background, and start the next probe afresh.
            stuck, self._conn = self._conn, None
            finish = asyncio.create_task(_abandon(task, stuck))
            self._abandoned.add(finish)
            finish.add_done_callback(self._abandoned.discard)
            return f"no answer to SELECT 1 within {self._timeout_s:g} s"
        error = task.exception()
        return None if error is None else str(error).strip() or type(error).__name__

    async def _run(self) -> None:
        while True:
            why = await self.probe()
            try:
                if why is not None and self.reachable:
                    await self._lost(why)
                elif why is None and not self.reachable:
                    await self._back()
            except Exception:
                log.exception("registry watch failed to report a change")
            await asyncio.sleep(self._interval_s)

    async def _lost(self, why: str) -> None:
        log.warning("registry unreachable (%s): not serving until it answers again", why)
        self.reachable = False
        self._pool.mark_unreachable(why)
        await self._on_change(False)

    async def _back(self) -> None:
        # Connections the outage broke would each fail one call: replace them
        # first (bounded: a check stuck on a dead socket must not hold us back).
        check = asyncio.create_task(_check(self._pool))
        await asyncio.wait([check], timeout=self._timeout_s * 2)
        if not check.done():
            self._abandoned.add(check)
            check.add_done_callback(self._abandoned.discard)
        log.info("registry reachable again: serving")
        self.reachable = True
        self._pool.mark_reachable()
        await self._on_change(True)

    async def _select_one(self) -> None:
        """SELECT 1 on the probe's connection, or on a new one if that one broke."""
        conn = self._conn
        if conn is not None:
            try:
                await conn.execute("SELECT 1")
                return
            except psycopg.Error:
                self._conn = None  # broken (a server restart, say): try a fresh one
                await _close(conn)
        conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, **{**CONNECT_OPTIONS, "connect_timeout": _CONNECT_S}
        )
        try:
            await conn.execute("SELECT 1")
        except BaseException:
            await _close(conn)
            raise
        self._conn = conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)


async def _abandon(task: asyncio.Task[None], conn: psycopg.AsyncConnection[Any] | None) -> None:
    """Cancel a probe that took too long, let it end, and close its connection."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    if conn is not None:
        await _close(conn)


async def _check(pool: Pool) -> None:
    """Replace the pool's broken idle connections (never raises: the next calls retry)."""
    try:
        await pool.check()
    except Exception as exc:
        log.warning("could not refresh the registry's connections: %s", exc)


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(psycopg.Error, OSError):
        await conn.close()
