"""kill -9 in the middle of a download leaves no partial object anywhere.

A real downloader process (the cache, or the `get` command) streams from a
real ObjectService paced to take seconds; once it is seen holding a partly
written file, it is SIGKILLed, and the destination must hold nothing at all.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc import aio

from daemon.pb.anvil import object_pb2, object_pb2_grpc
from daemon.storage.anvil_client import AnvilClient
from daemon.storage.cache import DiskCache
from daemon.storage.fetcher import Fetcher
from daemon.storage.local_store import LocalStore
from daemon.storage.object_service import GRPC_OPTIONS, Context, ObjectServiceServicer
from tests.eventually import eventually

MiB = 1 << 20

CACHE_FILL = """
import asyncio, sys
from pathlib import Path
from daemon.storage.anvil_client import AnvilClient
from daemon.storage.cache import DiskCache
from daemon.storage.fetcher import Fetcher

async def main(target: str, root: str, ref: str) -> None:
    with DiskCache(Path(root), max_bytes=1 << 30) as cache:
        async with AnvilClient.connect(target) as client:
            async with Fetcher(cache, anvil=client).open(ref):
                pass

asyncio.run(main(*sys.argv[1:]))
"""

# The CLI with the objects subcommands registered (daemon.cli is not ours to edit).
CLI = """
import sys
import daemon.cli
daemon.cli.COMMAND_MODULES = ("daemon.commands.objects",)
sys.exit(daemon.cli.main(sys.argv[1:]))
"""


class PacedServicer(ObjectServiceServicer):
    """The real servicer, sending one chunk every 20 ms so a download takes seconds."""

    async def GetObject(  # noqa: N802 - gRPC method name
        self, request: object_pb2.GetObjectRequest, context: Context
    ) -> AsyncIterator[object_pb2.GetObjectResponse]:
        async for response in super().GetObject(request, context):
            yield response
            await asyncio.sleep(0.02)


@pytest.fixture
async def paced_peer(tmp_path: Path) -> AsyncIterator[tuple[str, LocalStore]]:
    store = LocalStore(tmp_path / "data")
    server = aio.server(options=GRPC_OPTIONS)
    object_pb2_grpc.add_ObjectServiceServicer_to_server(PacedServicer(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", store
    finally:
        await server.stop(None)


def partial_file_size(pid: int, directory: Path) -> int:
    """Bytes in the largest file under `directory` that `pid` holds open (0 if none)."""
    largest = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(f"{directory}/"):
                largest = max(largest, fd.stat().st_size)
        except FileNotFoundError:
            continue
    return largest


async def kill_mid_download(argv: list[str], directory: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stderr=asyncio.subprocess.PIPE
    )
    try:

        def ended_or_partly_written() -> bool:
            return (
                process.returncode is not None
                or partial_file_size(process.pid, directory) >= 4 * MiB
            )

        await eventually(ended_or_partly_written, timeout=15)
        assert process.returncode is None, "the download ended before it could be killed"
        assert partial_file_size(process.pid, directory) >= 4 * MiB
        process.kill()
    finally:
        if process.returncode is None:
            process.kill()
        await process.communicate()


async def test_kill_during_a_cache_fill_leaves_nothing(
    paced_peer: tuple[str, LocalStore], tmp_path: Path
) -> None:
    target, store = paced_peer
    info = store.put_bytes(os.urandom(32 * MiB), bucket="b", key="k")
    ref = f"anvil://b/k?sha256={info.sha256}"
    root = tmp_path / "cache"

    await kill_mid_download(["-c", CACHE_FILL, target, str(root), ref], root / "objects")

    assert os.listdir(root / "objects") == []
    with DiskCache(root, max_bytes=1 << 30) as cache:
        assert (cache.used_bytes, info.sha256 in cache) == (0, False)
        async with (
            AnvilClient.connect(target) as client,
            Fetcher(cache, anvil=client).open(ref) as obj,
        ):
            assert obj.size == 32 * MiB


async def test_kill_during_cli_get_leaves_no_output_file(
    paced_peer: tuple[str, LocalStore], tmp_path: Path
) -> None:
    target, store = paced_peer
    store.put_bytes(os.urandom(32 * MiB), bucket="b", key="k")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["-c", CLI, "get", "anvil://b/k", "--endpoint", target, "-o", str(out / "k.bin")]

    await kill_mid_download(argv, out)

    assert os.listdir(out) == []
