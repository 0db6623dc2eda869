"""The wheel: built from a clean copy of the source, complete, and runnable from a fresh venv.

The venv has no access to this environment's packages (no
--system-site-packages): pip installs the wheel and its dependencies from the
package index, as `pip install anvil-compute` would, then `anvil-compute demo`
runs every example capability on embedded PostgreSQL from that install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Build output and caches are not source: a stale build/lib would leak old
# modules into the wheel. guest_modules/dist is source (the shipped modules).
TOP_LEVEL_JUNK = {".git", "build", "dist", ".venv", ".anvil", ".benchmarks"}
ANYWHERE_JUNK = {"__pycache__", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == REPO
    return {
        n
        for n in names
        if n in ANYWHERE_JUNK
        or n.endswith(".egg-info")
        or n == ".hypothesis"
        or (top and n in TOP_LEVEL_JUNK)
    }


def run(
    args: list[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=cwd
    )
    assert result.returncode == 0, (
        f"{args[:3]} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=_ignore)
    out = tmp_path / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(source), "-w", str(out)],
        timeout=180,
    )
    (wheel,) = out.glob("anvil_compute-*.whl")
    return wheel


def check_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())

    def shipped(folder: str, pattern: str) -> set[str]:
        return {p.name for p in (REPO / folder).glob(pattern)}

    def packaged(prefix: str, suffix: str = "") -> set[str]:
        return {
            n.removeprefix(prefix) for n in names if n.startswith(prefix) and n.endswith(suffix)
        }

    assert packaged("daemon/sql/", ".sql") == shipped("sql", "*.sql") != set()
    assert packaged("daemon/pb/anvil/", ".pyi") == shipped("daemon/pb/anvil", "*.pyi") != set()
    assert packaged("daemon/guest_dist/", ".wasm") == shipped("guest_modules/dist", "*.wasm")
    assert len(packaged("daemon/guest_dist/", ".wasm")) >= 4
    models = shipped("guest_modules/models", "*")
    assert packaged("daemon/guest_models/") == models != set()
    # `anvil-compute new-guest` copies the SDK header from the installed package.
    assert packaged("daemon/guest_sdk/") == {"__init__.py", "anvil_guest.h", "anvil_guest.c"}
    assert {"daemon/py.typed", "hrw/py.typed", "daemon/cli.py", "daemon/metrics.py"} <= names
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    dist_info = f"anvil_compute-{version}.dist-info"
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "anvil-compute = daemon.cli:main" in entry_points


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    check_contents(wheel)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    bin_dir = venv / "bin"
    run([str(bin_dir / "pip"), "install", "-q", str(wheel)], timeout=300)

    home = tmp_path / "home"
    home.mkdir()
    empty_config = tmp_path / "config.toml"
    empty_config.write_text("")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home),  # no state or caches of this environment
        "ANVIL_CONFIG": str(empty_config),  # not the host's /etc/anvil-compute
        "LANG": "C.UTF-8",
    }
    where = run(
        [str(bin_dir / "python"), "-c", "import daemon; print(daemon.__file__)"],
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    shown = run([str(bin_dir / "anvil-compute"), "--version"], timeout=60, env=env, cwd=tmp_path)
    assert shown.stdout.strip() == f"anvil-compute {version}"

    demo = run([str(bin_dir / "anvil-compute"), "demo"], timeout=240, env=env, cwd=tmp_path)
    assert "all example capabilities succeeded" in demo.stdout, demo.stdout + demo.stderr
    lines = {line.split()[0]: line for line in demo.stdout.splitlines() if line.strip()}
    for capability in ("text:wordcount", "data:csv-aggregate", "image:resize"):
        assert "SUCCEEDED" in lines[capability], demo.stdout
    assert "10/10" in lines["inference:digits"], demo.stdout
    # The container example too, wherever Podman is installed (CI installs it).
    if shutil.which("podman"):
        assert "SUCCEEDED" in lines["demo:busybox-wc"], demo.stdout + demo.stderr
        assert "33 words" in lines["demo:busybox-wc"], demo.stdout
    else:
        assert "demo:busybox-wc: skipped" in demo.stdout, demo.stdout
