"""Prometheus metrics of this peer, in one registry, served over HTTP at `/metrics`.

Counters are per process and start at zero with it (Prometheus' `rate()` and
`increase()` handle restarts); sum them over peers for the fabric.

- `anvil_compute_jobs_finished_total{capability,state}`: attempts this peer ran
  to an outcome (succeeded, failed, timed_out); `..._job_run_seconds` is their
  run time (fetching inputs, running, storing outputs), same labels.
- `anvil_compute_job_attempts_stopped_total{capability}`: attempts stopped
  before an outcome (cancelled, rescued, lease lost, handed back on drain).
- `anvil_compute_jobs_running{capability}`, `anvil_compute_queue_depth`: now.
- `anvil_compute_placements_total{capability,decision}`: SubmitJob decisions
  made here: `rank0` (the data-local peer had room), `spilled` (a lower HRW
  rank took it), `saturated` (every candidate full: queued on rank 0).
- `anvil_compute_module_cache_lookups_total{level}`: where a WASM module came
  from: `memory` or `disk` (hits) or `compiled` (a miss).
- `anvil_compute_fetch_lookups_total{result}` (hit/miss) and
  `anvil_compute_fetch_bytes_total{source}` (local store vs remote backends):
  object fetches through the disk cache.
- `anvil_compute_cache_corrupt_entries_total`: disk cache entries found not to
  match their sha256 on a hit, dropped and fetched again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from daemon import __version__
from daemon.exceptions import Unavailable
from daemon.jobs.state import JobState
from daemon.storage.fabric import Fabric, count_remote_bytes
from daemon.storage.local_store import LocalSource
from daemon.storage.source import ObjectReader

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

PREFIX = "anvil_compute"
# Guests run from milliseconds (a cached module, small input) to many minutes.
RUN_SECONDS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)

BUILD = Info(f"{PREFIX}_build", "Version of this daemon", registry=REGISTRY)
BUILD.info({"version": __version__})
PEER = Info(f"{PREFIX}_peer", "This peer's identity, once started", registry=REGISTRY)
READY = Gauge(
    f"{PREFIX}_ready",
    "1 while this peer serves and takes jobs; 0 while starting or draining",
    registry=REGISTRY,
)
JOBS_FINISHED = Counter(
    f"{PREFIX}_jobs_finished",
    "Job attempts this peer ran to an outcome, by capability and final state",
    ["capability", "state"],
    registry=REGISTRY,
)
JOB_RUN_SECONDS = Histogram(
    f"{PREFIX}_job_run_seconds",
    "Run time of the attempts this peer finished (fetch inputs, run, store outputs)",
    ["capability", "state"],
    buckets=RUN_SECONDS_BUCKETS,
    registry=REGISTRY,
)
JOBS_STOPPED = Counter(
    f"{PREFIX}_job_attempts_stopped",
    "Attempts stopped before an outcome: cancelled, rescued, lease lost, drained",
    ["capability"],
    registry=REGISTRY,
)
JOBS_RUNNING = Gauge(
    f"{PREFIX}_jobs_running",
    "Jobs running on this peer now",
    ["capability"],
    registry=REGISTRY,
)
MEMBERSHIP_PEERS = Gauge(
    f"{PREFIX}_membership_peers",
    "Live peers in this peer's view of the fabric (all regions): those that offer "
    "at least one capability (capable) and all of them (live)",
    ["kind"],
    registry=REGISTRY,
)
OBJECTS_REBALANCED = Counter(
    f"{PREFIX}_objects_rebalanced",
    "Objects this peer copied to their new HRW owner after a membership change",
    registry=REGISTRY,
)
JOBS_PRUNED = Counter(
    f"{PREFIX}_jobs_pruned",
    "Finished jobs this peer deleted from the registry after their retention",
    registry=REGISTRY,
)
RESULT_OBJECTS_DELETED = Counter(
    f"{PREFIX}_result_objects_deleted",
    "Job output objects this peer deleted from its store: their job was pruned, or "
    "ended without keeping them",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    f"{PREFIX}_queue_depth",
    "Jobs placed on this peer and waiting to be claimed (refreshed every few seconds)",
    registry=REGISTRY,
)
PLACEMENTS = Counter(
    f"{PREFIX}_placements",
    "Placement decisions of the jobs submitted through this peer",
    ["capability", "decision"],
    registry=REGISTRY,
)
JOBS_QUEUE_TIMED_OUT = Counter(
    f"{PREFIX}_jobs_queue_timed_out",
    "Jobs this peer's sweep failed because no peer ran them within their queue timeout",
    ["capability"],
    registry=REGISTRY,
)
MODULE_CACHE_LOOKUPS = Counter(
    f"{PREFIX}_module_cache_lookups",
    "WASM modules loaded for a run, by the cache level that had them (compiled = miss)",
    ["level"],
    registry=REGISTRY,
)
FETCH_LOOKUPS = Counter(
    f"{PREFIX}_fetch_lookups",
    "Object fetches served from the disk cache (hit) or transferred into it (miss)",
    ["result"],
    registry=REGISTRY,
)
FETCH_BYTES = Counter(
    f"{PREFIX}_fetch_bytes",
    "Bytes transferred into the disk cache, from this peer's store (local) or not (remote)",
    ["source"],
    registry=REGISTRY,
)
CACHE_CORRUPT_ENTRIES = Counter(
    f"{PREFIX}_cache_corrupt_entries",
    "Disk cache entries whose bytes no longer matched their sha256 on a hit (dropped, refetched)",
    registry=REGISTRY,
)

MODULE_CACHE_LEVELS = frozenset({"memory", "disk", "compiled"})


def job_finished(capability: str, state: JobState, seconds: float) -> None:
    JOBS_FINISHED.labels(capability, state.value).inc()
    JOB_RUN_SECONDS.labels(capability, state.value).observe(seconds)


def placement_made(capability: str, *, rank: int, saturated: bool) -> None:
    decision = "saturated" if saturated else "rank0" if rank == 0 else "spilled"
    PLACEMENTS.labels(capability, decision).inc()


def cache_entry_corrupt() -> None:
    CACHE_CORRUPT_ENTRIES.inc()


def module_cache_lookup(level: object) -> None:
    """Count one module load; `level` comes from a worker process, so it is checked."""
    MODULE_CACHE_LOOKUPS.labels(level if level in MODULE_CACHE_LEVELS else "unknown").inc()


class MeteredOpener:
    """A cache fill's opener that counts the bytes it streams, by origin, and whether it ran.

    Bytes read from this peer's own store count as local; from S3 or another
    Anvil cluster as remote; through the fabric, as remote exactly the bytes
    the fabric pulled from other peers. Call `count_lookup()` once the cache
    has produced the object: a miss if this opener was used, a hit otherwise.
    """

    def __init__(
        self,
        opener: Callable[[], AbstractAsyncContextManager[ObjectReader]],
        *,
        source: object,
    ) -> None:
        self._opener = opener
        self._source = source
        self.used = False

    def __call__(self) -> AbstractAsyncContextManager[ObjectReader]:
        self.used = True
        return self._open()

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[ObjectReader]:
        total = [0]
        with count_remote_bytes() as from_peers:
            try:
                async with self._opener() as reader:
                    chunks = _count(reader.chunks, total)
                    try:
                        yield ObjectReader(info=reader.info, chunks=chunks)
                    finally:
                        await chunks.aclose()
            finally:
                if isinstance(self._source, LocalSource):
                    remote = 0
                elif isinstance(self._source, Fabric):
                    remote = min(from_peers[0], total[0])
                else:
                    remote = total[0]
                FETCH_BYTES.labels("local").inc(total[0] - remote)
                FETCH_BYTES.labels("remote").inc(remote)

    def count_lookup(self) -> None:
        FETCH_LOOKUPS.labels("miss" if self.used else "hit").inc()


async def _count(chunks: AsyncIterator[bytes], total: list[int]) -> AsyncGenerator[bytes, None]:
    async for chunk in chunks:
        total[0] += len(chunk)
        yield chunk


def split_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be a bracketed IPv6 address) as (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


class MetricsServer:
    """`/metrics` over HTTP from a daemon thread; `close()` stops it."""

    def __init__(self, listen: str) -> None:
        """Bind and start serving; raise Unavailable when the address cannot be bound."""
        host, port = split_listen(listen)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=REGISTRY)
        except OSError as exc:
            raise Unavailable(
                f"cannot serve metrics on {listen}: {exc.strerror or exc} "
                "(set metrics_listen, or empty to turn metrics off)"
            ) from exc
        bound = self._httpd.socket.getsockname()
        bound_host, bound_port = str(bound[0]), int(bound[1])
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.address = f"{shown}:{bound_port}"

    def close(self) -> None:
        httpd: WSGIServer = self._httpd
        httpd.shutdown()
        httpd.server_close()
        thread: threading.Thread = self._thread
        thread.join(timeout=5)
