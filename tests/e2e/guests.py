"""Test guests written as WAT, and peer configs that register them."""

from __future__ import annotations

from pathlib import Path

import wasmtime

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "guest_modules" / "dist"

# Sleeps `seconds` inside poll_oneoff (epochs cannot interrupt it), then prints "slept".
SLEEP_WAT = """
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "slept\\n")
  (func (export "_start")
    (i64.store (i32.const 0) (i64.const 0))
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const NANOS))
    (i64.store (i32.const 32) (i64.const 0))
    (i32.store16 (i32.const 40) (i32.const 0))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
    (i32.store (i32.const 300) (i32.const 200))
    (i32.store (i32.const 304) (i32.const 6))
    (drop (call $write (i32.const 1) (i32.const 300) (i32.const 1) (i32.const 400)))))
"""
# Prints WORD on stdout and exits 0.
SAY_WAT = r"""
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "WORD")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const LEN))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""
SPIN_WAT = '(module (memory (export "memory") 1) (func (export "_start") (loop br 0)))'
TRAP_WAT = '(module (memory (export "memory") 1) (func (export "_start") unreachable))'


def write_guest(directory: Path, name: str, wat: str) -> Path:
    path = directory / f"{name}.wasm"
    path.write_bytes(wasmtime.wat2wasm(wat))
    return path


def say(directory: Path, word: str) -> Path:
    """A guest that prints `word` (ASCII, no quotes)."""
    wat = SAY_WAT.replace("WORD", word).replace("LEN", str(len(word)))
    return write_guest(directory, f"say-{word}", wat)


def examples_config(max_concurrency: int = 4) -> str:
    lines = []
    for cap, file in (
        ("text:wordcount", "text-wordcount.wasm"),
        ("data:csv-aggregate", "data-csv-aggregate.wasm"),
        ("image:resize", "image-resize.wasm"),
        ("inference:digits", "inference-digits.wasm"),
    ):
        lines += [
            f'[capabilities."{cap}"]',
            f'wasm = "{DIST / file}"',
            f"max_concurrency = {max_concurrency}",
            "",
        ]
    return "\n".join(lines)


def guests_config(directory: Path) -> str:
    """Examples plus test:sleep (one slot), test:spin and test:trap."""
    sleep = write_guest(directory, "sleep", SLEEP_WAT.replace("NANOS", str(1_500_000_000)))
    spin = write_guest(directory, "spin", SPIN_WAT)
    trap = write_guest(directory, "trap", TRAP_WAT)
    return examples_config() + "\n".join(
        [
            '[capabilities."test:sleep"]',
            f'wasm = "{sleep}"',
            "max_concurrency = 1",
            "",
            '[capabilities."test:spin"]',
            f'wasm = "{spin}"',
            "max_concurrency = 2",
            "timeout_ms = 1000",
            # Fuel out of reach, so the wall-clock deadline is what stops it.
            "fuel = 1_000_000_000_000_000",
            "",
            '[capabilities."test:trap"]',
            f'wasm = "{trap}"',
            "",
        ]
    )


def fabric_config(directory: Path, *, max_concurrency: int, nap_s: float = 0.3) -> str:
    """Examples plus test:nap (sleeps nap_s in poll_oneoff), all at max_concurrency."""
    nap = write_guest(directory, "nap", SLEEP_WAT.replace("NANOS", str(int(nap_s * 1e9))))
    return examples_config(max_concurrency) + "\n".join(
        [
            '[capabilities."test:nap"]',
            f'wasm = "{nap}"',
            f"max_concurrency = {max_concurrency}",
            "",
        ]
    )
