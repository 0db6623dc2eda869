"""`anvil.ObjectService` over the built-in store: streaming put, get and head.

Wire-compatible with Anvil's own service (DESIGN §5): the first message of a
PutObject stream is metadata, then chunks; GetObject answers metadata, then
chunks. Status codes: INVALID_ARGUMENT (bad names, metadata not first),
NOT_FOUND, DATA_LOSS (a digest mismatch, on upload or in the stored bytes),
RESOURCE_EXHAUSTED (disk full, or the store's max_store_bytes reached).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from grpc import aio

from daemon.channels import GRPC_OPTIONS, MAX_MESSAGE_BYTES
from daemon.exceptions import AnvilError, InvalidArgument
from daemon.pb.anvil import object_pb2, object_pb2_grpc
from daemon.status import grpc_code
from daemon.storage.local_store import LocalStore
from daemon.storage.source import CHUNK_SIZE, ObjectInfo

Context = aio.ServicerContext[Any, Any]

# The message limits every link uses (daemon/channels.py); re-exported for callers here.
__all__ = ["GRPC_OPTIONS", "MAX_MESSAGE_BYTES", "ObjectServiceServicer", "add_object_service"]


class ObjectServiceServicer(object_pb2_grpc.ObjectServiceServicer):
    """Serves a LocalStore; disk I/O and hashing run in worker threads."""

    def __init__(self, store: LocalStore, *, chunk_size: int = CHUNK_SIZE) -> None:
        self.store = store
        self.chunk_size = chunk_size

    async def PutObject(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[object_pb2.PutObjectRequest], context: Context
    ) -> object_pb2.PutObjectResponse:
        try:
            info = await self._put(request_iterator, context)
        except AnvilError as exc:
            await abort_with(context, exc)
        return object_pb2.PutObjectResponse(
            etag=info.etag,
            version_id=info.version_id,
            content_length=info.size,
            sha256=info.sha256 or "",
        )

    async def GetObject(  # noqa: N802 - gRPC method name
        self, request: object_pb2.GetObjectRequest, context: Context
    ) -> AsyncIterator[object_pb2.GetObjectResponse]:
        version = request.version_id if request.HasField("version_id") else None
        try:
            reader = await asyncio.to_thread(
                self.store.open,
                request.bucket_name,
                request.object_key,
                version or None,
                chunk_size=self.chunk_size,
            )
        except AnvilError as exc:
            await abort_with(context, exc)
        with reader:
            yield object_pb2.GetObjectResponse(metadata=info_message(reader.info))
            while True:
                try:
                    chunk = await asyncio.to_thread(reader.next_chunk)
                except AnvilError as exc:
                    await abort_with(context, exc)
                if not chunk:
                    return
                yield object_pb2.GetObjectResponse(chunk=chunk)

    async def HeadObject(  # noqa: N802 - gRPC method name
        self, request: object_pb2.HeadObjectRequest, context: Context
    ) -> object_pb2.HeadObjectResponse:
        version = request.version_id if request.HasField("version_id") else None
        try:
            info = await asyncio.to_thread(
                self.store.head, request.bucket_name, request.object_key, version or None
            )
        except AnvilError as exc:
            await abort_with(context, exc)
        return head_response(info)

    async def _put(
        self, requests: AsyncIterator[object_pb2.PutObjectRequest], context: Context
    ) -> ObjectInfo:
        stream = aiter(requests)
        first = await anext(stream, None)
        if first is None or first.WhichOneof("data") != "metadata":
            raise InvalidArgument("PutObject: the first message must carry the metadata")
        meta = first.metadata
        with self.store.writer(
            bucket=meta.bucket_name,
            key=meta.object_key,
            content_type=meta.content_type,
            sha256=meta.sha256 or None,
        ) as writer:
            async for request in stream:
                if request.WhichOneof("data") != "chunk":
                    raise InvalidArgument("PutObject: metadata may only be sent once, first")
                if request.chunk:
                    await asyncio.to_thread(writer.write, request.chunk)
            # grpc ends the request stream the same way whether the client
            # finished or cancelled; a cancellation reaches this task while the
            # bytes are fsync'd, before anything is visible. Past that point the
            # client had sent everything: publish even if it stops waiting.
            await asyncio.to_thread(writer.seal)
            if context.cancelled():
                raise asyncio.CancelledError
            return await asyncio.shield(asyncio.to_thread(writer.publish))


def add_object_service(
    server: aio.Server, store: LocalStore, *, chunk_size: int = CHUNK_SIZE
) -> ObjectServiceServicer:
    """Register an ObjectService over `store` on a grpc.aio server (before `start()`)."""
    servicer = ObjectServiceServicer(store, chunk_size=chunk_size)
    object_pb2_grpc.add_ObjectServiceServicer_to_server(servicer, server)
    return servicer


def info_message(info: ObjectInfo) -> object_pb2.ObjectInfo:
    return object_pb2.ObjectInfo(
        content_type=info.content_type,
        content_length=info.size,
        etag=info.etag,
        version_id=info.version_id,
        sha256=info.sha256 or "",
    )


def head_response(info: ObjectInfo) -> object_pb2.HeadObjectResponse:
    """Anvil's fields for Anvil's clients, and the full description for ours."""
    return object_pb2.HeadObjectResponse(etag=info.etag, size=info.size, info=info_message(info))


async def abort_with(context: Context, exc: AnvilError) -> NoReturn:
    """End the call with the error's status (mapped in daemon.status) and message."""
    await context.abort(grpc_code(exc), str(exc))
