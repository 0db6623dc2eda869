"""The one way tests wait: poll a condition until it holds, within a bound.

`eventually` for coroutines, `eventually_sync` for code on a thread of its own
(a subprocess driven through blocking calls). Both return the first truthy
result, so a check can hand back what it found, and both fail with the last
result seen, so a timeout says what was there instead.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

INTERVAL_S = 0.05


def _timed_out(check: Callable[..., object], timeout: float, result: object) -> AssertionError:
    name = getattr(check, "__qualname__", repr(check))
    return AssertionError(f"not true within {timeout} s: {name} (last: {result!r})")


async def eventually(check: Callable[[], T | Awaitable[T]], timeout: float = 30.0) -> T:
    """The first truthy result of `check()` (awaited if it is a coroutine) within `timeout` s.

    Raises AssertionError with the last result when the time runs out.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() > deadline:
            raise _timed_out(check, timeout, result)
        await asyncio.sleep(INTERVAL_S)


def eventually_sync(check: Callable[[], T], timeout: float = 30.0) -> T:
    """`eventually` for blocking code: the first truthy `check()` within `timeout` s.

    Raises AssertionError with the last result when the time runs out. Never
    call it on an event loop's thread: it blocks.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise _timed_out(check, timeout, result)
        time.sleep(INTERVAL_S)
