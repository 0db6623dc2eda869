"""The process's wasmtime Engine: its configuration, the key of its compiled code, its clock.

One Engine per process (each sandbox worker makes exactly one). Proposals a
WASI preview 1 command does not need are off; fuel and epoch interruption on.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version

from wasmtime import Config, Engine

WASMTIME_VERSION = version("wasmtime")


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineSettings:
    """Per-process engine knobs (limits that wasmtime sets per engine, not per store)."""

    max_wasm_stack: int = 1 << 20  # bytes of native stack a guest may use
    epoch_tick_s: float = 0.01  # wall-clock deadline resolution
    parallel_compilation: bool = True


def engine_options(settings: EngineSettings) -> dict[str, bool | int | str]:
    """Every Config value we set that shapes compiled code (part of the disk-cache key)."""
    return {
        "strategy": "cranelift",
        "cranelift_opt_level": "speed",
        "consume_fuel": True,
        "epoch_interruption": True,
        "max_wasm_stack": settings.max_wasm_stack,
        "debug_info": False,
        # Proposals a WASI preview 1 command does not need: less attack surface.
        "wasm_threads": False,
        "shared_memory": False,
        "wasm_gc": False,
        "gc_support": False,
        "wasm_function_references": False,
        "wasm_exceptions": False,
        "wasm_stack_switching": False,
        "wasm_component_model": False,
        "wasm_memory64": False,
        "wasm_multi_memory": False,
        "wasm_wide_arithmetic": False,
        "wasm_custom_page_sizes": False,
        # Host-dependent results would make a job's output depend on the peer.
        "wasm_relaxed_simd": False,
    }


def engine_key(settings: EngineSettings) -> str:
    """What a serialized module depends on: wasmtime version, host, engine config."""
    options = json.dumps(engine_options(settings), sort_keys=True)
    return f"wasmtime {WASMTIME_VERSION} {platform.machine()} {options}"


def make_engine(settings: EngineSettings) -> Engine:
    config = Config()
    for name, value in engine_options(settings).items():
        setattr(config, name, value)
    config.parallel_compilation = settings.parallel_compilation
    return Engine(config)


class EpochTicker:
    """Advances the engine's epoch every tick while a guest runs (idle otherwise)."""

    def __init__(self, engine: Engine, tick_s: float) -> None:
        self._engine = engine
        self._tick_s = tick_s
        self._running = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="epoch-ticker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._running.wait()
            if self._closed:
                return
            # Count ticks from the wall clock, not from sleeps: a sleep that
            # overshoots on a busy host must not push the guest's deadline out.
            began, issued = time.monotonic(), 0
            while self._running.is_set() and not self._closed:
                time.sleep(self._tick_s)
                due = int((time.monotonic() - began) / self._tick_s)
                for _ in range(max(1, due - issued)):
                    self._engine.increment_epoch()
                issued = max(due, issued + 1)

    def start(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self._running.clear()

    def close(self) -> None:
        self._closed = True
        self._running.set()
        self._thread.join()
