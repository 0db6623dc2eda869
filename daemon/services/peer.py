"""anvil.PeerService: the dispatch fast path and liveness between peers."""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from grpc import aio

from daemon import __version__
from daemon.pb.anvil import compute_pb2, compute_pb2_grpc
from daemon.registry.models import parse_uuid

Context = aio.ServicerContext[Any, Any]


class Worker(Protocol):
    """What the peer service needs from this peer's job runner."""

    @property
    def draining(self) -> bool: ...

    @property
    def running_jobs(self) -> int: ...

    def wake(self) -> None: ...


class PeerService(compute_pb2_grpc.PeerServiceServicer):
    def __init__(self, *, peer_id: uuid.UUID, region: str, worker: Worker) -> None:
        self._peer_id = peer_id
        self._region = region
        self._worker = worker

    async def Dispatch(
        self, request: compute_pb2.DispatchRequest, context: Context
    ) -> compute_pb2.DispatchResponse:
        parse_uuid(request.job_id, field_name="job_id")
        if self._worker.draining:
            return compute_pb2.DispatchResponse(accepted=False)
        # Claims go oldest-first from this peer's queue, so waking the runner
        # (rather than claiming this job directly) keeps submission order.
        self._worker.wake()
        return compute_pb2.DispatchResponse(accepted=True)

    async def Heartbeat(
        self, request: compute_pb2.HeartbeatRequest, context: Context
    ) -> compute_pb2.HeartbeatResponse:
        return compute_pb2.HeartbeatResponse(
            peer_id=str(self._peer_id),
            region=self._region,
            running_jobs=self._worker.running_jobs,
            draining=self._worker.draining,
            version=__version__,
        )
