"""ObjectService across the fabric: any peer accepts any put and serves any get.

A put is stored here when this peer owns the key (HRW), else streamed on to
the owner; a get or head of an object this peer does not hold is answered from
the owners. Calls between peers carry the `anvil-forwarded` header and are only
ever served locally, so a request crosses at most one extra hop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from daemon import access, auth
from daemon.exceptions import InvalidArgument, ObjectNotFound
from daemon.pb.anvil import object_pb2
from daemon.storage.fabric import FORWARDED_HEADER, Fabric
from daemon.storage.object_service import ObjectServiceServicer, head_response, info_message
from daemon.storage.refs import ObjectRef, Scheme

Context = Any


def _forwarded(context: Context) -> bool:
    return any(key == FORWARDED_HEADER for key, _ in context.invocation_metadata() or ())


async def _chain(
    first: object_pb2.PutObjectRequest, rest: AsyncIterator[object_pb2.PutObjectRequest]
) -> AsyncIterator[object_pb2.PutObjectRequest]:
    yield first
    async for item in rest:
        yield item


async def _chunks(rest: AsyncIterator[object_pb2.PutObjectRequest]) -> AsyncIterator[bytes]:
    async for item in rest:
        if item.WhichOneof("data") != "chunk":
            raise InvalidArgument("PutObject: metadata may only be sent once, first")
        yield item.chunk


def _ref(bucket: str, key: str, version: str | None) -> ObjectRef:
    return ObjectRef(scheme=Scheme.ANVIL, bucket=bucket, key=key, version=version or None)


class FabricObjectService(ObjectServiceServicer):
    """The ObjectService a peer serves: who may read and write what is decided in
    daemon/access.py (`owner_of` tells whose job a result object belongs to)."""

    def __init__(self, fabric: Fabric, *, owner_of: access.OwnerLookup) -> None:
        super().__init__(fabric.store)
        self.fabric = fabric
        self._owner_of = owner_of

    async def PutObject(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[object_pb2.PutObjectRequest], context: Context
    ) -> object_pb2.PutObjectResponse:
        stream = aiter(request_iterator)
        first = await anext(stream, None)
        if first is None:
            return await super().PutObject(_empty(), context)
        meta = first.metadata
        if first.WhichOneof("data") == "metadata":
            access.check_write(auth.current_claims.get(), meta.bucket_name, meta.object_key)
        if (
            _forwarded(context)
            or first.WhichOneof("data") != "metadata"
            or self.fabric.owns(meta.object_key)
        ):
            return await super().PutObject(_chain(first, stream), context)
        owner = self.fabric.owners(meta.object_key)[0]
        info = await self.fabric.client(owner.address).put(
            _chunks(stream),
            bucket=meta.bucket_name,
            key=meta.object_key,
            content_type=meta.content_type or "application/octet-stream",
            sha256=meta.sha256 or None,
        )
        return object_pb2.PutObjectResponse(
            etag=info.etag,
            version_id=info.version_id,
            content_length=info.size,
            sha256=info.sha256 or "",
        )

    async def _held_here(self, bucket: str, key: str, version: str | None) -> bool:
        try:
            await asyncio.to_thread(self.store.head, bucket, key, version)
        except ObjectNotFound:
            return False
        return True

    async def GetObject(  # noqa: N802 - gRPC method name
        self, request: object_pb2.GetObjectRequest, context: Context
    ) -> AsyncIterator[object_pb2.GetObjectResponse]:
        await access.check_read(
            auth.current_claims.get(), request.bucket_name, request.object_key, self._owner_of
        )
        version = request.version_id if request.HasField("version_id") else None
        ref = _ref(request.bucket_name, request.object_key, version)
        # Served straight from this peer's store (with its own corruption
        # checks) when asked by a peer, or when this copy is authoritative.
        if _forwarded(context) or (
            self.fabric.prefers_local(ref)
            and await self._held_here(request.bucket_name, request.object_key, version)
        ):
            async for message in super().GetObject(request, context):
                yield message
            return
        async with self.fabric.open(ref) as reader:
            yield object_pb2.GetObjectResponse(metadata=info_message(reader.info))
            async for chunk in reader.chunks:
                yield object_pb2.GetObjectResponse(chunk=chunk)

    async def HeadObject(  # noqa: N802 - gRPC method name
        self, request: object_pb2.HeadObjectRequest, context: Context
    ) -> object_pb2.HeadObjectResponse:
        await access.check_read(
            auth.current_claims.get(), request.bucket_name, request.object_key, self._owner_of
        )
        version = request.version_id if request.HasField("version_id") else None
        if _forwarded(context):
            return await super().HeadObject(request, context)
        info = await self.fabric.head(_ref(request.bucket_name, request.object_key, version))
        return head_response(info)


async def _empty() -> AsyncIterator[object_pb2.PutObjectRequest]:
    return
    yield
