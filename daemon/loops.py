"""Background work: one way to run a step for ever, and one owner for the tasks.

A peer keeps several loops (heartbeat, rescue sweep, pruning, membership and
load refresh, token renewal, ...). Each is `every(interval, step)`: the step
runs each turn; a step that raises an AnvilError (the registry is down, a peer
does not answer) is logged as a warning and tried again next turn, anything
else is logged with its traceback, and only cancellation ends the loop.
`Background` starts such tasks and cancels and awaits them all at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from daemon.exceptions import AnvilError

log = logging.getLogger(__name__)

# How long `Background.close` waits for cancelled tasks to end.
CLOSE_WAIT_S = 10.0


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` passes; True if it was set.

    asyncio.timeout rather than wait_for: on Python 3.11, wait_for may swallow
    a cancellation that arrives just as the event is set (it returns instead),
    and a loop that is being stopped then goes round again for ever.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def every(
    interval_s: float,
    step: Callable[[], Awaitable[object]],
    *,
    what: str,
    wake: asyncio.Event | None = None,
    at_once: bool = False,
) -> None:
    """Run `step` every `interval_s` seconds (sooner when `wake` is set), for ever.

    `what` names the step in log lines ("rescue sweep"). With `at_once` the
    first turn runs now, else after the first interval. Never raises but
    CancelledError.
    """
    first = True
    while True:
        if not (first and at_once):
            if wake is None:
                await asyncio.sleep(interval_s)
            else:
                await wait_set(wake, interval_s)
                wake.clear()
        first = False
        try:
            await step()
        except AnvilError as exc:
            log.warning("%s failed: %s", what, exc)
        except Exception:
            log.exception("%s failed unexpectedly", what)


class Background:
    """The tasks of one component; `close()` cancels them and waits for each."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, name: str, work: Coroutine[Any, Any, object]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work, name=name)
        self._tasks.append(task)
        return task

    async def close(self) -> None:
        """Cancel every task and wait for them, CLOSE_WAIT_S at most: a task that
        ignores its cancellation is reported, and the shutdown goes on."""
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        done, pending = await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
        for task in pending:
            log.error("background task %s did not stop when cancelled", task.get_name())
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                # A loop that died must not stop a shutdown.
                log.error(
                    "background task %s had failed", task.get_name(), exc_info=task.exception()
                )
