"""The checked-in stubs must be exactly what proto/generate.py makes from the .proto files."""

import importlib.util
from pathlib import Path


def test_generated_stubs_match_the_proto_files(repo_root: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", repo_root / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = {p.name: p.read_bytes() for p in generate.generate(tmp_path)}
    fresh["__init__.py"] = (tmp_path / "anvil" / "__init__.py").read_bytes()
    checked_in = {
        p.name: p.read_bytes()
        for p in (repo_root / "daemon" / "pb" / "anvil").iterdir()
        if p.suffix in {".py", ".pyi"}
    }
    stale = sorted(
        name for name in fresh.keys() | checked_in.keys() if fresh.get(name) != checked_in.get(name)
    )
    assert not stale, f"stubs out of date, run `python proto/generate.py`: {stale}"
