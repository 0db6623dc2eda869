"""Background loops end when cancelled, even when woken at that very moment."""

from __future__ import annotations

import asyncio

from daemon.loops import Background, every, wait_set


async def test_a_loop_woken_as_it_is_cancelled_still_stops() -> None:
    # On Python 3.11, asyncio.wait_for returns (swallowing the cancellation)
    # when its awaitable completes in the same turn as the cancel: a loop built
    # on it went round again and `close` waited for ever.
    for _ in range(50):
        wake = asyncio.Event()
        steps = 0

        async def step() -> None:
            nonlocal steps
            steps += 1

        loops = Background()
        task = loops.start("t", every(60, step, what="test step", wake=wake))
        await asyncio.sleep(0)  # the loop now waits for its wake-up
        wake.set()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        assert task in done and task.cancelled(), f"the loop went on ({steps} steps)"
        await loops.close()


async def test_wait_set_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    event.set()
    assert await wait_set(event, 0.01) is True


async def test_close_reports_a_task_that_ignores_its_cancellation(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("daemon.loops.CLOSE_WAIT_S", 0.1)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    loops = Background()
    task = loops.start("stubborn", stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(loops.close(), 2)  # returns: the shutdown goes on
    release.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
