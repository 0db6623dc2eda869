"""The checked-in guest modules are exactly what guest_modules/build.py makes from the C sources."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import wasmtime

from daemon.commands.new_guest import pinned_zig_version

GUEST = Path(__file__).resolve().parents[2] / "guest_modules"
CAPABILITIES = ("text:wordcount", "data:csv-aggregate", "image:resize", "inference:digits")


@pytest.fixture(scope="module")
def build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("guest_build", GUEST / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sha256sums_lists_every_module(build: ModuleType) -> None:
    lines = (GUEST / "dist" / "SHA256SUMS").read_text().splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in lines)
    assert sorted(listed) == sorted(build.wasm_name(c) for c in CAPABILITIES)
    assert set(build.MODULES) == set(CAPABILITIES)
    for name, digest in listed.items():
        assert hashlib.sha256((GUEST / "dist" / name).read_bytes()).hexdigest() == digest, name


def test_rebuild_is_byte_identical(build: ModuleType, tmp_path: Path) -> None:
    # Fails (never skips) without the pinned toolchain: pip install ziglang==<ZIG_VERSION>.
    build.build(tmp_path)
    stale = build.stale_files(tmp_path)
    assert not stale, f"guest modules out of date, run `python guest_modules/build.py`: {stale}"


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_module_is_a_small_wasi_command(build: ModuleType, capability: str) -> None:
    data = (GUEST / "dist" / build.wasm_name(capability)).read_bytes()
    assert len(data) < 96 * 1024
    module = wasmtime.Module(wasmtime.Engine(), data)
    assert {e.name for e in module.exports} >= {"_start", "memory"}
    assert {i.module for i in module.imports} == {"wasi_snapshot_preview1"}


def test_new_guest_pins_the_same_toolchain(build: ModuleType) -> None:
    # Scaffolds tell authors to install pyproject's pin; build.py checks its own copy.
    assert pinned_zig_version() == build.ZIG_VERSION
