"""Backoff between attempts of a rescued job. Pure."""

from __future__ import annotations

from datetime import timedelta

BASE = timedelta(milliseconds=500)
CAP = timedelta(seconds=30)


def backoff(attempt: int, *, base: timedelta = BASE, cap: timedelta = CAP) -> timedelta:
    """Delay before attempt `attempt + 1` after attempt `attempt` was lost: base·2^(n-1), capped."""
    if attempt < 1:
        return timedelta(0)
    delay: timedelta = base * (2 ** min(attempt - 1, 30))
    return min(delay, cap)
