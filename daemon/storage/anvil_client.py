"""Async client of `anvil.ObjectService`: a real Anvil cluster or any peer's store.

Serves `anvil://` refs as an ObjectSource. Uploads carry the sha256 of what
is sent, so the server refuses bytes damaged on the way; downloads report the
server's sha256 (when it knows one) for the caller to verify against.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType

import grpc
from grpc import aio

from daemon import exceptions
from daemon.channels import open_channel
from daemon.exceptions import AnvilError, DigestMismatch, InvalidArgument
from daemon.pb.anvil import object_pb2, object_pb2_grpc
from daemon.storage.digest import sha256_file
from daemon.storage.refs import ObjectRef, Scheme, validate_bucket, validate_key
from daemon.storage.source import CHUNK_SIZE, DEFAULT_CONTENT_TYPE, ObjectInfo, ObjectReader

_ERRORS: dict[grpc.StatusCode, type[AnvilError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: exceptions.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: exceptions.ObjectNotFound,
    grpc.StatusCode.ALREADY_EXISTS: exceptions.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: exceptions.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: exceptions.ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: exceptions.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: exceptions.PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: exceptions.DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: exceptions.Unavailable,
    grpc.StatusCode.DATA_LOSS: exceptions.DigestMismatch,
}


class AnvilClient:
    """ObjectService client over one grpc.aio channel; `close()` or `async with` ends it."""

    def __init__(
        self,
        channel: aio.Channel,
        *,
        target: str = "",
        metadata: Sequence[tuple[str, str]] | Callable[[], Sequence[tuple[str, str]]] = (),
        timeout: float | None = None,
        chunk_size: int = CHUNK_SIZE,
        owns_channel: bool = False,
    ) -> None:
        self.target = target
        self.chunk_size = chunk_size
        self._channel = channel
        self._stub = object_pb2_grpc.ObjectServiceStub(channel)
        # A callable is asked on every call (peer links refresh their tokens).
        self._metadata = metadata if callable(metadata) else tuple(metadata)
        self._timeout = timeout
        self._owns_channel = owns_channel

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        metadata: Callable[[], Sequence[tuple[str, str]]] | None = None,
        timeout: float | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> AnvilClient:
        """Open a channel to HOST:PORT (TLS when `credentials` are given, else plaintext).

        Calls carry `token` as a bearer, or whatever `metadata()` returns at call time.
        """
        if metadata is None:
            metadata = lambda: [("authorization", f"Bearer {token}")] if token else []  # noqa: E731
        return cls(
            open_channel(target, credentials),
            target=target,
            metadata=metadata,
            timeout=timeout,
            chunk_size=chunk_size,
            owns_channel=True,
        )

    def _call_metadata(self) -> Sequence[tuple[str, str]]:
        return self._metadata() if callable(self._metadata) else self._metadata

    async def head(self, ref: ObjectRef) -> ObjectInfo:
        """Describe the object; raises ObjectNotFound, Unavailable, ..."""
        _check_scheme(ref)
        request = object_pb2.HeadObjectRequest(bucket_name=ref.bucket, object_key=ref.key)
        if ref.version is not None:
            request.version_id = ref.version
        try:
            response = await self._stub.HeadObject(
                request, metadata=self._call_metadata(), timeout=self._timeout
            )
        except aio.AioRpcError as exc:
            raise self._error(exc, ref) from exc
        return head_info(ref.bucket, ref.key, response)

    @asynccontextmanager
    async def open(self, ref: ObjectRef) -> AsyncIterator[ObjectReader]:
        """Start a GetObject; yields the object's info and its (unverified) chunks."""
        _check_scheme(ref)
        request = object_pb2.GetObjectRequest(bucket_name=ref.bucket, object_key=ref.key)
        if ref.version is not None:
            request.version_id = ref.version
        call = self._stub.GetObject(request, metadata=self._call_metadata(), timeout=self._timeout)
        try:
            stream = aiter(call)
            try:
                first = await anext(stream, None)
            except aio.AioRpcError as exc:
                raise self._error(exc, ref) from exc
            if first is None or first.WhichOneof("data") != "metadata":
                raise exceptions.DataLoss(
                    f"{self.target}: GetObject of {ref.location} did not start with metadata"
                )
            yield ObjectReader(
                info=_info(ref.bucket, ref.key, first.metadata),
                chunks=self._chunks(stream, ref),
            )
        finally:
            call.cancel()

    async def put_file(
        self,
        path: Path,
        *,
        bucket: str,
        key: str,
        content_type: str = DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Upload a file; hashes it first unless `sha256` is given.

        Raises DigestMismatch if the file's bytes change under us or the
        server stored something else.
        """
        if sha256 is None:
            sha256 = await asyncio.to_thread(sha256_file, path)
        return await self.put(
            _file_chunks(path, self.chunk_size),
            bucket=bucket,
            key=key,
            content_type=content_type,
            sha256=sha256,
        )

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        bucket: str,
        key: str,
        content_type: str = DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Upload a stream of chunks as a new version of bucket/key."""
        validate_bucket(bucket)
        validate_key(key)
        metadata = object_pb2.ObjectMetadata(
            bucket_name=bucket, object_key=key, content_type=content_type, sha256=sha256 or ""
        )
        # Without a digest up front, hash what is sent to check the server's answer.
        sent = hashlib.sha256() if sha256 is None else None
        size = 0
        failure: Exception | None = None

        async def requests() -> AsyncIterator[object_pb2.PutObjectRequest]:
            nonlocal size, failure
            yield object_pb2.PutObjectRequest(metadata=metadata)
            try:
                async for chunk in chunks:
                    if sent is not None:
                        sent.update(chunk)
                    size += len(chunk)
                    yield object_pb2.PutObjectRequest(chunk=chunk)
            except Exception as exc:
                failure = exc  # grpc cancels the call and would only report that
                raise

        try:
            response = await self._stub.PutObject(
                requests(), metadata=self._call_metadata(), timeout=self._timeout
            )
        except aio.AioRpcError as exc:
            raise self._error(exc, None) from exc
        except asyncio.CancelledError:
            if failure is not None:
                raise failure from None
            raise
        digest = sha256 if sent is None else sent.hexdigest()
        if response.sha256 and response.sha256 != digest:
            raise DigestMismatch(
                f"{self.target}: stored {bucket}/{key} with sha256 {response.sha256}, sent {digest}"
            )
        return ObjectInfo(
            bucket=bucket,
            key=key,
            size=response.content_length or size,
            sha256=digest,
            version_id=response.version_id,
            etag=response.etag,
            content_type=content_type,
        )

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AnvilClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _chunks(
        self, stream: AsyncIterator[object_pb2.GetObjectResponse], ref: ObjectRef
    ) -> AsyncIterator[bytes]:
        try:
            async for response in stream:
                if response.WhichOneof("data") != "chunk":
                    raise exceptions.DataLoss(
                        f"{self.target}: GetObject of {ref.location} sent metadata twice"
                    )
                yield response.chunk
        except aio.AioRpcError as exc:
            raise self._error(exc, ref) from exc

    def _error(self, exc: aio.AioRpcError, ref: ObjectRef | None) -> AnvilError:
        """Translate an RPC failure into the daemon's error with the same status."""
        error_class = _ERRORS.get(exc.code(), exceptions.Unavailable)
        what = f" {ref.location}" if ref is not None else ""
        return error_class(f"{self.target or 'ObjectService'}:{what} {exc.details()}")


def _check_scheme(ref: ObjectRef) -> None:
    if ref.scheme is not Scheme.ANVIL:
        raise InvalidArgument(f"the Anvil client reads anvil:// refs, not {ref}")


def head_info(bucket: str, key: str, response: object_pb2.HeadObjectResponse) -> ObjectInfo:
    """A HeadObject answer: a peer's full `info`, or Anvil's own etag and size."""
    if response.HasField("info"):
        return _info(bucket, key, response.info)
    return ObjectInfo(bucket=bucket, key=key, size=response.size, sha256=None, etag=response.etag)


def _info(bucket: str, key: str, message: object_pb2.ObjectInfo) -> ObjectInfo:
    return ObjectInfo(
        bucket=bucket,
        key=key,
        size=message.content_length,
        sha256=message.sha256.lower() or None,
        version_id=message.version_id,
        etag=message.etag,
        content_type=message.content_type or DEFAULT_CONTENT_TYPE,
    )


async def _file_chunks(path: Path, chunk_size: int) -> AsyncIterator[bytes]:
    with path.open("rb", buffering=0) as src:
        while chunk := await asyncio.to_thread(src.read, chunk_size):
            yield chunk
