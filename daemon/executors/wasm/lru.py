"""A least-recently-used map bounded by entry count and by total size. Pure: no I/O."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """Keeps at most `max_entries` values whose sizes sum to at most `max_bytes`.

    A value larger than `max_bytes` on its own is not kept. Not thread-safe:
    one owner (a worker's main thread) uses it.
    """

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("cache bounds must be >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def keys(self) -> list[K]:
        """Keys from least to most recently used."""
        return list(self._items)

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, size: int) -> None:
        """Insert or replace, evicting least recently used values to make room."""
        self.pop(key)
        if size > self.max_bytes or self.max_entries == 0:
            return
        while self._items and (
            len(self._items) >= self.max_entries or self._bytes + size > self.max_bytes
        ):
            _, (_, victim_size) = self._items.popitem(last=False)
            self._bytes -= victim_size
        self._items[key] = (value, size)
        self._bytes += size

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self._bytes -= item[1]
        return item[0]
