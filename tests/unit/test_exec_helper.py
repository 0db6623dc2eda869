"""anvil-exec: the shipped binaries are what its build script makes, and it refuses a host
without our seccomp profile (its other behaviour runs inside containers:
tests/integration/test_podman_*.py)."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
HELPER_DIR = REPO / "guest_modules" / "containers" / "exec_helper"


@pytest.fixture(scope="module")
def build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("exec_helper_build", HELPER_DIR / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_rebuild_is_byte_identical(build: ModuleType, tmp_path: Path) -> None:
    # Fails (never skips) without the pinned toolchain: pip install ziglang==<ZIG_VERSION>.
    build.build(tmp_path)
    stale = build.stale_files(tmp_path)
    assert not stale, f"anvil-exec out of date, run {HELPER_DIR / 'build.py'}: {stale}"


def test_binaries_are_shipped_executable(build: ModuleType) -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = data["package-data"]["daemon.executors.podman"]
    for machine in build.MACHINES:
        path = build.DEST / build.binary_name(machine)
        assert path.name in shipped
        assert os.access(path, os.X_OK), path
        assert path.stat().st_size < 16 * 1024


def test_it_runs_nothing_without_our_seccomp_profile(build: ModuleType) -> None:
    helper = build.DEST / build.binary_name(platform.machine())
    done = subprocess.run(
        [str(helper), "sh", "-c", "echo RAN"], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout) == (125, "")
    assert done.stderr.startswith("anvil-exec: sandbox: unshare is allowed")
