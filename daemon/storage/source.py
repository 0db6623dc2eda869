"""What every storage backend offers the cache: object info and a chunk stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from daemon.storage.refs import ObjectRef

# 1 MiB: large enough that per-message overhead vanishes, small enough that a
# transfer holds a few MiB of buffers whatever the object's size.
CHUNK_SIZE = 1 << 20
DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectInfo:
    """An object's stored description; `sha256` is None when the backend does not know it."""

    bucket: str
    key: str
    size: int
    sha256: str | None
    version_id: str = ""
    etag: str = ""
    content_type: str = DEFAULT_CONTENT_TYPE


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectReader:
    """An open object: its info, then its bytes in order (unverified)."""

    info: ObjectInfo
    chunks: AsyncIterator[bytes]


class ObjectSource(Protocol):
    """A backend that can describe and stream objects named by refs of its scheme."""

    async def head(self, ref: ObjectRef) -> ObjectInfo:
        """Describe the object; raises ObjectNotFound, Unavailable, InvalidArgument."""
        ...

    def open(self, ref: ObjectRef) -> AbstractAsyncContextManager[ObjectReader]:
        """Open the object for reading; the same errors as `head` on entry."""
        ...
