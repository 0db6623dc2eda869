"""Peer-to-peer dispatch: tell the chosen peer a job is waiting (the fast path).

Best effort by design: the job row is already committed and the registry's
NOTIFY on the peer's channel plus the peer's own polling deliver it anyway, so
a failed Dispatch costs latency, never a job.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import grpc
from grpc import aio

from daemon.channels import open_channel
from daemon.pb.anvil import compute_pb2, compute_pb2_grpc

log = logging.getLogger(__name__)

DISPATCH_TIMEOUT_S = 2.0


class PeerLinks:
    """One gRPC channel per peer address, reused for every dispatch."""

    def __init__(
        self,
        *,
        token: Callable[[], str | None],
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._token = token
        self._credentials = credentials
        self._channels: dict[str, aio.Channel] = {}
        self._pending: set[asyncio.Task[bool]] = set()

    def _stub(self, address: str) -> compute_pb2_grpc.PeerServiceAsyncStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self._credentials)
        stub: compute_pb2_grpc.PeerServiceAsyncStub = compute_pb2_grpc.PeerServiceStub(channel)
        return stub

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token()
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def dispatch(self, address: str, job_id: uuid.UUID) -> bool:
        """Ask the peer at `address` to claim its queue now; False if it could not be told."""
        try:
            response = await self._stub(address).Dispatch(
                compute_pb2.DispatchRequest(job_id=str(job_id)),
                timeout=DISPATCH_TIMEOUT_S,
                metadata=self._metadata(),
            )
        except aio.AioRpcError as exc:
            log.info("dispatch of %s to %s failed: %s", job_id, address, exc.code())
            return False
        return bool(response.accepted)

    def dispatch_soon(self, address: str, job_id: uuid.UUID) -> None:
        """Dispatch in the background; the caller does not wait for the peer."""
        task = asyncio.create_task(self.dispatch(address, job_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
