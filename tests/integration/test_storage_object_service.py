"""anvil.ObjectService over real gRPC on loopback, served from a real local store."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from daemon.exceptions import DigestMismatch, InvalidArgument, ObjectNotFound, Unavailable
from daemon.pb.anvil import object_pb2, object_pb2_grpc
from daemon.status import ErrorInterceptor
from daemon.storage.anvil_client import AnvilClient
from daemon.storage.cache import DiskCache
from daemon.storage.fabric import FORWARDED_HEADER, Fabric, Owner
from daemon.storage.fabric_service import FabricObjectService
from daemon.storage.fetcher import Fetcher
from daemon.storage.local_store import LocalStore
from daemon.storage.object_service import (
    GRPC_OPTIONS,
    ObjectServiceServicer,
    add_object_service,
)
from daemon.storage.refs import parse_ref

MiB = 1 << 20
GET = "/anvil.ObjectService/GetObject"


class CallCounter(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts the calls the server receives, by method."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        self.calls[details.method] += 1
        return await continuation(details)


class Peer:
    def __init__(self, store: LocalStore, server: Any, port: int, counter: CallCounter) -> None:
        self.store = store
        self.server = server
        self.target = f"127.0.0.1:{port}"
        self.counter = counter


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    store = LocalStore(tmp_path / "data")
    counter = CallCounter()
    # With the daemon's own error interceptor, as daemon.server composes them.
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[counter, ErrorInterceptor()])
    add_object_service(server, store)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Peer(store, server, port, counter)
    finally:
        await server.stop(None)


@pytest.fixture
async def client(peer: Peer) -> AsyncIterator[AnvilClient]:
    async with AnvilClient.connect(peer.target, timeout=60) as client:
        yield client


@pytest.fixture
async def stub(peer: Peer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(peer.target, options=GRPC_OPTIONS) as channel:
        yield object_pb2_grpc.ObjectServiceStub(channel)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def download(client: AnvilClient, ref: str) -> bytes:
    async with client.open(parse_ref(ref)) as reader:
        return b"".join([chunk async for chunk in reader.chunks])


@pytest.mark.parametrize("size", [0, 1, 5 * MiB])
async def test_round_trip(client: AnvilClient, peer: Peer, tmp_path: Path, size: int) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    data = src.read_bytes()
    info = await client.put_file(src, bucket="b", key="obj", content_type="x/y")
    assert (info.size, info.sha256, info.etag) == (size, sha(data), sha(data))
    assert peer.store.head("b", "obj").version_id == info.version_id

    head = await client.head(parse_ref("anvil://b/obj"))
    assert (head.size, head.sha256, head.content_type) == (size, sha(data), "x/y")
    async with client.open(parse_ref("anvil://b/obj")) as reader:
        assert reader.info == head
        chunks = [chunk async for chunk in reader.chunks]
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= MiB for c in chunks)


async def test_versions_over_the_wire(client: AnvilClient) -> None:
    async def one(data: bytes) -> AsyncIterator[bytes]:
        yield data

    v1 = await client.put(one(b"first"), bucket="b", key="k")
    await client.put(one(b"second"), bucket="b", key="k")
    assert await download(client, "anvil://b/k") == b"second"
    assert await download(client, f"anvil://b/k?version={v1.version_id}") == b"first"
    with pytest.raises(ObjectNotFound):
        await client.head(parse_ref("anvil://b/k?version=missing"))


async def test_not_found(stub: Any, client: AnvilClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await stub.HeadObject(object_pb2.HeadObjectRequest(bucket_name="b", object_key="nope"))
    assert raw.value.code() == grpc.StatusCode.NOT_FOUND
    call = stub.GetObject(object_pb2.GetObjectRequest(bucket_name="b", object_key="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await anext(aiter(call))
    assert raw.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ObjectNotFound, match="no object b/nope"):
        await download(client, "anvil://b/nope")


async def put_raw(stub: Any, *requests: object_pb2.PutObjectRequest) -> Any:
    async def stream() -> AsyncIterator[object_pb2.PutObjectRequest]:
        for request in requests:
            yield request

    return await stub.PutObject(stream())


def meta(**fields: str) -> object_pb2.PutObjectRequest:
    return object_pb2.PutObjectRequest(metadata=object_pb2.ObjectMetadata(**fields))


def chunk(data: bytes) -> object_pb2.PutObjectRequest:
    return object_pb2.PutObjectRequest(chunk=data)


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ((chunk(b"data"), meta(bucket_name="b", object_key="k")), "first message"),
        ((), "first message"),
        ((meta(bucket_name="", object_key="k"), chunk(b"x")), "bucket name is empty"),
        ((meta(bucket_name="b", object_key=""),), "object key is empty"),
        ((meta(bucket_name="b/c", object_key="k"),), "bad bucket name"),
        ((meta(bucket_name="b", object_key="k"), meta(bucket_name="b", object_key="k")), "once"),
        ((meta(bucket_name="b", object_key="k", sha256="beef"),), "64 hex digits"),
    ],
)
async def test_put_rejects_malformed_streams(
    stub: Any, peer: Peer, requests: tuple[object_pb2.PutObjectRequest, ...], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await put_raw(stub, *requests)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raw.value.details()
    with pytest.raises(ObjectNotFound):
        peer.store.head("b", "k")


async def test_put_with_a_wrong_digest_is_data_loss(stub: Any, peer: Peer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await put_raw(stub, meta(bucket_name="b", object_key="k", sha256="0" * 64), chunk(b"x"))
    assert raw.value.code() == grpc.StatusCode.DATA_LOSS
    with pytest.raises(ObjectNotFound):
        peer.store.head("b", "k")
    blobs = [p for p in (peer.store.root / "sha256").rglob("*") if p.is_file()]
    assert blobs == []


async def test_client_translates_invalid_argument(client: AnvilClient) -> None:
    async def nothing() -> AsyncIterator[bytes]:
        return
        yield b""

    with pytest.raises(InvalidArgument, match="bucket name is empty"):
        await client.put(nothing(), bucket="", key="k")


async def test_a_flipped_bit_is_data_loss_and_never_served_whole(
    client: AnvilClient, peer: Peer, stub: Any
) -> None:
    data = os.urandom(4 * MiB)
    info = peer.store.put_bytes(data, bucket="b", key="k")
    blob = peer.store.blob_path(info.sha256 or "")
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(MiB + 17)
        f.write(bytes([data[MiB + 17] ^ 0x40]))

    call = stub.GetObject(object_pb2.GetObjectRequest(bucket_name="b", object_key="k"))
    received: list[bytes] = []

    async def drain() -> None:
        async for response in call:
            received.append(response.chunk)

    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await drain()
    assert raw.value.code() == grpc.StatusCode.DATA_LOSS
    assert "content has sha256" in raw.value.details()
    assert 0 < sum(map(len, received)) < len(data)  # streamed, but never the whole object

    with pytest.raises(DigestMismatch):
        await download(client, "anvil://b/k")
    with DiskCache(peer.store.root.parent / "cache", max_bytes=64 * MiB) as cache:
        with pytest.raises(DigestMismatch):
            async with Fetcher(cache, anvil=client).open("anvil://b/k"):
                pass
        assert cache.used_bytes == 0
        assert os.listdir(cache.root / "objects") == []


async def test_a_wrong_digest_in_the_ref_is_reported_and_nothing_cached(
    client: AnvilClient, peer: Peer, tmp_path: Path
) -> None:
    peer.store.put_bytes(b"the real bytes", bucket="b", key="k")
    with DiskCache(tmp_path / "cache", max_bytes=MiB) as cache:
        with pytest.raises(DigestMismatch, match="expected " + "e" * 64):
            async with Fetcher(cache, anvil=client).open("anvil://b/k?sha256=" + "e" * 64):
                pass
        assert os.listdir(cache.root / "objects") == []


async def test_an_interrupted_upload_stores_nothing(client: AnvilClient, peer: Peer) -> None:
    async def dies_midway() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield os.urandom(MiB)
        await asyncio.sleep(0.1)
        raise OSError("source file vanished")

    with pytest.raises(OSError, match="vanished"):
        await client.put(dies_midway(), bucket="b", key="k")
    await peer.server.stop(None)  # returns once its last call handler has ended
    with pytest.raises(ObjectNotFound):
        peer.store.head("b", "k")
    assert [p for p in peer.store.root.rglob("*") if p.is_file() and "sha256" in p.parts] == []


async def test_twenty_concurrent_fetches_of_100_mib_make_one_transfer(
    client: AnvilClient, peer: Peer, tmp_path: Path
) -> None:
    src = tmp_path / "big"
    with src.open("wb") as f:
        for _ in range(100):
            f.write(os.urandom(MiB))
    info = peer.store.put_file(src, bucket="b", key="big")
    src.unlink()
    with DiskCache(tmp_path / "cache", max_bytes=256 * MiB) as cache:
        fetcher = Fetcher(cache, anvil=client)

        async def fetch(ref: str) -> tuple[Path, str]:
            async with fetcher.open(ref) as obj:
                return obj.path, obj.sha256

        refs = ["anvil://b/big", f"anvil://b/big?sha256={info.sha256}"] * 10
        results = await asyncio.gather(*(fetch(ref) for ref in refs))
        assert peer.counter.calls[GET] == 1
        assert {sha for _, sha in results} == {info.sha256}
        [(path, _)] = set(results)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
        # Served from the cache from now on, even for a ref without a digest.
        await fetch("anvil://b/big")
        assert peer.counter.calls[GET] == 1


async def test_unreachable_peer_is_unavailable() -> None:
    async with AnvilClient.connect("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(Unavailable):
            await client.head(parse_ref("anvil://b/k"))


@contextlib.asynccontextmanager
async def serving(servicer: object_pb2_grpc.ObjectServiceServicer) -> AsyncIterator[str]:
    """An ObjectService on loopback behind the daemon's error interceptor; yields its address."""
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[ErrorInterceptor()])
    object_pb2_grpc.add_ObjectServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def put_over_grpc(address: str, key: str, data: bytes) -> Any:
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = object_pb2_grpc.ObjectServiceStub(channel)
        pieces = [chunk(data[i : i + MiB]) for i in range(0, len(data), MiB)]
        return await put_raw(stub, meta(bucket_name="b", object_key=key), *pieces)


