"""The one way tests wait: poll a condition until it holds, within a bound."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


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
            raise AssertionError(f"not true within {timeout} s: {check} (last: {result!r})")
        await asyncio.sleep(0.05)
