"""Named SQL queries loaded from sql/queries.sql (`-- name: x` headers)."""

from __future__ import annotations

import functools
import re
from importlib import resources

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a queries file into {name: sql}; raise ValueError on a duplicate name."""
    queries: dict[str, str] = {}
    parts = _HEADER.split(text)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"duplicate query name {name!r}")
        queries[name] = body.strip()
    return queries


@functools.cache
def load() -> dict[str, str]:
    return parse(resources.files("daemon.sql").joinpath("queries.sql").read_text("utf-8"))


def get(name: str) -> str:
    """The SQL of one named query; KeyError if there is none."""
    return load()[name]
