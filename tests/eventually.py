"""The one way tests wait: poll a condition until it holds, within a bound.

`eventually` for coroutines, `eventually_sync` for code on a thread of its own
(a subprocess driven through blocking calls). Both return the first truthy
result, so a check can hand back what it found. A check may instead assert, to
say why it does not hold yet: when the time runs out, the error names the
check and carries its last result or its last assertion.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

INTERVAL_S = 0.05


def _timed_out(check: Callable[..., object], timeout: float, last: object) -> AssertionError:
    name = getattr(check, "__qualname__", repr(check))
    if isinstance(last, AssertionError):
        return AssertionError(f"not true within {timeout} s: {name}: {last}")
    return AssertionError(f"not true within {timeout} s: {name} (last: {last!r})")


async def eventually(check: Callable[[], T | Awaitable[T]], timeout: float = 30.0) -> T:
    """The first truthy result of `check()` (awaited if it is a coroutine) within `timeout` s.

    Raises AssertionError, with the last result or the check's last
    AssertionError, when the time runs out; any other exception at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        last: object
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except AssertionError as failed:
            last = failed
        else:
            if result:
                return result  # type: ignore[return-value]
            last = result
        if loop.time() > deadline:
            raise _timed_out(check, timeout, last)
        await asyncio.sleep(INTERVAL_S)


def eventually_sync(check: Callable[[], T], timeout: float = 30.0) -> T:
    """`eventually` for blocking code: the first truthy `check()` within `timeout` s.

    Raises as `eventually` does. Never call it on an event loop's thread: it blocks.
    """
    deadline = time.monotonic() + timeout
    while True:
        last: object
        try:
            result = check()
        except AssertionError as failed:
            last = failed
        else:
            if result:
                return result
            last = result
        if time.monotonic() > deadline:
            raise _timed_out(check, timeout, last)
        time.sleep(INTERVAL_S)
