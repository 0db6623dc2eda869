"""`anvil-compute new-guest`: every scaffold builds and runs as its README says.

Each language's scaffold is made once per session by the real CLI, built with
the pinned toolchain by the command its README prints, then run through
`anvil-compute run` (the job sandbox) on good and bad inputs, in subprocesses.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import wasmtime

GUEST = Path(__file__).resolve().parents[2] / "guest_modules"
NAME = "stats:sum"


def anvil(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `anvil-compute` entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


@dataclass(frozen=True, kw_only=True)
class Scaffold:
    folder: Path
    wasm: Path
    commands: list[str]  # the README's: build, try, deploy
    printed: str  # what new-guest printed


def readme_commands(readme: str) -> list[str]:
    block = re.search(r"```sh\n(.*?)```", readme, re.DOTALL)
    assert block is not None, readme
    return block.group(1).splitlines()


@pytest.fixture(scope="session", params=["c", "zig"])
def scaffold(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Scaffold:
    root = tmp_path_factory.mktemp(f"new-guest-{request.param}")
    made = anvil("new-guest", NAME, "--lang", request.param, cwd=root)
    assert made.returncode == 0, made.stderr
    folder = root / "stats-sum"
    commands = readme_commands((folder / "README.md").read_text())
    build = shlex.split(commands[0])
    assert build[:3] == ["python", "-m", "ziglang"], commands[0]
    # The first compile on a machine builds WASI libc into Zig's cache (~20-30 s).
    built = subprocess.run(
        [sys.executable, *build[1:]],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return Scaffold(
        folder=folder, wasm=folder / "stats-sum.wasm", commands=commands, printed=made.stdout
    )


def run_module(
    scaffold: Scaffold, tmp_path: Path, data: bytes, params: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`anvil-compute run` on the scaffold's module with `data` as input 0."""
    (tmp_path / "input").write_bytes(data)
    args = ["run", str(scaffold.wasm), "--input", str(tmp_path / "input")]
    args += ["--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    return anvil(*args, cwd=tmp_path)


def test_scaffold_is_a_wasi_command_as_its_readme_says(scaffold: Scaffold) -> None:
    module = wasmtime.Module(wasmtime.Engine(), scaffold.wasm.read_bytes())
    assert {i.module for i in module.imports} == {"wasi_snapshot_preview1"}
    assert {e.name for e in module.exports} >= {"_start", "memory"}
    assert scaffold.commands[1:] == [
        "anvil-compute run stats-sum.wasm --input sample.txt --param scale=2",
        f"anvil-compute deploy {NAME} stats-sum.wasm",
    ]
    assert all(f"  {command}\n" in scaffold.printed for command in scaffold.commands)
    if (scaffold.folder / "main.c").exists():
        sdk = (GUEST / "sdk" / "anvil_guest.h").read_bytes()
        assert (scaffold.folder / "anvil_guest.h").read_bytes() == sdk


def test_scaffold_runs_its_readme_example(scaffold: Scaffold, tmp_path: Path) -> None:
    argv = shlex.split(scaffold.commands[1])
    assert argv[0] == "anvil-compute"
    proc = anvil(*argv[1:], "--cache-dir", str(tmp_path / "cache"), cwd=scaffold.folder)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"count": 3, "sum": 24}


def test_scaffold_sums_like_python(scaffold: Scaffold, tmp_path: Path) -> None:
    rng = random.Random(7)
    numbers = [rng.randint(-(10**12), 10**12) for _ in range(2000)]
    blanks = ["", " ", "\t", "\r"]  # around a number, as editors and Windows leave them
    lines = [rng.choice(blanks) + str(n) + rng.choice(blanks) for n in numbers]
    data = "\n".join([*lines[:1000], "", "  ", *lines[1000:]]).encode()
    proc = run_module(scaffold, tmp_path, data, {"scale": "-3"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"count": 2000, "sum": -3 * sum(numbers)}


@pytest.mark.parametrize(
    ("data", "params", "message"),
    [
        (b"1\n2\n\nx7\n", {}, "line 4: expected an integer, got 'x7'"),
        (b"9223372036854775807\n1\n", {}, "line 2: the sum overflows 64 bits"),
        (b"1\n", {"sclae": "2"}, "unknown param 'sclae'"),
    ],
)
def test_scaffold_fails_bad_input_with_one_line(
    scaffold: Scaffold, tmp_path: Path, data: bytes, params: dict[str, str], message: str
) -> None:
    proc = run_module(scaffold, tmp_path, data, params)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[0] == f"{NAME}: {message}"


def test_new_guest_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "stats-sum").mkdir()
    (tmp_path / "stats-sum" / "notes.txt").write_text("mine")
    proc = anvil("new-guest", NAME, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "anvil-compute new-guest: stats-sum exists and is not an empty folder\n"
    assert [p.name for p in (tmp_path / "stats-sum").iterdir()] == ["notes.txt"]


def test_new_guest_fills_an_empty_folder_and_refuses_a_bad_name(tmp_path: Path) -> None:
    (tmp_path / "here").mkdir()
    proc = anvil("new-guest", NAME, "--lang", "zig", "--dir", "here", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == [
        "README.md",
        "main.zig",
        "sample.txt",
    ]
    proc = anvil("new-guest", "Stats/Sum", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("anvil-compute new-guest: capability 'Stats/Sum' must be")
