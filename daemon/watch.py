"""Demultiplexes job changes to the WatchJob streams and the runner on this peer.

Two sources feed it. The registry's job-event notifications (one LISTEN
subscription for the whole peer) say that a job changed, anywhere in the
fabric: a watcher re-reads the row only when the event is news to it. This
peer's own writes (a submission, a claim, a finish) are published with the
row they committed: a watcher takes it as is, with no read.

A small cache keeps the rows published here recently, so a WatchJob that
follows its SubmitJob starts without a read. It stays coherent through the
notifications: any event newer than a cached row evicts it, and a watcher
subscribes before it looks, so a change it cannot see yet still wakes it.
After a listener reconnect (events may have been missed) the cache is
dropped and every watcher re-reads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

from daemon.jobstate import JobState, progress
from daemon.registry.listener import JOB_EVENTS, RECONNECTED, Listener
from daemon.registry.models import Job

log = logging.getLogger(__name__)

RECENT_JOBS = 4096  # rows kept for watchers that follow a submission
RECENT_OUTPUT_BYTES = 64 << 10  # a row with a larger inline output is read, not kept


class JobWatch:
    """What one watcher has been told since it last looked (see `take`)."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self._pushed: Job | None = None
        self._newest_event: tuple[int, int] | None = None
        self._must_read = False

    def take(self, known: Job) -> tuple[Job, bool]:
        """(the newest row at hand: `known` or one published since; whether to re-read).

        An event no newer than the row at hand is old news (an echo of a change
        published here, or the insert of a job since claimed): no read.
        """
        self.changed.clear()
        pushed, newest, must_read = self._pushed, self._newest_event, self._must_read
        self._pushed, self._newest_event, self._must_read = None, None, False
        best = known
        if pushed is not None and _progress(pushed) >= _progress(known):
            best = pushed
        stale = newest is not None and newest > _progress(best)
        return best, must_read or stale

    def _push(self, job: Job) -> None:
        if self._pushed is None or _progress(job) >= _progress(self._pushed):
            self._pushed = job
        self.changed.set()

    def _note(self, key: tuple[int, int] | None) -> None:
        if key is None:
            self._must_read = True
        elif self._newest_event is None or key > self._newest_event:
            self._newest_event = key
        self.changed.set()


class JobEventHub:
    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._watches: dict[uuid.UUID, set[JobWatch]] = defaultdict(set)
        self._recent: collections.OrderedDict[uuid.UUID, Job] = collections.OrderedDict()
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

    def publish(self, job: Job) -> None:
        """A row this peer has just committed: wake its watchers with it, keep it a while."""
        cached = self._recent.get(job.job_id)
        if cached is None or _progress(job) >= _progress(cached):
            if job.output is not None and len(job.output) > RECENT_OUTPUT_BYTES:
                self._recent.pop(job.job_id, None)
            else:
                self._recent[job.job_id] = job
                self._recent.move_to_end(job.job_id)
                while len(self._recent) > RECENT_JOBS:
                    self._recent.popitem(last=False)
        for watch in self._watches.get(job.job_id, ()):
            watch._push(job)

    def recent(self, job_id: uuid.UUID) -> Job | None:
        """The row published here for `job_id`, unless an event has since outdated it.

        Only for a caller already subscribed with `watch`: a change whose event
        has not arrived yet still wakes it.
        """
        return self._recent.get(job_id)

    @contextlib.asynccontextmanager
    async def watch(self, job_id: uuid.UUID) -> AsyncIterator[JobWatch]:
        """Follow `job_id`'s changes until the block ends."""
        watch = JobWatch()
        self._watches[job_id].add(watch)
        try:
            yield watch
        finally:
            watches = self._watches.get(job_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[job_id]

    async def _run(self, ready: asyncio.Event) -> None:
        async with self._listener.subscribe(JOB_EVENTS) as queue:
            ready.set()
            while True:
                note = await queue.get()
                if note.payload == RECONNECTED:
                    self._recent.clear()
                    for watches in list(self._watches.values()):
                        for watch in watches:
                            watch._note(None)
                    continue
                try:
                    data = json.loads(note.payload)
                    job_id = uuid.UUID(data["job_id"])
                    state = str(data["state"])
                    attempt = int(data["attempt"])
                    key = progress(JobState(state), attempt)
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring malformed job event %r", note.payload)
                    continue
                cached = self._recent.get(job_id)
                if cached is not None and key > _progress(cached):
                    del self._recent[job_id]
                for watch in self._watches.get(job_id, ()):
                    watch._note(key)
                for callback in self._callbacks:
                    callback(job_id, state, attempt)


def _progress(job: Job) -> tuple[int, int]:
    return progress(job.state, job.attempt)
