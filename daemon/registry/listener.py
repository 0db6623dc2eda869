"""LISTEN/NOTIFY: one dedicated connection fanning notifications out to subscribers.

Notifications are hints, not a log: one sent while the connection was down is
lost. So after every reconnect each subscriber receives a `RECONNECTED` marker
and must re-read the state it cares about from the tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
from psycopg import sql

from daemon.loops import Background, wait_set
from daemon.registry.driver import CONNECT_OPTIONS

log = logging.getLogger(__name__)

_CHANNEL_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RECONNECTED = "\x00reconnected"


@dataclass(frozen=True, slots=True)
class Notification:
    channel: str
    payload: str


def peer_channel(peer_id_hex: str) -> str:
    """The channel on which a peer hears about jobs queued for it (see 0001_registry.sql)."""
    return f"anvil_peer_{peer_id_hex}"


JOB_EVENTS = "anvil_job_events"
MEMBERSHIP = "anvil_membership"


class Listener:
    """Listens on a fixed set of channels; `subscribe()` yields what arrives."""

    def __init__(
        self, url: str, channels: list[str], *, queue_size: int = 10_000, retry_s: float = 0.5
    ) -> None:
        for channel in channels:
            if not _CHANNEL_RE.match(channel):
                raise ValueError(f"bad channel name {channel!r}")
        self._url = url
        self._channels = list(channels)
        self._queue_size = queue_size
        self._retry_s = retry_s
        self._subscribers: dict[str, set[asyncio.Queue[Notification]]] = defaultdict(set)
        self._background = Background()
        self._connected = asyncio.Event()

    async def start(self, *, timeout: float = 10.0) -> None:
        """Connect and begin listening; wait until the first LISTEN is in place."""
        self._background.start("registry-listener", self._run())
        if not await wait_set(self._connected, timeout):
            raise TimeoutError(f"no LISTEN connection within {timeout:g} s")

    async def close(self) -> None:
        await self._background.close()

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[Notification]]:
        """A queue receiving this channel's notifications while the context is open."""
        if channel not in self._channels:
            raise ValueError(f"not listening on {channel!r}")
        queue: asyncio.Queue[Notification] = asyncio.Queue(self._queue_size)
        self._subscribers[channel].add(queue)
        try:
            yield queue
        finally:
            self._subscribers[channel].discard(queue)

    def _publish(self, note: Notification) -> None:
        for queue in list(self._subscribers.get(note.channel, ())):
            try:
                queue.put_nowait(note)
            except asyncio.QueueFull:
                # A slow subscriber must not stall the others; it gets a
                # reconnect marker so it re-reads state instead of trusting
                # a stream with holes.
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(Notification(note.channel, RECONNECTED))

    async def _run(self) -> None:
        first = True
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, **CONNECT_OPTIONS
                ) as conn:
                    for channel in self._channels:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self._connected.set()
                    if not first:
                        for channel in self._channels:
                            self._publish(Notification(channel, RECONNECTED))
                    first = False
                    async for note in conn.notifies():
                        self._publish(Notification(note.channel, note.payload))
            except asyncio.CancelledError:
                raise
            except psycopg.Error as exc:
                log.warning("registry listener lost its connection: %s; retrying", exc)
            await asyncio.sleep(self._retry_s)
