"""Demultiplexes the registry's job-event notifications to per-job waiters.

One LISTEN subscription serves every WatchJob stream and every running job's
cancel check on this peer; a waiter is woken for its own job only. After a
listener reconnect every waiter is woken, since notifications may have been
missed, and re-reads its job from the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

from daemon.registry.listener import JOB_EVENTS, RECONNECTED, Listener

log = logging.getLogger(__name__)


class JobEventHub:
    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._waiters: dict[uuid.UUID, set[asyncio.Event]] = defaultdict(set)
        self._callbacks: list[Callable[[uuid.UUID, str, int], None]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(ready), name="job-event-hub")
        await ready.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def on_event(self, callback: Callable[[uuid.UUID, str, int], None]) -> None:
        """Call `callback(job_id, state, attempt)` for every job event (must not block).

        Events arrive late and may describe a change older than what the caller
        already knows (the insert of a job it has since claimed): compare attempts.
        """
        self._callbacks.append(callback)

    @contextlib.asynccontextmanager
    async def waiter(self, job_id: uuid.UUID) -> AsyncIterator[asyncio.Event]:
        """An Event set whenever `job_id` may have changed; the caller clears it."""
        event = asyncio.Event()
        self._waiters[job_id].add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    async def _run(self, ready: asyncio.Event) -> None:
        async with self._listener.subscribe(JOB_EVENTS) as queue:
            ready.set()
            while True:
                note = await queue.get()
                if note.payload == RECONNECTED:
                    for waiters in list(self._waiters.values()):
                        for event in waiters:
                            event.set()
                    continue
                try:
                    data = json.loads(note.payload)
                    job_id = uuid.UUID(data["job_id"])
                    state = str(data["state"])
                    attempt = int(data["attempt"])
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring malformed job event %r", note.payload)
                    continue
                for event in self._waiters.get(job_id, ()):
                    event.set()
                for callback in self._callbacks:
                    callback(job_id, state, attempt)
