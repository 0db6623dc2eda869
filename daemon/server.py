"""The grpc.aio server: ComputeService, PeerService, ObjectService, health, reflection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from daemon.auth import AuthInterceptor
from daemon.channels import GRPC_OPTIONS
from daemon.exceptions import ConfigError
from daemon.pb.anvil import compute_pb2, compute_pb2_grpc, object_pb2, object_pb2_grpc
from daemon.status import ErrorInterceptor

SERVICE_NAMES = (
    compute_pb2.DESCRIPTOR.services_by_name["ComputeService"].full_name,
    compute_pb2.DESCRIPTOR.services_by_name["PeerService"].full_name,
    object_pb2.DESCRIPTOR.services_by_name["ObjectService"].full_name,
)


MAX_STREAMS_PER_CONNECTION = 1000


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerOptions:
    listen: str
    secret: bytes | None  # None: authentication explicitly switched off
    credentials: grpc.ServerCredentials | None = None
    max_concurrent_rpcs: int = 10_000


class Server:
    """Owns the grpc.aio server and its health status.

    SERVING while the peer says it serves (`set_serving`: up, not draining) and
    the registry answers (`set_registry_reachable`), NOT_SERVING otherwise.
    """

    def __init__(
        self,
        options: ServerOptions,
        *,
        compute: compute_pb2_grpc.ComputeServiceServicer,
        peer: compute_pb2_grpc.PeerServiceServicer,
        objects: object_pb2_grpc.ObjectServiceServicer,
    ) -> None:
        interceptors: list[aio.ServerInterceptor] = []
        if options.secret is not None:
            interceptors.append(AuthInterceptor(options.secret))
        interceptors.append(ErrorInterceptor())
        self._server = aio.server(
            interceptors=interceptors,
            options=[
                *GRPC_OPTIONS,
                ("grpc.so_reuseport", 0),
                # Advertised to clients, which queue calls past it: a burst of
                # thousands of new streams on one connection otherwise gets some
                # of them cancelled inside gRPC's transport.
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
            maximum_concurrent_rpcs=options.max_concurrent_rpcs,
        )
        compute_pb2_grpc.add_ComputeServiceServicer_to_server(compute, self._server)
        compute_pb2_grpc.add_PeerServiceServicer_to_server(peer, self._server)
        object_pb2_grpc.add_ObjectServiceServicer_to_server(objects, self._server)
        self.health = health.aio.HealthServicer()
        self._serving = False
        self._registry_reachable = True
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        if options.credentials is not None:
            port = self._server.add_secure_port(options.listen, options.credentials)
        else:
            port = self._server.add_insecure_port(options.listen)
        if port == 0:
            raise ConfigError(f"cannot listen on {options.listen}")
        host = options.listen.rpartition(":")[0]
        self.address = f"{host}:{port}"

    async def start(self) -> None:
        await self._server.start()

    async def set_serving(self, serving: bool, services: Sequence[str] = ("",)) -> None:
        """Whether this peer serves (started, not draining); health also needs the registry."""
        self._serving = serving
        await self._report(services)

    async def set_registry_reachable(self, reachable: bool) -> None:
        """Whether the registry answers; while it does not, health is NOT_SERVING."""
        self._registry_reachable = reachable
        await self._report()

    async def _report(self, services: Sequence[str] = ("",)) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._serving and self._registry_reachable
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (*services, *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self._server.stop(grace_s)

    async def wait(self) -> None:
        await self._server.wait_for_termination()
