"""Group commit: concurrent calls of one kind share one statement.

While a batch is in flight, new items wait and then go together in the next
one, so a lone call goes out at once (no timer, no added latency) and a burst
costs one round trip and one commit per batch instead of per call. Under load
this is most of what a peer spends per job (see benchmarks/e2e_bench.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Failed:
    """In place of a result: this item's own error, raised for its caller alone."""

    error: Exception


class Batcher(Generic[T, R]):
    """`await batcher.submit(item)` returns this item's share of `run(batch)`.

    `run` gets the items in arrival order and returns one result (or Failed)
    per item, in the same order. If it raises, every caller in that batch gets
    the error. A caller cancelled before its batch goes out is left out of it.
    """

    def __init__(
        self, run: Callable[[list[T]], Awaitable[Sequence[R | Failed]]], *, max_batch: int
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be positive")
        self._run = run
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="registry-batch")
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = [(i, f) for i, f in self._pending[: self._max_batch] if not f.done()]
                del self._pending[: self._max_batch]
                if not batch:
                    continue
                try:
                    results = await self._run([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(
                            f"a batch of {len(batch)} returned {len(results)} results"
                        )
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Failed):
                        future.set_exception(result.error)
                    else:
                        future.set_result(result)
        finally:
            self._flusher = None
            for _, future in self._pending:  # only left behind when cancelled
                if not future.done():
                    future.cancel()
            if self._pending:
                self._pending.clear()
