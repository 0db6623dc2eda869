"""daemon/metrics.py: the helpers the instrumented code calls, and the HTTP server."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from daemon import metrics
from daemon.exceptions import Unavailable
from daemon.jobs.state import JobState
from daemon.storage.cache import DiskCache
from daemon.storage.fetcher import Fetcher
from daemon.storage.local_store import LocalStore
from daemon.storage.refs import ObjectRef, parse_ref
from daemon.storage.source import ObjectInfo, ObjectReader


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_placement_decisions() -> None:
    name = "anvil_compute_placements_total"
    cap = "unit:placement"
    metrics.placement_made(cap, rank=0, saturated=False)
    metrics.placement_made(cap, rank=2, saturated=False)
    metrics.placement_made(cap, rank=1, saturated=False)
    metrics.placement_made(cap, rank=0, saturated=True)
    assert sample(name, capability=cap, decision="rank0") == 1
    assert sample(name, capability=cap, decision="spilled") == 2
    assert sample(name, capability=cap, decision="saturated") == 1


def test_job_finished_counts_and_times() -> None:
    cap = "unit:finished"
    metrics.job_finished(cap, JobState.TIMED_OUT, 0.3)
    labels = {"capability": cap, "state": "timed_out"}
    assert sample("anvil_compute_jobs_finished_total", **labels) == 1
    assert sample("anvil_compute_job_run_seconds_count", **labels) == 1
    assert sample("anvil_compute_job_run_seconds_bucket", le="0.25", **labels) == 0
    assert sample("anvil_compute_job_run_seconds_bucket", le="0.5", **labels) == 1


def test_module_cache_levels_from_a_worker_are_checked() -> None:
    name = "anvil_compute_module_cache_lookups_total"
    before = {level: sample(name, level=level) for level in ("disk", "unknown")}
    metrics.module_cache_lookup("disk")
    metrics.module_cache_lookup("../../etc/passwd")
    metrics.module_cache_lookup(None)
    assert sample(name, level="disk") == before["disk"] + 1
    assert sample(name, level="unknown") == before["unknown"] + 2


async def test_fetches_through_the_local_store_count_local_bytes_and_hits(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path / "store")
    data = b"x" * 300_000
    info = store.put_bytes(data, bucket="b", key="metered")
    ref = f"anvil://b/metered?sha256={info.sha256}"
    local_before = sample("anvil_compute_fetch_bytes_total", source="local")
    remote_before = sample("anvil_compute_fetch_bytes_total", source="remote")
    hits = sample("anvil_compute_fetch_lookups_total", result="hit")
    misses = sample("anvil_compute_fetch_lookups_total", result="miss")
    with DiskCache(tmp_path / "cache", max_bytes=10 << 20) as cache:
        fetcher = Fetcher(cache, local=store)
        for i in range(3):
            await fetcher.fetch_to(ref, tmp_path / f"copy{i}")
    assert sample("anvil_compute_fetch_lookups_total", result="miss") == misses + 1
    assert sample("anvil_compute_fetch_lookups_total", result="hit") == hits + 2
    assert sample("anvil_compute_fetch_bytes_total", source="local") == local_before + len(data)
    assert sample("anvil_compute_fetch_bytes_total", source="remote") == remote_before


class _Backend:
    """An object backend that is neither this peer's store nor the fabric (like S3).

    Stands in for S3 only to show how its bytes are classified; S3 itself is
    tested against a real S3 server in tests/integration/test_storage_s3.py.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def head(self, ref: ObjectRef) -> ObjectInfo:
        return ObjectInfo(bucket=ref.bucket, key=ref.key, size=len(self.data), sha256=None)

    @asynccontextmanager
    async def open(self, ref: ObjectRef) -> AsyncIterator[ObjectReader]:
        async def chunks() -> AsyncIterator[bytes]:
            yield self.data[:1000]
            yield self.data[1000:]

        yield ObjectReader(info=await self.head(ref), chunks=chunks())


async def test_bytes_from_another_backend_count_as_remote(tmp_path: Path) -> None:
    data = b"y" * 5000
    remote_before = sample("anvil_compute_fetch_bytes_total", source="remote")
    local_before = sample("anvil_compute_fetch_bytes_total", source="local")
    with DiskCache(tmp_path / "cache", max_bytes=1 << 20) as cache:
        fetcher = Fetcher(cache, s3=_Backend(data))
        copy = await fetcher.fetch_to(parse_ref("s3://bucket/obj"), tmp_path / "copy")
    assert copy.size == len(data)
    assert sample("anvil_compute_fetch_bytes_total", source="remote") == remote_before + len(data)
    assert sample("anvil_compute_fetch_bytes_total", source="local") == local_before


def test_metrics_server_serves_the_registry_and_refuses_a_taken_port() -> None:
    server = metrics.MetricsServer("127.0.0.1:0")
    try:
        host, port = metrics.split_listen(server.address)
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        assert "anvil_compute_build_info{" in body
        assert "process_open_fds" in body
        with pytest.raises(Unavailable, match=r"cannot serve metrics on 127\.0\.0\.1:\d+"):
            metrics.MetricsServer(server.address)
    finally:
        server.close()
    with socket.socket() as sock:  # closed: the port can be listened on again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_split_listen_takes_bracketed_ipv6() -> None:
    assert metrics.split_listen("[::1]:9464") == ("::1", 9464)
    assert metrics.split_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)
