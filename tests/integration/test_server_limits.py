"""The grpc.aio server's own limits, on a real server over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from daemon.client import ComputeClient
from daemon.pb.anvil import compute_pb2, compute_pb2_grpc, object_pb2_grpc
from daemon.server import Server, ServerOptions


class HoldingCompute(compute_pb2_grpc.ComputeServiceServicer):
    """WatchJob streams that stay open until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.open = 0

    async def WatchJob(  # noqa: N802 - gRPC method name
        self, request: compute_pb2.WatchJobRequest, context: aio.ServicerContext
    ) -> AsyncIterator[compute_pb2.WatchJobResponse]:
        self.open += 1
        yield compute_pb2.WatchJobResponse(
            status=compute_pb2.GetJobStatusResponse(job_id=request.job_id)
        )
        await self.release.wait()


async def test_calls_past_maximum_concurrent_rpcs_are_refused_not_queued() -> None:
    compute = HoldingCompute()
    server = Server(
        ServerOptions(listen="127.0.0.1:0", secret=None, max_concurrent_rpcs=3),
        compute=compute,
        peer=compute_pb2_grpc.PeerServiceServicer(),
        objects=object_pb2_grpc.ObjectServiceServicer(),
    )
    await server.start()
    try:
        async with ComputeClient(server.address) as client:
            calls = [
                client.stub.WatchJob(compute_pb2.WatchJobRequest(job_id=f"j{i}")) for i in range(3)
            ]
            for call in calls:
                assert (await call.read()).status.job_id  # all three are being served
            assert compute.open == 3
            extra = client.stub.WatchJob(compute_pb2.WatchJobRequest(job_id="one-too-many"))
            with pytest.raises(aio.AioRpcError) as refused:
                await extra.read()
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert compute.open == 3
            compute.release.set()
            for call in calls:
                assert await call.code() is grpc.StatusCode.OK
            # Below the limit again: served.
            again = client.stub.WatchJob(compute_pb2.WatchJobRequest(job_id="again"))
            assert (await again.read()).status.job_id == "again"
    finally:
        await server.stop(0)
