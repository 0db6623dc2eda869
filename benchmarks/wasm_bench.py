"""Print the WASM executor's costs as ratios measured in one run.

    python benchmarks/wasm_bench.py            # full run (a few seconds)
    python benchmarks/wasm_bench.py --quick    # fewer repeats, for a smoke run

1. Module cache levels for one ≥100 KB module (generated WAT, ~1500
   functions): cold compile vs disk-cache load (read + HMAC check +
   deserialize) vs memory-cache hit. Each is `ModuleCache.get` on the real
   engine (fuel + epochs on), with `InstancePre` made on every miss.
   Goal: disk ≥ 50x faster than compile.
2. Per-job overhead of a trivial guest (prints "ok"): in process
   (`Sandbox.run`, memory-cache hit; goal ≤ 1 ms median), and end to end
   through the worker pool (`WasmExecutor.run`: digest, staging, pipe round
   trip, output collection). Beside it, the cost of starting a process
   (`/bin/true`), a floor for any container run; `podman run` itself when
   ANVIL_BENCH_PODMAN_IMAGE names a local image (goal: WASM ≥ 100x faster).

Figures are medians with [min-max] over the repeats; ratios divide medians.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from daemon.executors.result import RunEnd
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.limits import Limits
from daemon.executors.wasm.module_cache import Level, ModuleCache, load_or_create_secret
from daemon.executors.wasm.pool import PoolSettings
from daemon.executors.wasm.sandbox import RunRequest, Sandbox


def big_module(functions: int = 1500) -> bytes:
    """A valid WASI command of ~100 bytes of code per function (1500 → ~146 KB)."""
    body = []
    for i in range(functions):
        body.append(
            f"""(func $f{i} (param $x i32) (result i32) (local $i i32) (local $acc i32)
              (local.set $acc (local.get $x))
              (block $done (loop $l
                (br_if $done (i32.ge_u (local.get $i) (i32.const {i % 97 + 3})))
                (local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const {2 * i + 1}))
                                         (i32.xor (local.get $i) (i32.const {i}))))
                (if (i32.and (local.get $acc) (i32.const 1))
                  (then (local.set $acc (i32.rotl (local.get $acc) (i32.const {i % 31 + 1})))))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br $l)))
              (local.get $acc))"""
        )
    calls = "".join(f"(drop (call $f{i} (i32.const {i})))" for i in range(0, functions, 50))
    wat = f'(module (memory (export "memory") 1) {"".join(body)} (func (export "_start") {calls}))'
    return bytes(wasmtime.wat2wasm(wat))


def trivial_module() -> bytes:
    """Writes "ok\\n" to stdout and returns."""
    return bytes(
        wasmtime.wat2wasm(
            """(module
              (import "wasi_snapshot_preview1" "fd_write"
                (func $fd_write (param i32 i32 i32 i32) (result i32)))
              (memory (export "memory") 1)
              (data (i32.const 16) "ok\\n")
              (func (export "_start")
                (i32.store (i32.const 0) (i32.const 16))
                (i32.store (i32.const 4) (i32.const 3))
                (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""
        )
    )


@dataclass(frozen=True)
class Stats:
    median: float
    low: float
    high: float

    def text(self) -> str:
        scale, unit = (1e3, "ms") if self.median >= 1e-3 else (1e6, "us")
        return f"{self.median * scale:8.3f} {unit} [{self.low * scale:.3f}-{self.high * scale:.3f}]"


def measure(fn: Callable[[], object], repeat: int) -> Stats:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Stats(statistics.median(times), min(times), max(times))


async def measure_async(fn: Callable[[], object], repeat: int) -> Stats:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()  # type: ignore[misc]
        times.append(time.perf_counter() - start)
    return Stats(statistics.median(times), min(times), max(times))


class Workspace:
    """A temp folder with modules stored by digest and fresh output folders on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._n = 0
        (root / "in").mkdir()

    def module(self, wasm: bytes) -> tuple[Path, str]:
        digest = hashlib.sha256(wasm).hexdigest()
        path = self.root / f"{digest}.wasm"
        path.write_bytes(wasm)
        return path, digest

    def output_dir(self) -> Path:
        self._n += 1
        path = self.root / f"out-{self._n}"
        path.mkdir()
        return path

    def request(self, path: Path, digest: str) -> RunRequest:
        return RunRequest(
            digest=digest,
            module_path=path,
            argv=("guest",),
            env=(),
            stdin_path=None,
            input_dir=self.root / "in",
            output_dir=self.output_dir(),
            limits=Limits(),
        )


def cache_levels(ws: Workspace, box: Sandbox, repeat: int) -> dict[Level, Stats]:
    path, digest = ws.module(big_module())

    def fresh(disk: bool) -> ModuleCache:
        return ModuleCache(box.engine, prepare=box._prepare, disk=box.cache.disk if disk else None)

    def cold() -> None:
        assert fresh(disk=False).get(digest, path)[1] is Level.COMPILED

    def from_disk() -> None:
        assert fresh(disk=True).get(digest, path)[1] is Level.DISK

    box.cache.get(digest, path)  # writes the disk file
    warm = fresh(disk=False)
    warm.get(digest, path)

    def from_memory() -> None:
        assert warm.get(digest, path)[1] is Level.MEMORY

    return {
        Level.COMPILED: measure(cold, max(3, repeat // 10)),
        Level.DISK: measure(from_disk, repeat),
        Level.MEMORY: measure(from_memory, repeat * 10),
    }


def in_process_job(ws: Workspace, box: Sandbox, repeat: int) -> Stats:
    path, digest = ws.module(trivial_module())
    requests = [ws.request(path, digest) for _ in range(repeat + 1)]
    assert box.run(requests.pop()).stdout == b"ok\n"  # warm: memory-cache hit from here on
    return measure(lambda: box.run(requests.pop()), repeat)


async def pool_job(ws: Workspace, repeat: int) -> Stats:
    path, digest = ws.module(trivial_module())
    async with WasmExecutor(PoolSettings(workers=1)) as ex:

        async def once() -> None:
            result = await ex.run(path, digest=digest, output_dir=ws.output_dir())
            assert result.outcome is RunEnd.OK

        await once()
        return await measure_async(once, repeat)


def process_start(repeat: int) -> Stats:
    true = shutil.which("true") or "/bin/true"
    return measure(lambda: subprocess.run([true], check=True), repeat)


def podman_run(repeat: int) -> Stats | None:
    image = os.environ.get("ANVIL_BENCH_PODMAN_IMAGE")
    podman = shutil.which("podman")
    if not image or not podman:
        return None
    cmd = [podman, "run", "--rm", "--network=none", image, "true"]
    return measure(lambda: subprocess.run(cmd, check=True, capture_output=True), repeat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    repeat = 30 if args.quick else 200

    with tempfile.TemporaryDirectory(prefix="wasm-bench-") as tmp:
        ws = Workspace(Path(tmp))
        cache = Path(tmp) / "cache"
        with Sandbox(cache_dir=cache, cache_secret=load_or_create_secret(cache)) as box:
            size = len(big_module())
            levels = cache_levels(ws, box, repeat)
            job = in_process_job(ws, box, repeat * 5)
        pooled = asyncio.run(pool_job(ws, repeat))
    spawn = process_start(max(10, repeat // 4))
    podman = podman_run(5)

    compile_, disk, memory = levels[Level.COMPILED], levels[Level.DISK], levels[Level.MEMORY]
    print(f"module cache, {size / 1024:.0f} KB module (wasmtime {wasmtime_version()}):")
    print(f"  cold compile      {compile_.text()}")
    print(f"  disk-cache load   {disk.text()}")
    print(f"  memory-cache hit  {memory.text()}")
    print(f"  compile / disk    {compile_.median / disk.median:8.0f}x   (goal >= 50x)")
    print(f"  disk / memory     {disk.median / memory.median:8.0f}x")
    print("per job, trivial guest:")
    print(f"  in process (memory hit + run)  {job.text()}   (goal <= 1 ms)")
    print(f"  through the worker pool        {pooled.text()}")
    print(f"  process start (/bin/true)      {spawn.text()}")
    print(f"  pool job / in process          {pooled.median / job.median:8.1f}x")
    print(f"  process start / pool job       {spawn.median / pooled.median:8.1f}x")
    if podman is None:
        print("  podman run: not measured (set ANVIL_BENCH_PODMAN_IMAGE to a local image)")
    else:
        print(f"  podman run                     {podman.text()}")
        print(
            f"  podman run / pool job          {podman.median / pooled.median:8.0f}x (goal >= 100x)"
        )
    return 0


def wasmtime_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


if __name__ == "__main__":
    sys.exit(main())
