import re

import pytest

from daemon.registry import queries


def test_named_queries_parse_and_are_all_used(repo_root) -> None:  # type: ignore[no-untyped-def]
    names = set(queries.load())
    source = "\n".join(p.read_text() for p in (repo_root / "daemon" / "registry").glob("*.py"))
    used = set(re.findall(r'"(\w+)"', source)) & names
    assert names == used, f"queries never used: {sorted(names - used)}"


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate query name 'a'"):
        queries.parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
