"""Outputs live as long as their jobs keep them: the sweep's rule and the store's delete."""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from daemon.access import RESULTS_BUCKET
from daemon.exceptions import ObjectNotFound
from daemon.jobs.state import JobState
from daemon.storage import results
from daemon.storage.local_store import LocalStore

DONE, GONE, RUNNING, FAILED = (uuid.UUID(int=i) for i in range(1, 5))


def ref(key: str) -> str:
    """As the runner writes them: the key percent-encoded."""
    return f"anvil://{RESULTS_BUCKET}/{quote(key)}?sha256=" + "0" * 64


def test_only_what_no_job_keeps_is_unwanted() -> None:
    jobs = {
        DONE: (JobState.SUCCEEDED, (ref(f"{DONE}/2/stdout"), ref(f"{DONE}/2/output/a b.txt"))),
        RUNNING: (JobState.RUNNING, ()),
        FAILED: (JobState.FAILED, ()),
    }
    keys = [
        f"{DONE}/2/stdout",
        f"{DONE}/2/output/a b.txt",  # kept (its ref has the key percent-encoded)
        f"{DONE}/1/stdout",  # an attempt that was rescued
        f"{GONE}/1/stdout",  # its job was pruned
        f"{RUNNING}/1/output/partial",  # being stored right now
        f"{FAILED}/1/output/x",  # a failed attempt that stored something
        "not-a-job/file",  # not a runner's: left alone
    ]
    assert results.unwanted(keys, jobs) == [
        f"{DONE}/1/stdout",
        f"{GONE}/1/stdout",
        f"{FAILED}/1/output/x",
    ]


def test_delete_frees_every_version_and_keeps_shared_blobs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, max_bytes=10_000)
    store.put_bytes(b"one", bucket=RESULTS_BUCKET, key="k")
    store.put_bytes(b"two!", bucket=RESULTS_BUCKET, key="k")
    shared = store.put_bytes(b"two!", bucket="other", key="same")
    assert store.used_bytes == 11
    assert store.delete(RESULTS_BUCKET, "k") == 7
    assert store.used_bytes == 4
    with pytest.raises(ObjectNotFound):
        store.head(RESULTS_BUCKET, "k")
    # The blob another object names stays; the one nobody names is gone.
    with store.open("other", "same") as reader:
        assert b"".join(reader) == b"two!"
    assert store.blob_path(shared.sha256 or "").exists()
    assert [p for p in (tmp_path / "objects" / "sha256").rglob("*") if p.is_file()] == [
        store.blob_path(shared.sha256 or "")
    ]
    assert store.delete(RESULTS_BUCKET, "k") == 0
    assert not list((tmp_path / "objects" / "tmp").iterdir())
    # A second handle (another process) sees the same usage.
    assert LocalStore(tmp_path).used_bytes == 4


async def test_a_sweep_deletes_what_no_job_keeps(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for key in (f"{DONE}/2/stdout", f"{GONE}/1/stdout", f"{RUNNING}/1/x"):
        store.put_bytes(key.encode(), bucket=RESULTS_BUCKET, key=key)
    asked: list[list[uuid.UUID]] = []

    async def outputs(
        job_ids: list[uuid.UUID],
    ) -> dict[uuid.UUID, tuple[JobState, tuple[str, ...]]]:
        asked.append(list(job_ids))
        known = {
            DONE: (JobState.SUCCEEDED, (ref(f"{DONE}/2/stdout"),)),
            RUNNING: (JobState.RUNNING, ()),
        }
        return {j: known[j] for j in job_ids if j in known}

    assert await results.sweep(store, outputs) == 1
    assert sorted(store.keys(RESULTS_BUCKET)) == [f"{DONE}/2/stdout", f"{RUNNING}/1/x"]
    assert asked == [sorted({DONE, GONE, RUNNING})]
