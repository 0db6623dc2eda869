"""The built-in store across peers: each object lives on the HRW owner of its key.

Objects are placed by the same rendezvous hash that places jobs (DESIGN §3),
keyed by the object key, over the live peers of the region. A job keyed by its
first input therefore runs on the peer that already holds that input, and
reads it without crossing the network. Reads try this peer's store first, then
the owner, then the next peers in HRW order (an object written while
membership was different may sit one rank lower); bytes that came from another
peer are counted, per job (`count_remote_bytes`) and in total.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon.exceptions import AnvilError, ObjectNotFound, Unavailable
from daemon.storage.anvil_client import AnvilClient
from daemon.storage.local_store import LocalSource, LocalStore
from daemon.storage.refs import ObjectRef
from daemon.storage.source import ObjectInfo, ObjectReader

# How many peers in HRW order a read asks before giving up.
READ_FANOUT = 3
FORWARDED_HEADER = "anvil-forwarded"

# Bytes read from other peers by the current task (and the tasks it starts).
_remote_bytes: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "remote_bytes", default=None
)


@contextlib.contextmanager
def count_remote_bytes() -> Iterator[list[int]]:
    """Count, in `counter[0]`, the bytes this task's reads pull from other peers.

    Counts nest: on exit, an inner block's count is added to the enclosing one,
    so a per-fetch count (metrics) and a per-job count (runner) both see it.
    """
    outer = _remote_bytes.get()
    counter = [0]
    token = _remote_bytes.set(counter)
    try:
        yield counter
    finally:
        _remote_bytes.reset(token)
        if outer is not None:
            outer[0] += counter[0]


@dataclass(frozen=True, slots=True)
class Owner:
    peer_id: uuid.UUID
    address: str


class Fabric:
    """Local store + the other peers' stores, addressed by HRW on the object key."""

    def __init__(
        self,
        *,
        store: LocalStore,
        peer_id: uuid.UUID,
        owners: Callable[[str], Sequence[Owner]],
        connect: Callable[[str], AnvilClient],
    ) -> None:
        self.store = store
        self.peer_id = peer_id
        self._owners = owners
        self._connect = connect
        self._local = LocalSource(store)
        self._clients: dict[str, AnvilClient] = {}
        self.remote_bytes_total = 0

    def owners(self, key: str) -> list[Owner]:
        """Peers in HRW order for `key` (the first owns it); [] when membership is empty."""
        return list(self._owners(key))

    def owns(self, key: str) -> bool:
        order = self.owners(key)
        return not order or order[0].peer_id == self.peer_id

    def client(self, address: str) -> AnvilClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = self._connect(address)
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    def _remote(self, key: str) -> list[Owner]:
        return [o for o in self.owners(key)[:READ_FANOUT] if o.peer_id != self.peer_id]

    def prefers_local(self, ref: ObjectRef) -> bool:
        """Whether this peer's copy may answer before the owner is asked.

        Yes when this peer owns the key, or the ref names a version (versions
        never change). Otherwise a local copy may be an old version left from an
        earlier membership: the owner is asked first, the local copy is the
        fallback.
        """
        return ref.version is not None or self.owns(ref.key)

    # -- ObjectSource (what the Fetcher reads anvil:// refs through) -----------
    async def head(self, ref: ObjectRef) -> ObjectInfo:
        local_first = self.prefers_local(ref)
        if local_first:
            with contextlib.suppress(ObjectNotFound):
                return await self._local.head(ref)
        last: AnvilError = ObjectNotFound(f"object {ref} not found on any peer")
        for owner in self._remote(ref.key):
            try:
                return await self.client(owner.address).head(ref)
            except (ObjectNotFound, Unavailable) as exc:
                last = exc
        if not local_first:
            with contextlib.suppress(ObjectNotFound):
                return await self._local.head(ref)
        raise last

    @contextlib.asynccontextmanager
    async def open(self, ref: ObjectRef) -> AsyncIterator[ObjectReader]:
        # The source is chosen before the yield and never retried after it: an
        # error inside the caller's block (a peer dying mid-transfer) must reach
        # the caller as is, not send the generator on to another peer.
        async with contextlib.AsyncExitStack() as stack:
            reader = await self._enter(stack, ref)
            yield reader

    async def _enter(self, stack: contextlib.AsyncExitStack, ref: ObjectRef) -> ObjectReader:
        local_first = self.prefers_local(ref)
        if local_first:
            with contextlib.suppress(ObjectNotFound):
                return await stack.enter_async_context(self._local.open(ref))
        last: AnvilError = ObjectNotFound(f"object {ref} not found on any peer")
        for owner in self._remote(ref.key):
            try:
                reader = await stack.enter_async_context(self.client(owner.address).open(ref))
            except (ObjectNotFound, Unavailable) as exc:
                last = exc
                continue
            return ObjectReader(info=reader.info, chunks=self._counted(reader.chunks))
        if not local_first:
            with contextlib.suppress(ObjectNotFound):
                return await stack.enter_async_context(self._local.open(ref))
        raise last

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        counter = _remote_bytes.get()
        async for chunk in chunks:
            self.remote_bytes_total += len(chunk)
            if counter is not None:
                counter[0] += len(chunk)
            yield chunk

    # -- writes ----------------------------------------------------------------
    async def put_file(self, path: Path, *, bucket: str, key: str) -> ObjectInfo:
        """Store a file on the key's owner, else the next peers in HRW order.

        A peer that died but still counts as live must not fail the write (reads
        look READ_FANOUT peers deep); this peer's own store is the last resort.
        Raises Unavailable only if that fails too.
        """
        last: AnvilError | None = None
        for owner in self.owners(key)[:READ_FANOUT]:
            if owner.peer_id == self.peer_id:
                break
            try:
                return await self.client(owner.address).put_file(path, bucket=bucket, key=key)
            except Unavailable as exc:
                last = exc
        try:
            return await asyncio.to_thread(
                functools.partial(self.store.put_file, path, bucket=bucket, key=key)
            )
        except OSError as exc:
            raise Unavailable(f"cannot store {bucket}/{key}: {exc}") from (last or exc)