async def test_a_put_past_max_store_bytes_is_resource_exhausted(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "data", max_bytes=3 * MiB)
    async with serving(ObjectServiceServicer(store)) as address:
        await put_over_grpc(address, "first", os.urandom(2 * MiB))
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await put_over_grpc(address, "second", os.urandom(2 * MiB))
        assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_store_bytes" in (raw.value.details() or "")
        with pytest.raises(ObjectNotFound):
            store.head("b", "second")
        assert (store.used_bytes, store.reserved_bytes) == (2 * MiB, 0)
        # The refusal cost nothing: what still fits is taken.
        await put_over_grpc(address, "second", os.urandom(MiB))
    assert store.used_bytes == 3 * MiB


async def test_a_put_forwarded_to_a_full_owner_is_resource_exhausted(tmp_path: Path) -> None:
    front_id, owner_id = uuid.UUID(int=1), uuid.UUID(int=2)
    addresses: dict[uuid.UUID, str] = {}

    def owners(key: str) -> list[Owner]:
        return [Owner(owner_id, addresses[owner_id]), Owner(front_id, addresses[front_id])]

    def connect(address: str) -> AnvilClient:
        return AnvilClient.connect(address, metadata=lambda: [(FORWARDED_HEADER, "1")])

    owner_store = LocalStore(tmp_path / "owner", max_bytes=MiB)
    front_store = LocalStore(tmp_path / "front")
    owner = Fabric(store=owner_store, peer_id=owner_id, owners=owners, connect=connect)
    front = Fabric(store=front_store, peer_id=front_id, owners=owners, connect=connect)

    async def no_jobs(job_id: uuid.UUID) -> str | None:
        return None

    # No auth on these servers (no claims): every caller may read and write.
    async with (
        serving(FabricObjectService(owner, owner_of=no_jobs)) as addresses[owner_id],
        serving(FabricObjectService(front, owner_of=no_jobs)) as addresses[front_id],
    ):
        await put_over_grpc(addresses[front_id], "small", b"fits")
        assert owner_store.head("b", "small").size == 4  # forwarded to the owner
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await put_over_grpc(addresses[front_id], "big", os.urandom(2 * MiB))
        await front.close()
        await owner.close()
    assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_store_bytes" in (raw.value.details() or "")
    for store in (owner_store, front_store):
        with pytest.raises(ObjectNotFound):
            store.head("b", "big")
    assert owner_store.used_bytes == 4
