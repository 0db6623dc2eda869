"""`/metrics` of a real `anvil-compute serve`, scraped over HTTP after a few real jobs."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.convert import PROTO_TO_JOB_STATE
from daemon.jobs.state import JobState
from tests.e2e.cluster import Peer, PeerFactory, free_port
from tests.eventually import eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TEXT = b"the quick brown fox\njumps over the lazy dog\nthe end\n"


def scrape(address: str) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        content_type = reply.headers["Content-Type"]
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


@pytest.fixture
def metered_peer(tmp_path: Path, database_url: str) -> Iterator[tuple[Peer, str]]:
    secret = tmp_path / "auth.secret"
    secret.write_text("metrics-test-secret-" + "x" * 40 + "\n")
    secret.chmod(0o600)
    factory = PeerFactory(tmp_path, database_url, secret)
    metrics_address = f"127.0.0.1:{free_port()}"
    try:
        yield factory.start(ANVIL_METRICS_LISTEN=metrics_address), metrics_address
    finally:
        factory.stop_all()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_metrics_after_a_few_jobs_show_the_right_counts(
    metered_peer: tuple[Peer, str], tmp_path: Path
) -> None:
    peer, address = metered_peer
    content_type, first = await asyncio.to_thread(scrape, address)
    assert content_type.startswith("text/plain")
    assert value(first, "anvil_compute_ready") == 1
    (build,) = series(first, "anvil_compute_build_info")
    assert dict(build)["version"]
    (identity,) = series(first, "anvil_compute_peer_info")
    assert dict(identity)["peer_id"] == peer.peer_id
    assert value(first, "process_resident_memory_bytes") > 0
    assert not series(first, "anvil_compute_jobs_finished_total")
    # Alone in its registry: it sees itself, live and offering capabilities.
    assert value(first, "anvil_compute_membership_peers", kind="live") == 1
    assert value(first, "anvil_compute_membership_peers", kind="capable") == 1

    (tmp_path / "notes.txt").write_bytes(TEXT)
    async with peer.client() as client:
        ref = await client.upload(tmp_path / "notes.txt")
        states = []
        # One after another: each job runs before the next is submitted.
        for capability in ["text:wordcount"] * 3 + ["image:resize"]:
            submitted = await client.submit(capability, inputs=[ref])
            final = await client.wait(submitted.job_id)
            states.append((capability, PROTO_TO_JOB_STATE[final.state]))
    assert states == [("text:wordcount", JobState.SUCCEEDED)] * 3 + [
        ("image:resize", JobState.FAILED)  # a text file is not an image
    ]

    # A client sees a job end as soon as its result is recorded; the runner
    # counts it and frees its slot (after removing its files) a moment later.
    def settled() -> Samples | None:
        _, samples = scrape(address)
        done = sum(series(samples, "anvil_compute_jobs_finished_total").values())
        running = sum(series(samples, "anvil_compute_jobs_running").values())
        return samples if done >= 4 and running == 0 else None

    after = await eventually(lambda: asyncio.to_thread(settled), timeout=15)

    finished = series(after, "anvil_compute_jobs_finished_total")
    assert finished == {
        frozenset({("capability", "text:wordcount"), ("state", "succeeded")}): 3,
        frozenset({("capability", "image:resize"), ("state", "failed")}): 1,
    }
    run_time = "anvil_compute_job_run_seconds"
    wordcount = {"capability": "text:wordcount", "state": "succeeded"}
    assert value(after, f"{run_time}_count", **wordcount) == 3
    assert value(after, f"{run_time}_bucket", le="+Inf", **wordcount) == 3
    assert value(after, f"{run_time}_sum", **wordcount) > 0
    assert value(after, f"{run_time}_count", capability="image:resize", state="failed") == 1
    assert not series(after, "anvil_compute_job_attempts_stopped_total")
    for capability in ("text:wordcount", "image:resize"):
        assert value(after, "anvil_compute_jobs_running", capability=capability) == 0
    assert value(after, "anvil_compute_queue_depth") == 0

    # One peer: every placement is its own (rank 0, or rank 0 while "full"
    # when the load view had not yet seen the previous job end), never spilled.
    placements = series(after, "anvil_compute_placements_total")
    assert sum(placements.values()) == 4
    assert {dict(labels)["decision"] for labels in placements} <= {"rank0", "saturated"}
    assert sum(v for k, v in placements.items() if ("capability", "text:wordcount") in k) == 3

    # Each module compiled once; the later wordcount runs found it in a worker's memory.
    lookups = "anvil_compute_module_cache_lookups_total"
    assert value(after, lookups, level="compiled") == 2
    assert value(after, lookups, level="memory") == 2
    assert value(after, lookups, level="disk") == 0

    # The input was copied into the cache once, from this peer's own store.
    assert value(after, "anvil_compute_fetch_lookups_total", result="miss") == 1
    assert value(after, "anvil_compute_fetch_lookups_total", result="hit") == 3
    assert value(after, "anvil_compute_fetch_bytes_total", source="local") == len(TEXT)
    assert value(after, "anvil_compute_fetch_bytes_total", source="remote") == 0
