"""Is a module something a WASM worker will run: a WASI preview 1 command that
imports nothing else? Checked by every worker before a run, and by the daemon
before a deployment is accepted or made ready, so a module that cannot run is
refused with its reason instead of failing every job sent to it."""

from __future__ import annotations

import functools
from pathlib import Path

from wasmtime import Engine, FuncType, InstancePre, Linker, Module, WasmtimeError

from daemon.exceptions import InvalidModule
from daemon.executors.wasm.module_cache import compile_module, read_module, wasmtime_reason


def command_pre(linker: Linker, module: Module) -> InstancePre:
    """The module, linked against WASI and ready to instantiate.

    Raises InvalidModule: no `_start() -> ()` export (not a command), or an
    import the linker does not define (only WASI preview 1 is granted).
    """
    start = next((e.type for e in module.exports if e.name == "_start"), None)
    if not isinstance(start, FuncType) or start.params or start.results:
        raise InvalidModule("no `_start` function exported: not a WASI command")
    try:
        return linker.instantiate_pre(module)
    except WasmtimeError as exc:
        reason = wasmtime_reason(str(exc))
        raise InvalidModule(f"{reason} (only WASI preview 1 imports are granted)") from None


@functools.cache
def _linker() -> Linker:
    linker = Linker(Engine())
    linker.define_wasi()
    return linker


def check_module_file(path: Path, digest: str, *, max_bytes: int = 64 << 20) -> None:
    """Raise InvalidModule (not a runnable WASI command, too large) or DigestMismatch
    unless the file is one. Compiles the module: blocking, call from a thread."""
    linker = _linker()
    command_pre(linker, compile_module(linker.engine, read_module(path, digest, max_bytes)))
