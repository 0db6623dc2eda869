"""The S3 backend against a real S3-protocol server on loopback (moto's server mode)."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from daemon.exceptions import DigestMismatch, ObjectNotFound, Unavailable
from daemon.storage.cache import DiskCache
from daemon.storage.fetcher import Fetcher
from daemon.storage.refs import parse_ref
from daemon.storage.s3_client import S3Client, S3Config

MiB = 1 << 20
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    name = f"t-{abs(hash(request.node.name)) % 10**12}"
    raw_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(s3_endpoint: str) -> Iterator[S3Client]:
    client = S3Client(S3Config(endpoint_url=s3_endpoint, **CREDENTIALS))
    yield client
    client.close()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[DiskCache]:
    with DiskCache(tmp_path / "cache", max_bytes=64 * MiB) as cache:
        yield cache


def raw_client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 20 * MiB + 3])  # 20 MiB: a multipart upload
async def test_put_then_fetch_through_the_cache(
    s3: S3Client, cache: DiskCache, bucket: str, tmp_path: Path, size: int
) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    info = await s3.put_file(src, bucket=bucket, key="dir/obj", content_type="x/y")
    assert (info.size, info.sha256, info.content_type) == (size, sha(src.read_bytes()), "x/y")
    async with Fetcher(cache, s3=s3).open(f"s3://{bucket}/dir/obj") as obj:
        assert obj.path.read_bytes() == src.read_bytes()
        assert obj.sha256 == info.sha256


async def test_a_cached_digest_ref_needs_no_request(
    s3: S3Client, s3_endpoint: str, cache: DiskCache, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"pinned content")
    info = await s3.put_file(src, bucket=bucket, key="k")
    ref = f"s3://{bucket}/k?sha256={info.sha256}"
    fetcher = Fetcher(cache, s3=s3)
    async with fetcher.open(ref):
        pass
    raw_client(s3_endpoint).delete_object(Bucket=bucket, Key="k")
    async with fetcher.open(ref) as obj:
        assert obj.path.read_bytes() == b"pinned content"
    with pytest.raises(ObjectNotFound):
        async with fetcher.open(f"s3://{bucket}/k"):
            pass


async def test_objects_written_by_other_tools(
    s3: S3Client, s3_endpoint: str, cache: DiskCache, bucket: str
) -> None:
    data = os.urandom(3 * MiB)
    raw_client(s3_endpoint).put_object(Bucket=bucket, Key="plain", Body=data)
    assert (await s3.head(parse_ref(f"s3://{bucket}/plain"))).sha256 is None
    fetcher = Fetcher(cache, s3=s3)
    async with fetcher.open(f"s3://{bucket}/plain") as obj:
        assert obj.sha256 == sha(data)
    async with fetcher.open(f"s3://{bucket}/plain?sha256={sha(data)}") as obj:
        assert obj.path.read_bytes() == data


async def test_wrong_digests_are_reported_and_nothing_cached(
    s3: S3Client, s3_endpoint: str, cache: DiskCache, bucket: str
) -> None:
    data = os.urandom(MiB)
    # The object's recorded digest does not match its bytes (corruption at rest).
    raw_client(s3_endpoint).put_object(
        Bucket=bucket, Key="rotten", Body=data, Metadata={"sha256": "1" * 64}
    )
    fetcher = Fetcher(cache, s3=s3)
    with pytest.raises(DigestMismatch, match="expected " + "1" * 64):
        async with fetcher.open(f"s3://{bucket}/rotten"):
            pass
    raw_client(s3_endpoint).put_object(Bucket=bucket, Key="good", Body=data)
    with pytest.raises(DigestMismatch, match="expected " + "2" * 64):
        async with fetcher.open(f"s3://{bucket}/good?sha256={'2' * 64}"):
            pass
    assert cache.used_bytes == 0
    assert os.listdir(cache.root / "objects") == []


async def test_missing_objects_and_buckets(s3: S3Client, bucket: str) -> None:
    with pytest.raises(ObjectNotFound, match="not found"):
        await s3.head(parse_ref(f"s3://{bucket}/missing"))
    with pytest.raises(ObjectNotFound):
        async with s3.open(parse_ref(f"s3://{bucket}/missing")):
            pass
    with pytest.raises(ObjectNotFound):
        async with s3.open(parse_ref("s3://no-such-bucket/k")):
            pass


async def test_versions(s3: S3Client, s3_endpoint: str, bucket: str) -> None:
    raw = raw_client(s3_endpoint)
    raw.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    first = raw.put_object(Bucket=bucket, Key="k", Body=b"one")["VersionId"]
    raw.put_object(Bucket=bucket, Key="k", Body=b"two")
    async with s3.open(parse_ref(f"s3://{bucket}/k?version={first}")) as reader:
        assert b"".join([c async for c in reader.chunks]) == b"one"
        assert reader.info.version_id == first


async def test_unreachable_endpoint_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    config = S3Config(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1, **CREDENTIALS)
    client = S3Client(config)
    try:
        with pytest.raises(Unavailable):
            await client.head(parse_ref("s3://b/k"))
    finally:
        client.close()
