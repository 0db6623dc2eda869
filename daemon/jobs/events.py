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
from dataclasses import dataclass

from daemon.jobs.state import JobState, progress
from daemon.loops import Background
from daemon.registry.listener import JOB_EVENTS, RECONNECTED, Listener
from daemon.registry.models import Job

log = logging.getLogger(__name__)

RECENT_JOBS = 4096  # rows kept for watchers that follow a submission
RECENT_BYTES = 16 << 20  # ... and at most this much inline output among them
RECENT_OUTPUT_BYTES = 64 << 10  # a row with a larger inline output is read, not kept
MAX_NOTES = 16  # events a watcher keeps between looks; past that it just re-reads


@dataclass(frozen=True, slots=True)
class Event:
    """What a job-event notification says: the job's progress and placement."""

    key: tuple[int, int]  # jobstate.progress(state, attempt)
    peer_id: uuid.UUID | None

    def is_news_to(self, row: Job) -> bool:
        """Whether the row may be older than the change this event announces.

        A later state or attempt is news; so is the same one on another peer
        (a queued job re-placed: only its peer_id changed).
        """
        mine = _progress(row)
        return self.key > mine or (self.key == mine and self.peer_id != row.peer_id)


class JobWatch:
    """What one watcher has been told since it last looked (see `take`)."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self._pushed: Job | None = None
        self._events: list[Event] = []
        self._must_read = False

    def take(self, known: Job) -> tuple[Job, bool]:
        """(the newest row at hand: `known` or one published since; whether to re-read).

        An event that is no news to the row at hand (an echo of a change
        published here, or the insert of a job since claimed) needs no read.
        """
        self.changed.clear()
        pushed, events, must_read = self._pushed, self._events, self._must_read
        self._pushed, self._events, self._must_read = None, [], False
        best = known
        if pushed is not None and _progress(pushed) >= _progress(known):
            best = pushed
        stale = any(event.is_news_to(best) for event in events)
        return best, must_read or stale

    def _push(self, job: Job) -> None:
        if self._pushed is None or _progress(job) >= _progress(self._pushed):
            self._pushed = job
        self.changed.set()

    def _note(self, event: Event | None) -> None:
        if event is None or len(self._events) >= MAX_NOTES:
            self._must_read = True
        else:
            self._events.append(event)
        self.changed.set()


class JobEventHub:
    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._watches: dict[uuid.UUID, set[JobWatch]] = defaultdict(set)
        self._recent: collections.OrderedDict[uuid.UUID, Job] = collections.OrderedDict()
        self._recent_bytes = 0
        # The newest event seen per job, so a row published after a later change
        # was announced (a slow writer) is never cached.
        self._events: collections.OrderedDict[uuid.UUID, Event] = collections.OrderedDict()
        # Bumped on every listener reconnect: events may have been missed.
        self.epoch = 0
        self._callbacks: list[Callable[[uuid.UUID, str, int], None]] = []
        self._background = Background()

    async def start(self) -> None:
        ready = asyncio.Event()
        self._background.start("job-event-hub", self._run(ready))
        await ready.wait()

    async def close(self) -> None:
        await self._background.close()

    def on_event(self, callback: Callable[[uuid.UUID, str, int], None]) -> None:
        """Call `callback(job_id, state, attempt)` for every job event (must not block).

        Events arrive late and may describe a change older than what the caller
        already knows (the insert of a job it has since claimed): compare attempts.
        """
        self._callbacks.append(callback)

    def publish(self, job: Job, *, epoch: int) -> None:
        """A row this peer has just committed: wake its watchers with it, keep it a while.

        `epoch` is `self.epoch` read before the write began: a row written across
        a listener reconnect may have missed later events, so it is not kept.
        """
        for watch in self._watches.get(job.job_id, ()):
            watch._push(job)
        if epoch != self.epoch:
            return
        newer = self._events.get(job.job_id)
        if newer is not None and newer.is_news_to(job):
            return  # a later change was already announced
        cached = self._recent.get(job.job_id)
        if cached is not None and _progress(job) < _progress(cached):
            return
        self._forget(job.job_id)
        if job.output is not None and len(job.output) > RECENT_OUTPUT_BYTES:
            return
        self._recent[job.job_id] = job
        self._recent_bytes += _size(job)
        while len(self._recent) > RECENT_JOBS or self._recent_bytes > RECENT_BYTES:
            self._forget(next(iter(self._recent)))

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

    def _forget(self, job_id: uuid.UUID) -> None:
        gone = self._recent.pop(job_id, None)
        if gone is not None:
            self._recent_bytes -= _size(gone)

    def _remember(self, job_id: uuid.UUID, event: Event) -> None:
        known = self._events.get(job_id)
        if known is None or event.key >= known.key:  # same key: the later re-placement
            self._events[job_id] = event
            self._events.move_to_end(job_id)
            while len(self._events) > RECENT_JOBS:
                self._events.popitem(last=False)

    async def _run(self, ready: asyncio.Event) -> None:
        async with self._listener.subscribe(JOB_EVENTS) as queue:
            ready.set()
            while True:
                note = await queue.get()
                if note.payload == RECONNECTED:
                    self.epoch += 1
                    self._recent.clear()
                    self._recent_bytes = 0
                    self._events.clear()
                    for watches in list(self._watches.values()):
                        for watch in watches:
                            watch._note(None)
                    continue
                try:
                    data = json.loads(note.payload)
                    job_id = uuid.UUID(data["job_id"])
                    state = str(data["state"])
                    attempt = int(data["attempt"])
                    peer = data.get("peer_id")
                    event = Event(
                        key=progress(JobState(state), attempt),
                        peer_id=None if peer is None else uuid.UUID(peer),
                    )
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("ignoring malformed job event %r", note.payload)
                    continue
                self._remember(job_id, event)
                cached = self._recent.get(job_id)
                if cached is not None and event.is_news_to(cached):
                    self._forget(job_id)
                for watch in self._watches.get(job_id, ()):
                    watch._note(event)
                for callback in self._callbacks:
                    callback(job_id, state, attempt)


def _progress(job: Job) -> tuple[int, int]:
    return progress(job.state, job.attempt)


def _size(job: Job) -> int:
    return len(job.output) if job.output is not None else 0
