"""Fabric control flow: which peer is read from or written to, and what errors surface.

The other peers are stand-ins (this is the routing logic, not the transport;
tests/e2e/test_fabric.py runs the real thing across daemon processes).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.exceptions import ObjectNotFound, Unavailable
from daemon.storage.fabric import Fabric, Owner
from daemon.storage.local_store import LocalStore
from daemon.storage.refs import parse_ref
from daemon.storage.source import ObjectInfo, ObjectReader

ME = uuid.UUID(int=1)


class StandInPeer:
    def __init__(self, *, chunks: list[bytes | Exception] | None = None, down: bool = False):
        self.chunks = chunks
        self.down = down
        self.opened = 0
        self.stored: list[str] = []

    @contextlib.asynccontextmanager
    async def open(self, ref: object) -> AsyncIterator[ObjectReader]:
        self.opened += 1
        if self.down:
            raise Unavailable("peer down")
        if self.chunks is None:
            raise ObjectNotFound("not here")
        info = ObjectInfo(bucket="b", key="k", size=3, sha256=None)

        async def stream() -> AsyncIterator[bytes]:
            for item in self.chunks or []:
                if isinstance(item, Exception):
                    raise item
                yield item

        yield ObjectReader(info=info, chunks=stream())

    async def put_file(self, path: Path, *, bucket: str, key: str) -> ObjectInfo:
        if self.down:
            raise Unavailable("peer down")
        self.stored.append(key)
        return ObjectInfo(bucket=bucket, key=key, size=0, sha256="0" * 64)


def fabric(tmp_path: Path, peers: dict[str, StandInPeer], order: list[Owner]) -> Fabric:
    return Fabric(
        store=LocalStore(tmp_path),
        peer_id=ME,
        owners=lambda key: order,
        connect=lambda address: peers[address],  # type: ignore[arg-type,return-value]
    )


async def test_an_error_mid_transfer_reaches_the_caller_and_no_other_peer_is_tried(
    tmp_path: Path,
) -> None:
    first = StandInPeer(chunks=[b"ab", Unavailable("peer died mid-transfer")])
    second = StandInPeer(chunks=[b"abc"])
    order = [Owner(uuid.UUID(int=2), "a"), Owner(uuid.UUID(int=3), "b")]
    fab = fabric(tmp_path, {"a": first, "b": second}, order)
    received: list[bytes] = []

    async def read_all() -> None:
        async with fab.open(parse_ref("anvil://b/k")) as reader:
            async for chunk in reader.chunks:
                received.append(chunk)

    with pytest.raises(Unavailable, match="mid-transfer"):
        await read_all()
    assert received == [b"ab"]
    assert (first.opened, second.opened) == (1, 0)


async def test_reads_skip_a_down_owner_and_count_remote_bytes(tmp_path: Path) -> None:
    from daemon.storage.fabric import count_remote_bytes

    down, holder = StandInPeer(down=True), StandInPeer(chunks=[b"abc", b"de"])
    order = [Owner(uuid.UUID(int=2), "a"), Owner(uuid.UUID(int=3), "b")]
    fab = fabric(tmp_path, {"a": down, "b": holder}, order)
    with count_remote_bytes() as job_total, count_remote_bytes() as one_fetch:
        async with fab.open(parse_ref("anvil://b/k")) as reader:
            data = b"".join([c async for c in reader.chunks])
    assert data == b"abcde"
    assert one_fetch[0] == 5 and job_total[0] == 5, "nested counts both see the bytes"


async def test_writes_fall_back_to_the_next_owner_then_to_this_peer(tmp_path: Path) -> None:
    src = tmp_path / "out.bin"
    src.write_bytes(b"result")
    down, up = StandInPeer(down=True), StandInPeer()
    order = [Owner(uuid.UUID(int=2), "a"), Owner(uuid.UUID(int=3), "b"), Owner(ME, "me")]
    info = await fabric(tmp_path, {"a": down, "b": up}, order).put_file(src, bucket="r", key="x")
    assert up.stored == ["x"] and info.key == "x"
    both_down = {"a": StandInPeer(down=True), "b": StandInPeer(down=True)}
    fab = fabric(tmp_path / "local", both_down, order)
    info = await fab.put_file(src, bucket="r", key="y")
    assert fab.store.head("r", "y").sha256 == info.sha256


async def test_a_non_owner_asks_the_owner_before_its_own_old_copy(tmp_path: Path) -> None:
    owner = StandInPeer(chunks=[b"new"])
    order = [Owner(uuid.UUID(int=2), "a"), Owner(ME, "me")]
    fab = fabric(tmp_path, {"a": owner}, order)
    fab.store.put_bytes(b"old", bucket="b", key="k")  # left from an earlier membership
    async with fab.open(parse_ref("anvil://b/k")) as reader:
        assert b"".join([c async for c in reader.chunks]) == b"new"
    gone = fabric(tmp_path, {"a": StandInPeer()}, order)  # the owner has no copy
    async with gone.open(parse_ref("anvil://b/k")) as reader:
        assert b"".join([c async for c in reader.chunks]) == b"old"
    mine = fabric(tmp_path, {"a": owner}, [Owner(ME, "me"), Owner(uuid.UUID(int=2), "a")])
    opened = owner.opened
    async with mine.open(parse_ref("anvil://b/k")) as reader:
        assert b"".join([c async for c in reader.chunks]) == b"old"
    assert owner.opened == opened, "the owner reads its own store without asking anyone"
