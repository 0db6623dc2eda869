"""`anvil-compute run` in a real subprocess: output, exit status and reason on failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import test_wasm_guests as guests

# Until daemon.cli lists the run command, register it the way cli.main would.
_LAUNCHER = """
import sys
from daemon import cli
if "daemon.commands.run" not in cli.COMMAND_MODULES:
    cli.COMMAND_MODULES = ("daemon.commands.run",)
sys.exit(cli.main(sys.argv[1:]))
"""


def anvil_run(tmp_path: Path, wasm: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    module = guests.write_module(tmp_path, wasm)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            _LAUNCHER,
            "run",
            str(module),
            "--cache-dir",
            str(tmp_path / "cache"),
            *args,
        ],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )


def test_run_prints_stdout_and_writes_outputs(tmp_path: Path) -> None:
    stdin = tmp_path / "words.txt"
    stdin.write_bytes(b"one two three")
    proc = anvil_run(
        tmp_path,
        guests.echo("cli"),
        "--input",
        str(stdin),
        "--param",
        "lang=en",
        "--output-dir",
        str(tmp_path / "results"),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"cli")
    assert b"--lang=en\0" in proc.stdout
    assert (tmp_path / "results" / "copy.txt").read_bytes() == b"one two three"
    assert b"copy.txt (13 bytes)" in proc.stderr


def test_run_defaults_to_an_output_folder_in_the_current_directory(tmp_path: Path) -> None:
    proc = anvil_run(tmp_path, guests.write_files(1, 5))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "output" / "f0").stat().st_size == 5


@pytest.mark.parametrize(
    ("wasm", "args", "status", "reason"),
    [
        (guests.exit_with(7), [], 7, b"nonzero_exit: guest exited with code 7"),
        (guests.spin(), ["--fuel", "1000000"], 125, b"out_of_fuel"),
        (guests.sleep(3600), ["--timeout", "0.5"], 124, b"killed while blocked"),
        (guests.huge_initial_memory(64), ["--memory", "1"], 125, b"memory_limit"),
        (guests.GARBAGE, [], 125, b"invalid_module: invalid module: not a WebAssembly binary"),
        (guests.flood(1, 8 << 20), [], 125, b"output_too_large"),
    ],
    ids=["exit-7", "fuel", "timeout", "memory", "garbage", "stdout-cap"],
)
def test_run_fails_with_the_reason(
    tmp_path: Path, wasm: bytes, args: list[str], status: int, reason: bytes
) -> None:
    proc = anvil_run(tmp_path, wasm, *args)
    assert proc.returncode == status, proc.stderr
    assert reason in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith(b"anvil-compute run: ")


def test_run_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "old").write_text("x")
    proc = anvil_run(tmp_path, guests.echo())
    assert proc.returncode == 1
    assert b"not empty" in proc.stderr


@pytest.mark.parametrize(
    "args", [["--param", "novalue"], ["--fuel", "0"], ["--timeout", "soon"], ["--memory", "-1"]]
)
def test_run_rejects_bad_flags(tmp_path: Path, args: list[str]) -> None:
    proc = anvil_run(tmp_path, guests.echo(), *args)
    assert proc.returncode == 2
    assert b"usage:" in proc.stderr
