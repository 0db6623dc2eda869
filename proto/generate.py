"""Regenerate the checked-in Python stubs from proto/anvil/*.proto.

Usage: python proto/generate.py [OUT_DIR]   (default: daemon/pb)

protoc writes `from anvil import x_pb2`; the stubs live in the package
`daemon.pb.anvil`, so the imports are rewritten. The descriptors keep the file
names `anvil/*.proto` so reflection and other languages see the same names.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
IMPORT_RE = re.compile(r"^from anvil import (\w+)", re.MULTILINE)


def generate(out: Path) -> list[Path]:
    """Write stubs under out/anvil/; return the files written. Raises on protoc failure."""
    target = out / "anvil"
    target.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "anvil").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *sources,
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    written = sorted(p for p in target.iterdir() if p.suffix in {".py", ".pyi"})
    for path in written:
        if path.name == "__init__.py":
            continue
        text = IMPORT_RE.sub(r"from daemon.pb.anvil import \1", path.read_text())
        path.write_text(text)
    (target / "__init__.py").write_text(
        '"""Generated protobuf and gRPC stubs (proto/generate.py)."""\n'
    )
    (out / "__init__.py").write_text('"""Generated code; see proto/generate.py."""\n')
    return written


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "daemon" / "pb")
