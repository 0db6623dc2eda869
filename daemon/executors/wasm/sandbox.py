"""One guest run inside wasmtime, in the calling process: linker, limits, capture, verdict.

A `Sandbox` owns the process's only Engine (see `engine`), the WASI-only
Linker, the module cache and the epoch ticker. `run` is synchronous and must
be called from one thread; the worker process calls it, and the pool around
it adds the hard wall-clock kill that epochs cannot give (a guest blocked in
`poll_oneoff` or a stdin read never reaches an epoch check).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

from wasmtime import (
    ExitTrap,
    Func,
    Instance,
    InstancePre,
    Linker,
    Memory,
    Module,
    Store,
    Trap,
    TrapCode,
    WasiConfig,
    WasmtimeError,
)

from daemon.exceptions import InvalidArgument, InvalidModule
from daemon.executors import result as results
from daemon.executors.result import ExecutionResult, RunEnd
from daemon.executors.wasm.engine import EngineSettings, EpochTicker, engine_key, make_engine
from daemon.executors.wasm.limits import Limits, epoch_ticks, memory_exhausted
from daemon.executors.wasm.module_cache import (
    DiskModuleCache,
    Level,
    LoadedModule,
    ModuleCache,
    wasmtime_reason,
)
from daemon.executors.wasm.validate import command_pre

GUEST_INPUT_DIR = "/input"
GUEST_OUTPUT_DIR = "/output"


class CappedSink:
    """A guest's stdout or stderr: kept up to `cap` bytes; the first write past it
    fails, marks the sink and calls `on_overflow` (which ends the guest)."""

    def __init__(self, cap: int, on_overflow: Callable[[], None]) -> None:
        self.cap = cap
        self.data = bytearray()
        self.overflowed = False
        self._on_overflow = on_overflow

    def __call__(self, chunk: bytes) -> int:
        if self.overflowed:
            return -errno.EFBIG
        if len(self.data) + len(chunk) > self.cap:
            self.overflowed = True
            self._on_overflow()
            return -errno.EFBIG
        self.data += chunk
        return len(chunk)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunRequest:
    """One run, as the sandbox sees it: everything already on local disk."""

    digest: str  # sha256 hex of the module bytes
    module_path: Path  # read only when no cache level has the module
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    stdin_path: Path | None  # None: empty stdin
    input_dir: Path  # preopened read-only at /input
    output_dir: Path  # preopened writable at /output
    limits: Limits


class Sandbox:
    """The in-process runner. Use from one thread; `close()` when done."""

    def __init__(
        self,
        settings: EngineSettings | None = None,
        *,
        cache_dir: Path | None = None,
        cache_secret: bytes | None = None,
        memory_cache_entries: int = 64,
        memory_cache_bytes: int = 512 << 20,
        max_module_bytes: int = 64 << 20,
    ) -> None:
        self.settings = settings or EngineSettings()
        self.engine = make_engine(self.settings)
        self.linker = Linker(self.engine)
        self.linker.define_wasi()  # the only imports a guest is granted
        disk = None
        if cache_dir is not None:
            if cache_secret is None:
                raise ValueError("a disk cache needs its secret")
            disk = DiskModuleCache(
                cache_dir, secret=cache_secret, engine_key=engine_key(self.settings)
            )
        self.cache = ModuleCache(
            self.engine,
            prepare=self._prepare,
            disk=disk,
            max_entries=memory_cache_entries,
            max_bytes=memory_cache_bytes,
            max_module_bytes=max_module_bytes,
        )
        self._ticker = EpochTicker(self.engine, self.settings.epoch_tick_s)
        self._deadline_ticks = 0  # the running guest's epoch deadline, in ticks from its start

    def interrupt(self) -> None:
        """End the running guest at its next epoch check. Safe from any thread (it only
        moves the engine's epoch past the deadline); harmless between runs, whose
        deadlines count from their own start."""
        for _ in range(self._deadline_ticks + 1):
            self.engine.increment_epoch()

    def close(self) -> None:
        self._ticker.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(self, module: Module) -> InstancePre:
        return command_pre(self.linker, module)

    def run(
        self, request: RunRequest, *, on_started: Callable[[Level], None] | None = None
    ) -> ExecutionResult:
        """Load (cache → disk → compile) and run one guest under `request.limits`.

        `on_started(level)` is called once the module is ready (`level`: where the
        cache found it), before the guest starts (the wall-clock deadline counts
        from there). Guest failures come back as results; raises DigestMismatch
        or InvalidArgument for a bad request.
        """
        try:
            loaded, level = self.cache.get(request.digest, request.module_path)
        except InvalidModule as exc:
            return results.invalid_module(str(exc))
        if on_started is not None:
            on_started(level)
        return self._execute(loaded, request)

    def _execute(self, loaded: LoadedModule, request: RunRequest) -> ExecutionResult:
        limits = request.limits
        ticks = epoch_ticks(limits.timeout_s, self.settings.epoch_tick_s)
        self._deadline_ticks = ticks
        # Never touch the store from inside a host call: end the guest by its epoch.
        stdout = CappedSink(limits.stdout_bytes, self.interrupt)
        stderr = CappedSink(limits.stderr_bytes, self.interrupt)
        wasi = WasiConfig()
        wasi.argv = list(request.argv)
        wasi.env = list(request.env)
        wasi.stdout_custom = stdout
        wasi.stderr_custom = stderr
        try:
            if request.stdin_path is not None:
                wasi.stdin_file = str(request.stdin_path)
            wasi.preopen_dir(str(request.input_dir), GUEST_INPUT_DIR, fs_mutable=False)
            wasi.preopen_dir(str(request.output_dir), GUEST_OUTPUT_DIR, fs_mutable=True)
        except WasmtimeError as exc:
            raise InvalidArgument(f"cannot set up the guest's files: {exc}") from None

        store = Store(self.engine)
        try:
            store.set_limits(
                memory_size=limits.memory_bytes,
                table_elements=limits.table_elements,
                instances=limits.instances,
                tables=limits.tables,
                memories=1,
            )
            store.set_fuel(limits.fuel)
            store.set_epoch_deadline(ticks)
            store.set_wasi(wasi)
            instance: Instance | None = None
            interrupted = False
            started = time.perf_counter()
            self._ticker.start()
            try:
                instance = loaded.pre.instantiate(store)
                start = cast(Func, instance.exports(store)["_start"])  # checked by _prepare
                start(store)
                result = results.ok()
            except ExitTrap as exc:
                result = results.ok() if exc.code == 0 else results.nonzero_exit(exc.code)
            except Trap as exc:
                interrupted = exc.trap_code is TrapCode.INTERRUPT
                result = classify_trap(exc.trap_code, wasmtime_reason(exc.message), limits)
            except WasmtimeError as exc:
                result = classify_error(wasmtime_reason(str(exc)), limits, instance is None)
            finally:
                self._ticker.stop()
            duration = time.perf_counter() - started
            # After an epoch interrupt wasmtime reports the fuel as untouched: unknown.
            fuel_consumed = None if interrupted else limits.fuel - store.get_fuel()
            if stdout.overflowed:
                result = results.stream_too_large("stdout", limits.stdout_bytes)
            elif stderr.overflowed:
                result = results.stream_too_large("stderr", limits.stderr_bytes)
            elif result.outcome in _MAYBE_OUT_OF_MEMORY:
                result = blame_memory(result, _memory_size(store, instance), limits.memory_bytes)
            return result.with_capture(
                stdout=bytes(stdout.data),
                stderr=bytes(stderr.data),
                duration_s=duration,
                fuel_consumed=fuel_consumed,
            )
        finally:
            store.close()


# A guest out of memory fails in one of these ways after its refused `memory.grow`
# (malloc returns NULL → abort, exit(1), or a loop that never gets anywhere).
_MAYBE_OUT_OF_MEMORY = frozenset(
    {RunEnd.TRAPPED, RunEnd.NONZERO_EXIT, RunEnd.OUT_OF_FUEL, RunEnd.TIMED_OUT}
)


def classify_trap(code: TrapCode | None, reason: str, limits: Limits) -> ExecutionResult:
    """The typed result for a wasm trap."""
    if code is TrapCode.OUT_OF_FUEL:
        return results.out_of_fuel(limits.fuel)
    if code is TrapCode.INTERRUPT:
        return results.timed_out(limits.timeout_s, killed=False)
    return results.trapped(code.name.lower() if code is not None else None, reason)


def classify_error(reason: str, limits: Limits, at_instantiation: bool) -> ExecutionResult:
    """The typed result for a wasmtime error that is not a trap (limits, host errors)."""
    if "exceeds memory limits" in reason:
        return results.memory_limit(limits.memory_bytes, reason)
    if at_instantiation:
        return results.invalid_module(f"cannot instantiate under the run's limits: {reason}")
    return results.trapped(None, reason)


def blame_memory(result: ExecutionResult, memory_bytes: int, limit: int) -> ExecutionResult:
    """MEMORY_LIMIT instead of `result` when the guest failed with its memory at the limit;
    a failure with its memory past half the limit keeps its outcome and says so."""
    used = f"{memory_bytes / (1 << 20):.3g} MiB"
    if memory_exhausted(memory_bytes, limit):
        return results.memory_limit(limit, f"its memory was at {used}, then: {result.message}")
    if memory_bytes * 2 >= limit:
        hint = f" (its memory was at {used} of its {results.size_text(limit)} limit)"
        return replace(result, message=result.message + hint)
    return result


def _memory_size(store: Store, instance: Instance | None) -> int:
    if instance is None:
        return 0
    sizes = [m.data_len(store) for m in instance.exports(store).values() if isinstance(m, Memory)]
    return max(sizes, default=0)
