"""daemon/registry/batcher.py: group commit of concurrent calls."""

from __future__ import annotations

import asyncio

import pytest

from daemon.registry.batcher import Batcher, Failed


class Recorder:
    """A `run` that records its batches; items < 0 fail alone, 'boom' fails the batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def run(self, batch: list[int]) -> list[int | Failed]:
        self.batches.append(list(batch))
        await self.gate.wait()
        if 999 in batch:
            raise RuntimeError("boom")
        return [Failed(ValueError(f"bad {i}")) if i < 0 else i * 10 for i in batch]


async def test_a_lone_call_goes_out_at_once_and_a_burst_shares_batches() -> None:
    rec = Recorder()
    batcher = Batcher(rec.run, max_batch=4)
    assert await batcher.submit(1) == 10
    assert rec.batches == [[1]]
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    # Arrival order kept, at most max_batch per batch.
    assert rec.batches[1:] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_calls_arriving_during_a_batch_wait_for_the_next_one() -> None:
    rec = Recorder()
    batcher = Batcher(rec.run, max_batch=64)
    rec.gate.clear()
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = [asyncio.create_task(batcher.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    assert rec.batches == [[1]]
    rec.gate.set()
    assert await first == 10
    assert [await t for t in later] == [20, 30]
    assert rec.batches == [[1], [2, 3]]


async def test_an_item_fails_alone_and_a_failed_batch_fails_all_of_it() -> None:
    rec = Recorder()
    batcher = Batcher(rec.run, max_batch=64)
    results = await asyncio.gather(
        batcher.submit(1), batcher.submit(-2), batcher.submit(3), return_exceptions=True
    )
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -2"
    failed = await asyncio.gather(batcher.submit(5), batcher.submit(999), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in failed)
    assert await batcher.submit(6) == 60  # and it keeps serving


async def test_a_caller_cancelled_before_its_batch_is_left_out() -> None:
    rec = Recorder()
    batcher = Batcher(rec.run, max_batch=64)
    rec.gate.clear()
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    gone = asyncio.create_task(batcher.submit(2))
    kept = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    gone.cancel()
    rec.gate.set()
    assert await first == 10 and await kept == 30
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert rec.batches == [[1], [3]]


async def test_a_run_that_miscounts_fails_its_batch() -> None:
    async def short(batch: list[int]) -> list[int | Failed]:
        return [1]

    batcher = Batcher(short, max_batch=8)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


def test_max_batch_must_be_positive() -> None:
    async def run(batch: list[int]) -> list[int | Failed]:
        return list(batch)

    with pytest.raises(ValueError, match="positive"):
        Batcher(run, max_batch=0)
