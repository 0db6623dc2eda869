"""Matching a job's resource requirements against what a peer registered. Pure.

Both sides are string maps (the wire form). A requirement is met when the peer
offers the same key and either both values are numbers and the offer is at
least the request (`{"memory_mib": "2048"}` fits `"4096"`), or the values are
equal strings (`{"arch": "x86_64"}`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from daemon.exceptions import InvalidArgument

MAX_KEY_LENGTH = 64
MAX_VALUE_LENGTH = 256
MAX_ENTRIES = 64


def _as_number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def satisfies(offered: Mapping[str, str], required: Mapping[str, str]) -> bool:
    """True when every required resource is offered in sufficient quantity."""
    for key, want in required.items():
        have = offered.get(key)
        if have is None:
            return False
        want_n, have_n = _as_number(want), _as_number(have)
        if want_n is not None and have_n is not None:
            if have_n < want_n:
                return False
        elif have != want:
            return False
    return True


def validate(resources: Mapping[str, str], *, field: str = "resources") -> dict[str, str]:
    """Return a plain copy; raise InvalidArgument naming the bad entry."""
    if len(resources) > MAX_ENTRIES:
        raise InvalidArgument(f"{field}: at most {MAX_ENTRIES} entries, got {len(resources)}")
    clean: dict[str, str] = {}
    for key, value in resources.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"{field}: keys and values must be strings")
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidArgument(f"{field}: key {key!r} must be 1..{MAX_KEY_LENGTH} characters")
        if len(value) > MAX_VALUE_LENGTH:
            raise InvalidArgument(f"{field}[{key}]: value longer than {MAX_VALUE_LENGTH}")
        clean[key] = value
    return clean
