"""Executor slots shared by capabilities: a job is claimed only with a slot to run in. Pure.

An executor runs a bounded number of guests at once (the WASM pool: one per
worker). Claiming a job for which no slot is free would mark it RUNNING while
it waits, charge the wait to nobody's benefit and keep it from other peers; so
the runner claims a job only after taking a slot of its capability's kind and
gives the slot back once the guest is done.

No capability may hold every slot of a kind that others share: it keeps at
most `capacity - 1` of them, so one capability's sleeping guests cannot starve
the rest (a kind with one capability, or one slot, has no one to share with).
"""

from __future__ import annotations

from collections.abc import Mapping


class Slots:
    """Slots per executor kind, taken and given back per capability."""

    def __init__(self, capacity: Mapping[str, int], kinds: Mapping[str, str]) -> None:
        """`capacity`: slots per kind (a kind missing is unbounded); `kinds`: capability -> kind."""
        for kind, count in capacity.items():
            if count < 1:
                raise ValueError(f"executor kind {kind!r} needs at least one slot")
        self._capacity = dict(capacity)
        self._used: dict[str, int] = dict.fromkeys(capacity, 0)
        self._held: dict[str, int] = {}
        self._kinds: dict[str, str] = {}
        self._sharing: dict[str, int] = {}
        self.set_kinds(kinds)

    def set_kinds(self, kinds: Mapping[str, str]) -> None:
        """The capabilities that share the slots now (deployed, undeployed, reloaded).

        A capability that leaves keeps the slots it holds until its runs give
        them back; it takes no new ones.
        """
        held = {name: n for name, n in self._held.items() if n}
        self._kinds = {**{name: self._kinds[name] for name in held}, **kinds}
        self._held = {name: held.get(name, 0) for name in self._kinds}
        self._sharing = {}
        for kind in kinds.values():
            self._sharing[kind] = self._sharing.get(kind, 0) + 1

    def free_for(self, capability: str) -> int | None:
        """Slots `capability` may take now; None when its kind is unbounded."""
        kind = self._kinds[capability]
        capacity = self._capacity.get(kind)
        if capacity is None:
            return None
        own_limit = capacity - 1 if self._sharing.get(kind, 0) > 1 and capacity > 1 else capacity
        return max(0, min(capacity - self._used[kind], own_limit - self._held[capability]))

    def take(self, capability: str) -> None:
        """Take one slot; raises ValueError when none is free for it."""
        free = self.free_for(capability)
        if free is not None and free < 1:
            raise ValueError(f"no free slot for {capability!r}")
        kind = self._kinds[capability]
        if kind in self._used:
            self._used[kind] += 1
        self._held[capability] += 1

    def give_back(self, capability: str) -> None:
        kind = self._kinds[capability]
        if self._held[capability] < 1:
            raise ValueError(f"{capability!r} holds no slot")
        if kind in self._used:
            self._used[kind] -= 1
        self._held[capability] -= 1

    def held(self, capability: str) -> int:
        return self._held[capability]
