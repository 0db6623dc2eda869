"""A small async client of one peer: ComputeService calls and input uploads."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import grpc

from daemon.channels import open_channel
from daemon.pb.anvil import compute_pb2, compute_pb2_grpc
from daemon.storage.anvil_client import AnvilClient
from daemon.storage.digest import sha256_file
from daemon.storage.refs import parse_ref
from daemon.storage.source import ObjectInfo

INPUT_BUCKET = "inputs"


def find_token(
    explicit: str | None, data_dir: Path | None, *, file: str = "client.token"
) -> str | None:
    """--token, else $ANVIL_TOKEN, else DATA_DIR/<file> (client.token; operator.token
    for operators' commands) if readable."""
    if explicit:
        return explicit
    if os.environ.get("ANVIL_TOKEN"):
        return os.environ["ANVIL_TOKEN"]
    if data_dir is not None:
        try:
            return (data_dir / file).read_text().strip() or None
        except OSError:
            return None
    return None


def looks_like_ref(text: str) -> bool:
    return "://" in text or text.startswith("sha256:")


# Calls one client keeps in flight on its one connection, per kind. gRPC's HTTP/2
# transport cancels some streams of a burst well past a thousand new ones on a
# connection (seen with grpcio 1.85 against any grpc.aio server); past these
# bounds calls wait their turn in the client instead.
MAX_UNARY_IN_FLIGHT = 512
MAX_STREAMS_IN_FLIGHT = 512
# `wait` watches again after UNAVAILABLE (a watch starts with the job's current
# status, so nothing is missed), this often, for at most this long in a row.
WATCH_RETRY_S = 0.5
WAIT_THROUGH_UNAVAILABLE_S = 60.0


class ComputeClient:
    """ComputeService over one channel, with the caller's bearer token on every call."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self._token = token
        self._credentials = credentials
        self.channel = open_channel(target, credentials)
        self.stub: compute_pb2_grpc.ComputeServiceAsyncStub = compute_pb2_grpc.ComputeServiceStub(
            self.channel
        )
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._unary = asyncio.Semaphore(MAX_UNARY_IN_FLIGHT)
        self._streams = asyncio.Semaphore(MAX_STREAMS_IN_FLIGHT)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> ComputeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
        self,
        capability: str,
        *,
        region: str = "",  # the receiving peer's region
        inputs: Sequence[str] = (),
        params: Mapping[str, str] | None = None,
        idempotency_key: str = "",
        locality_key: str = "",
        timeout_ms: int = 0,
        resources: Mapping[str, str] | None = None,
        max_attempts: int = 0,
        queue_timeout_ms: int = 0,
        deadline_s: float | None = 30.0,
    ) -> compute_pb2.SubmitJobResponse:
        request = compute_pb2.SubmitJobRequest(
            capability=capability,
            region=region,
            inputs=list(inputs),
            params=dict(params or {}),
            idempotency_key=idempotency_key,
            locality_key=locality_key,
            timeout_ms=timeout_ms,
            resources=dict(resources or {}),
            max_attempts=max_attempts,
            queue_timeout_ms=queue_timeout_ms,
        )
        async with self._unary:
            return await self.stub.SubmitJob(request, metadata=self.metadata, timeout=deadline_s)

    async def status(self, job_id: str) -> compute_pb2.GetJobStatusResponse:
        async with self._unary:
            return await self.stub.GetJobStatus(
                compute_pb2.GetJobStatusRequest(job_id=job_id), metadata=self.metadata, timeout=30
            )

    async def cancel(self, job_id: str, reason: str = "") -> compute_pb2.CancelJobResponse:
        async with self._unary:
            return await self.stub.CancelJob(
                compute_pb2.CancelJobRequest(job_id=job_id, reason=reason),
                metadata=self.metadata,
                timeout=30,
            )

    async def watch(self, job_id: str) -> AsyncIterator[compute_pb2.GetJobStatusResponse]:
        async with self._streams:
            call = self.stub.WatchJob(
                compute_pb2.WatchJobRequest(job_id=job_id), metadata=self.metadata
            )
            async for update in call:
                yield update.status

    async def wait(
        self, job_id: str, *, unavailable_for_s: float = WAIT_THROUGH_UNAVAILABLE_S
    ) -> compute_pb2.GetJobStatusResponse:
        """Follow the job until it ends; return its final status.

        A watch ended by UNAVAILABLE (the peer lost its registry for a while, or
        restarts) is started again, until UNAVAILABLE has lasted
        `unavailable_for_s`; then, and on any other error, AioRpcError is raised.
        """
        last = None
        since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                async for status in self.watch(job_id):
                    last, since = status, None
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise
                since = loop.time() if since is None else since
                if loop.time() - since >= unavailable_for_s:
                    raise
                await asyncio.sleep(WATCH_RETRY_S)
        if last is None:
            raise RuntimeError(f"watch of {job_id} ended without a status")
        return last

    async def capabilities(
        self, capability: str = "", region: str = "", live_only: bool = False
    ) -> list[compute_pb2.Capability]:
        """Every registered row matching the filters (all pages)."""
        found: list[compute_pb2.Capability] = []
        page_token = ""
        while True:
            response = await self.stub.ListCapabilities(
                compute_pb2.ListCapabilitiesRequest(
                    capability=capability,
                    region=region,
                    live_only=live_only,
                    page_size=1000,
                    page_token=page_token,
                ),
                metadata=self.metadata,
                timeout=30,
            )
            found += response.capabilities
            page_token = response.next_page_token
            if not page_token:
                return found

    async def deploy(
        self,
        capability: str,
        executor: compute_pb2.Executor,
        *,
        peer_id: str = "",
        region: str = "",
        max_concurrency: int = 1,
        resources: Mapping[str, str] | None = None,
    ) -> compute_pb2.Capability:
        """RegisterCapability: to one peer, or with no peer_id to every peer of the region."""
        response = await self.stub.RegisterCapability(
            compute_pb2.RegisterCapabilityRequest(
                peer_id=peer_id,
                region=region,
                capability=capability,
                max_concurrency=max_concurrency,
                resources=dict(resources or {}),
                executor=executor,
            ),
            metadata=self.metadata,
            timeout=120,
        )
        return response.capability

    async def undeploy(self, capability: str, *, peer_id: str = "", region: str = "") -> None:
        await self.stub.DeregisterCapability(
            compute_pb2.DeregisterCapabilityRequest(
                peer_id=peer_id, capability=capability, region=region
            ),
            metadata=self.metadata,
            timeout=30,
        )

    async def upload(self, path: Path, *, bucket: str = INPUT_BUCKET) -> str:
        """Store a local file on the peer; return its ref with the digest."""
        digest = await asyncio.to_thread(sha256_file, path)
        async with AnvilClient.connect(
            self.target, credentials=self._credentials, token=self._token
        ) as objects:
            # Content-addressed key: the same bytes always land at the same key,
            # so HRW places every job on them the same way.
            info: ObjectInfo = await objects.put_file(
                path, bucket=bucket, key=f"{digest}/{path.name}", sha256=digest
            )
        return f"anvil://{bucket}/{quote(info.key)}?sha256={info.sha256}"

    async def resolve_inputs(
        self, items: Sequence[str], *, bucket: str = INPUT_BUCKET
    ) -> list[str]:
        """Refs pass through (validated); local paths are uploaded to `bucket` first."""
        refs = []
        for item in items:
            if looks_like_ref(item):
                parse_ref(item)
                refs.append(item)
            else:
                refs.append(await self.upload(Path(item), bucket=bucket))
        return refs
