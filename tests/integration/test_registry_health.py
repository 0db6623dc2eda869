"""The registry watch on a real PostgreSQL behind a link the test cuts: calls fail
fast while it is cut, and everything comes back by itself when it is restored."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from daemon.exceptions import JobNotFound, RegistryUnavailable
from daemon.registry import Registry
from daemon.registry.health import RegistryWatch
from tests.eventually import eventually
from tests.registry_link import RegistryLink


@pytest.fixture
async def link(database_url: str) -> AsyncIterator[RegistryLink]:
    link = RegistryLink(database_url)
    yield link
    await link.close()


async def test_calls_fail_fast_while_the_registry_is_cut_off_and_recover(
    link: RegistryLink,
) -> None:
    url = await link.start()
    registry = await Registry.connect(url, max_size=4, run_migrations=False)
    changes: list[bool] = []

    async def on_change(reachable: bool) -> None:
        changes.append(reachable)

    watch = RegistryWatch(url, registry.pool, on_change=on_change, interval_s=0.2)
    await watch.start()
    missing = uuid.uuid4()
    try:
        with pytest.raises(JobNotFound):
            await registry.jobs.get(missing)
        # A call already waiting for a connection when the cut is noticed ends too.
        async with contextlib.AsyncExitStack() as every_connection:
            for _ in range(4):
                await every_connection.enter_async_context(registry.pool.connection())
            waiting = asyncio.create_task(registry.jobs.get(missing))
            await link.cut()
            await eventually(lambda: changes == [False], timeout=10)
        with pytest.raises(RegistryUnavailable):
            await asyncio.wait_for(waiting, 3)
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="unreachable"):
            await registry.jobs.get(missing)
        assert time.monotonic() - started < 1.0

        await link.restore()
        await eventually(lambda: changes == [False, True], timeout=10)
        # Every connection the cut broke was replaced: no call pays for it.
        for _ in range(8):
            with pytest.raises(JobNotFound):
                await registry.jobs.get(missing)
    finally:
        await watch.close()
        await registry.close()
