"""A 1 GiB object through the ObjectService over loopback, in constant memory.

The server, the client and the cache run in one fresh subprocess so that its
peak RSS (ru_maxrss) covers both ends of the transfer; the growth over a warm-up
round trip of 5 MiB must stay a small constant, whatever the object's size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MiB = 1 << 20

ROUND_TRIP = r"""
import asyncio, hashlib, json, os, resource, sys, time
from pathlib import Path

from grpc import aio

from daemon.storage.anvil_client import AnvilClient
from daemon.storage.cache import DiskCache
from daemon.storage.fetcher import Fetcher
from daemon.storage.local_store import LocalStore
from daemon.storage.object_service import GRPC_OPTIONS, add_object_service

MiB = 1 << 20


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_object(path: Path, size: int) -> str:
    # Streamed: 1 MiB of random bytes, stamped with its index so no two chunks
    # are alike (a reordered or repeated chunk changes the digest).
    block = bytearray(os.urandom(MiB))
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for index in range(size // MiB):
            block[:8] = index.to_bytes(8, "little")
            out.write(block)
            digest.update(block)
        tail = os.urandom(size % MiB)
        out.write(tail)
        digest.update(tail)
    return digest.hexdigest()


async def round_trip(client: AnvilClient, fetcher: Fetcher, src: Path, key: str) -> dict:
    started = time.perf_counter()
    info = await client.put_file(src, bucket="big", key=key)
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    async with fetcher.open(f"anvil://big/{key}?sha256={info.sha256}") as obj:
        get_s = time.perf_counter() - started
        return {"sha256": obj.sha256, "size": obj.size, "put_s": put_s, "get_s": get_s}


async def main(work: Path, size: int) -> None:
    store = LocalStore(work / "data")
    server = aio.server(options=GRPC_OPTIONS)
    add_object_service(server, store)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    warm, big = work / "warm", work / "big"
    write_object(warm, 5 * MiB)
    expected = write_object(big, size)
    try:
        with DiskCache(work / "cache", max_bytes=size + 64 * MiB) as cache:
            async with AnvilClient.connect(f"127.0.0.1:{port}") as client:
                fetcher = Fetcher(cache, anvil=client)
                await round_trip(client, fetcher, warm, "warm")
                baseline = peak_rss()
                result = await round_trip(client, fetcher, big, "big")
                result.update(
                    expected=expected, baseline_rss=baseline, peak_rss=peak_rss(), size=size
                )
    finally:
        await server.stop(None)
    print(json.dumps(result))


asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
"""


def run_round_trip(tmp_path: Path, size: int) -> dict[str, float]:
    try:
        done = subprocess.run(
            [sys.executable, "-c", ROUND_TRIP, str(tmp_path), str(size)],
            capture_output=True,
            text=True,
            timeout=280,
            check=False,
        )
    finally:
        # Several GiB per run: never leave them for pytest's tmp retention.
        for name in ("big", "warm"):
            (tmp_path / name).unlink(missing_ok=True)
        for path in [*tmp_path.glob("data/objects/sha256/*/*"), *tmp_path.glob("cache/objects/*")]:
            path.unlink()
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_gib_round_trip_in_constant_memory(tmp_path: Path) -> None:
    size = 1 << 30
    result = run_round_trip(tmp_path, size)
    assert result["sha256"] == result["expected"]
    assert result["size"] == size
    growth = result["peak_rss"] - result["baseline_rss"]
    throughput = 2 * size / (result["put_s"] + result["get_s"]) / MiB
    print(
        f"1 GiB round trip: put {result['put_s']:.2f} s, get {result['get_s']:.2f} s"
        f" ({throughput:.0f} MiB/s both ways), peak RSS {result['peak_rss'] / MiB:.0f} MiB,"
        f" growth over a 5 MiB warm-up {growth / MiB:.1f} MiB"
    )
    # Client, server and cache together hold a few 1 MiB chunks in flight.
    assert growth < 64 * MiB
