"""ObjectService GetObject over loopback vs reading the same file from local disk.

    python benchmarks/storage_bench.py [--mib 256] [--runs 5]

Stores one object in a built-in store served by a real grpc.aio server on
127.0.0.1, then in the same run times (medians, min-max):
  - GetObject through AnvilClient (streamed 1 MiB chunks, verified by sha256);
  - reading the stored file from disk and hashing it (what a local fetch costs);
  - reading it from disk without hashing (the page cache's ceiling).
Prints MiB/s and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpc import aio

from daemon.storage.anvil_client import AnvilClient
from daemon.storage.local_store import LocalStore
from daemon.storage.object_service import GRPC_OPTIONS, add_object_service
from daemon.storage.refs import parse_ref


def read_file(path: Path, *, digest: bool) -> None:
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            if digest:
                h.update(chunk)


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="anvil-storage-bench-"))
    source = root / "payload.bin"
    with source.open("wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(1 << 20))
    store = LocalStore(root / "data")
    info = store.put_file(source, bucket="bench", key="payload.bin")
    blob = store.blob_path(info.sha256 or "")
    server = aio.server(options=list(GRPC_OPTIONS))
    add_object_service(server, store)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ref = parse_ref(f"anvil://bench/payload.bin?sha256={info.sha256}")
    grpc_s, disk_hash_s, disk_raw_s = [], [], []
    async with AnvilClient.connect(f"127.0.0.1:{port}") as client:
        for _ in range(args.runs):
            t0 = time.perf_counter()
            h = hashlib.sha256()
            async with client.open(ref) as reader:
                async for chunk in reader.chunks:
                    h.update(chunk)
            grpc_s.append(time.perf_counter() - t0)
            assert h.hexdigest() == info.sha256
            t0 = time.perf_counter()
            await asyncio.to_thread(read_file, blob, digest=True)
            disk_hash_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.to_thread(read_file, blob, digest=False)
            disk_raw_s.append(time.perf_counter() - t0)
    await server.stop(None)

    def rate(samples: list[float]) -> str:
        med = args.mib / statistics.median(samples)
        return f"{med:8.0f} MiB/s [{args.mib / max(samples):.0f}-{args.mib / min(samples):.0f}]"

    grpc_med = statistics.median(grpc_s)
    print(f"{args.mib} MiB object, {args.runs} runs each, medians [min-max]:")
    print(f"  GetObject over loopback (+sha256)  {rate(grpc_s)}")
    print(f"  local disk read + sha256           {rate(disk_hash_s)}")
    print(f"  local disk read, no hashing        {rate(disk_raw_s)}")
    print(
        f"ratio GetObject / disk+sha256: {statistics.median(disk_hash_s) / grpc_med:.2f}; "
        f"GetObject / raw read: {statistics.median(disk_raw_s) / grpc_med:.3f}"
    )
    for path in (source, blob):
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
