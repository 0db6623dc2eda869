"""pytest-benchmark suite for the WASM executor, in two groups.

    pytest benchmarks/test_wasm_benchmark.py --benchmark-enable

(The project's addopts disable benchmarks, so a plain run only smoke-tests
each case once.) "module-cache": one ~146 KB module compiled cold, loaded
from the disk cache, and hit in memory — the relative column is the ratio
(goal: disk >= 50x faster than compile). "per-job": a trivial guest run in
process (goal <= 1 ms median) and through the worker pool. The script
`wasm_bench.py` prints the same figures as ratios.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from wasm_bench import Workspace, big_module, trivial_module

from daemon.executors.result import RunEnd
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.module_cache import Level, ModuleCache, load_or_create_secret
from daemon.executors.wasm.pool import PoolSettings
from daemon.executors.wasm.sandbox import Sandbox


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("wasm-bench"))


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    cache = tmp_path_factory.mktemp("wasm-cache")
    with Sandbox(cache_dir=cache, cache_secret=load_or_create_secret(cache)) as sb:
        yield sb


@pytest.fixture(scope="module")
def big(workspace: Workspace, box: Sandbox) -> tuple[str, Path]:
    """(digest, path): the arguments of ModuleCache.get."""
    path, digest = workspace.module(big_module())
    box.cache.get(digest, path)  # the disk level holds it from here on
    return digest, path


@pytest.mark.benchmark(group="module-cache")
def test_cold_compile(benchmark: BenchmarkFixture, box: Sandbox, big: tuple[str, Path]) -> None:
    def compile_() -> Level:
        return ModuleCache(box.engine, prepare=box._prepare, disk=None).get(*big)[1]

    assert benchmark.pedantic(compile_, rounds=5, iterations=1) is Level.COMPILED


@pytest.mark.benchmark(group="module-cache")
def test_disk_cache_load(benchmark: BenchmarkFixture, box: Sandbox, big: tuple[str, Path]) -> None:
    def load() -> Level:
        return ModuleCache(box.engine, prepare=box._prepare, disk=box.cache.disk).get(*big)[1]

    assert benchmark(load) is Level.DISK


@pytest.mark.benchmark(group="module-cache")
def test_memory_cache_hit(benchmark: BenchmarkFixture, box: Sandbox, big: tuple[str, Path]) -> None:
    box.cache.get(*big)
    assert benchmark(lambda: box.cache.get(*big)[1]) is Level.MEMORY


@pytest.mark.benchmark(group="per-job")
def test_trivial_job_in_process(
    benchmark: BenchmarkFixture, box: Sandbox, workspace: Workspace
) -> None:
    path, digest = workspace.module(trivial_module())
    box.run(workspace.request(path, digest))  # warm the memory cache

    def job() -> bytes:
        return box.run(workspace.request(path, digest)).stdout

    assert benchmark(job) == b"ok\n"


@pytest.mark.benchmark(group="per-job")
def test_trivial_job_through_the_pool(benchmark: BenchmarkFixture, workspace: Workspace) -> None:
    path, digest = workspace.module(trivial_module())
    loop = asyncio.new_event_loop()
    executor = WasmExecutor(PoolSettings(workers=1))
    loop.run_until_complete(executor.start())
    try:

        def job() -> RunEnd:
            run = executor.run(path, digest=digest, output_dir=workspace.output_dir())
            return loop.run_until_complete(run).outcome

        assert job() is RunEnd.OK
        assert benchmark(job) is RunEnd.OK
    finally:
        loop.run_until_complete(executor.close())
        loop.close()
