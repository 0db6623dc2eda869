"""anvil.ComputeService: capabilities, job submission, status, watch, cancel."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from grpc import aio

from daemon import access, auth, convert
from daemon.exceptions import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
)
from daemon.executors.podman.images import check_image_ref
from daemon.jobs.events import JobEventHub
from daemon.jobs.peer_view import PeerView
from daemon.jobs.placer import Placer, Wanted
from daemon.jobs.scheduler import locality_key
from daemon.loops import wait_set
from daemon.modules import ModuleCheck, Resolver, is_object_ref, pin_module
from daemon.pb.anvil import compute_pb2, compute_pb2_grpc
from daemon.registry import Registry
from daemon.registry.models import (
    DEFAULT_MAX_ATTEMPTS,
    SOURCE_CONFIG,
    SOURCE_DEPLOYED,
    STATUS_PENDING,
    CapabilitySpec,
    FleetDeployment,
    Job,
    JobSpec,
    parse_uuid,
    validate_capability,
)
from daemon.storage.refs import parse_ref

Context = aio.ServicerContext[Any, Any]
# A watch re-reads its job at least this often, in case a notification was lost.
WATCH_BACKSTOP_S = 5.0
MIN_SUBMIT_BUDGET_S = 0.005
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class ComputeService(compute_pb2_grpc.ComputeServiceServicer):
    def __init__(
        self,
        *,
        registry: Registry,
        view: PeerView,
        hub: JobEventHub,
        placer: Placer,
        resolve_module: Resolver,
        check_module: ModuleCheck,
        region: str,
        queue_timeout_ms: int,
    ) -> None:
        self._registry = registry
        self._view = view
        self._hub = hub
        self._placer = placer
        # Pins a module ref to the version and sha256 its object has now.
        self._resolve_module = resolve_module
        # Checks that a worker will run a pinned module.
        self._check_module = check_module
        # This peer's region: the default of a registration that names none.
        self._region = region
        # The operator's queue timeout (queue_timeout_s) for a job that sets none.
        self._queue_timeout_ms = queue_timeout_ms

    async def _visible_job(self, job_id: uuid.UUID) -> Job:
        """The job, if the caller may see it; raises JobNotFound otherwise."""
        job = self._hub.recent(job_id) or await self._registry.jobs.get(job_id)
        return access.visible_job(auth.current_claims.get(), job)

    async def RegisterCapability(
        self, request: compute_pb2.RegisterCapabilityRequest, context: Context
    ) -> compute_pb2.RegisterCapabilityResponse:
        peer_id = parse_uuid(request.peer_id, field_name="peer_id") if request.peer_id else None
        access.check_register(auth.current_claims.get(), peer_id)
        executor = convert.executor_to_dict(request.executor)
        # Validated (names, sizes) before anything is looked up or written.
        spec = CapabilitySpec(
            peer_id=peer_id or uuid.UUID(int=0),
            region=request.region or self._region,
            capability=request.capability,
            resources=dict(request.resources),
            max_concurrency=request.max_concurrency or 1,
            executor=executor,
            source=SOURCE_DEPLOYED,
            status=STATUS_PENDING,
        )
        if peer_id is not None:
            await self._registry.peers.get(peer_id)  # NotFound: no such peer
            await self._refuse_config_row(peer_id, spec.capability, "deploy over")
        pinned = await self._deployable(executor)
        if peer_id is None:
            deployment = FleetDeployment(
                region=spec.region,
                capability=spec.capability,
                resources=spec.resources,
                max_concurrency=spec.max_concurrency,
                executor=pinned,
            )
            await self._registry.capabilities.deploy_fleet(deployment)
            return compute_pb2.RegisterCapabilityResponse(
                capability=convert.fleet_message(deployment)
            )
        cap = await self._registry.capabilities.register(replace(spec, executor=pinned))
        self._view.request_refresh()
        return compute_pb2.RegisterCapabilityResponse(capability=convert.capability_message(cap))

    async def _refuse_config_row(self, peer_id: uuid.UUID, capability: str, what: str) -> None:
        """A peer's config rows are its own (re-asserted at every heartbeat): refuse
        to deploy over or undeploy one. Raises FailedPrecondition."""
        for row in await self._registry.capabilities.find(capability=capability, peer_id=peer_id):
            if row.source == SOURCE_CONFIG:
                raise FailedPrecondition(
                    f"peer {peer_id} runs {capability!r} from its own config: cannot {what} "
                    "it through the API (change that peer's config instead)"
                )

    async def _deployable(self, executor: dict[str, Any]) -> dict[str, Any]:
        """The executor with its WASM module pinned by sha256 (resolved now when not
        given) and checked to run, or its image checked to be pinned by digest.
        Raises InvalidArgument, FailedPrecondition, NotFound, DataLoss."""
        if "podman" in executor:
            check_image_ref(str(executor["podman"].get("image", "")))
            return executor
        wasm = executor.get("wasm")
        if not isinstance(wasm, dict):
            raise InvalidArgument("executor: set wasm (a module) or podman (an image)")
        ref, digest = await pin_module(
            str(wasm.get("module_ref", "")),
            str(wasm.get("module_sha256", "")),
            resolve=self._resolve_module,
            own_config=False,
        )
        if is_object_ref(ref):
            # The front peer checks now, so a module that cannot run is refused
            # before any row exists; the target peer checks again before it runs it.
            await self._check_module(ref)
        return {**executor, "wasm": {**wasm, "module_ref": ref, "module_sha256": digest}}

    async def DeregisterCapability(
        self, request: compute_pb2.DeregisterCapabilityRequest, context: Context
    ) -> compute_pb2.DeregisterCapabilityResponse:
        peer_id = parse_uuid(request.peer_id, field_name="peer_id") if request.peer_id else None
        access.check_register(auth.current_claims.get(), peer_id)
        if peer_id is None:
            await self._registry.capabilities.undeploy_fleet(
                request.region or self._region, validate_capability(request.capability)
            )
        else:
            await self._refuse_config_row(peer_id, request.capability, "undeploy")
            await self._registry.capabilities.deregister(peer_id, request.capability)
        self._view.request_refresh()
        return compute_pb2.DeregisterCapabilityResponse()

    async def ListCapabilities(
        self, request: compute_pb2.ListCapabilitiesRequest, context: Context
    ) -> compute_pb2.ListCapabilitiesResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be between 0 and {MAX_PAGE_SIZE}")
        size = request.page_size or DEFAULT_PAGE_SIZE
        found = await self._registry.capabilities.find(
            capability=request.capability or None,
            region=request.region or None,
            live_only=request.live_only,
            after=_page_position(request.page_token),
            limit=size + 1,  # one more tells whether another page follows
        )
        more = len(found) > size
        found = found[:size]
        loads = await self._registry.capabilities.loads(sorted({c.peer_id for c in found}))
        return compute_pb2.ListCapabilitiesResponse(
            capabilities=[
                convert.capability_message(c, load=loads.get((c.peer_id, c.capability), (0, 0)))
                for c in found
            ],
            next_page_token=_page_token(found[-1].capability, found[-1].peer_id) if more else "",
        )

    async def SubmitJob(
        self, request: compute_pb2.SubmitJobRequest, context: Context
    ) -> compute_pb2.SubmitJobResponse:
        remaining = context.time_remaining()
        if remaining is not None and remaining < MIN_SUBMIT_BUDGET_S:
            # Too little time left to record the job and answer: refuse before
            # writing, rather than create a job the caller will never hear of.
            raise DeadlineExceeded(
                f"{remaining * 1000:.0f} ms left of the call's deadline; need at least "
                f"{MIN_SUBMIT_BUDGET_S * 1000:.0f} ms to record a job"
            )
        job_id = uuid.uuid4()
        for ref in request.inputs:
            parse_ref(ref)  # a malformed ref is refused before anything is written
        claims = auth.current_claims.get()
        access.check_submit(claims, request.capability)
        spec = JobSpec(
            capability=request.capability,
            region=request.region or self._region,
            timeout_ms=request.timeout_ms,
            inputs=tuple(request.inputs),
            params=dict(request.params),
            resources=dict(request.resources),
            locality_key=request.locality_key,
            idempotency_key=request.idempotency_key or None,
            max_attempts=request.max_attempts or DEFAULT_MAX_ATTEMPTS,
            submitted_by=access.tenant_of(claims),
            queue_timeout_ms=request.queue_timeout_ms,
        )
        if spec.idempotency_key is not None:
            # A retry of a submission that was recorded answers with that job even
            # if no peer could take a new one right now.
            earlier = await self._registry.jobs.find_idempotent(spec)
            if earlier is not None:
                return _submitted(earlier.job, existing=True)
        # The guest reads its inputs with its peer's rights: the caller must hold them.
        await access.check_inputs(claims, spec.inputs, self._registry.jobs.owner)
        key = locality_key(explicit=spec.locality_key, inputs=spec.inputs, job_id=job_id)
        placement = self._placer.choose(
            Wanted(
                capability=spec.capability,
                region=spec.region,
                resources=spec.resources,
                timeout_ms=spec.timeout_ms,
            ),
            key,
        )
        epoch = self._hub.epoch
        result = await self._registry.jobs.submit(
            spec,
            job_id=job_id,
            peer_id=placement.peer_id,
            locality_key=key,
            default_queue_timeout_ms=self._queue_timeout_ms,
        )
        job = result.job
        self._hub.publish(job, epoch=epoch)
        if not result.existing:
            self._placer.placed(placement, job.job_id, capability=spec.capability)
        elif job.peer_id is not None and not job.state.terminal:
            # A concurrent twin was recorded first: wake whoever holds it.
            self._placer.wake(job.peer_id, placement.address, job.job_id)
        return _submitted(job, existing=result.existing)

    async def GetJobStatus(
        self, request: compute_pb2.GetJobStatusRequest, context: Context
    ) -> compute_pb2.GetJobStatusResponse:
        job = await self._registry.jobs.get(parse_uuid(request.job_id, field_name="job_id"))
        return convert.job_status(access.visible_job(auth.current_claims.get(), job))

    async def CancelJob(
        self, request: compute_pb2.CancelJobRequest, context: Context
    ) -> compute_pb2.CancelJobResponse:
        job_id = parse_uuid(request.job_id, field_name="job_id")
        if len(request.reason) > 1024:
            raise InvalidArgument("reason longer than 1024 characters")
        # The owner never changes, so checking it before the cancel is no race.
        await self._visible_job(job_id)
        job = await self._registry.jobs.cancel(job_id, reason=request.reason or "cancelled")
        return compute_pb2.CancelJobResponse(state=convert.JOB_STATE_TO_PROTO[job.state])  # type: ignore[arg-type]

    async def WatchJob(
        self, request: compute_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[compute_pb2.WatchJobResponse]:
        job_id = parse_uuid(request.job_id, field_name="job_id")
        last: tuple[Any, ...] | None = None
        # Subscribe before the first look, so no change can slip in between.
        async with self._hub.watch(job_id) as watch:
            job = await self._visible_job(job_id)
            while True:
                # The error too: a queued job's reason for waiting changes with no
                # event (not a change of state); the backstop read brings it.
                seen = (job.state, job.attempt, job.peer_id, job.error)
                if seen != last:
                    last = seen
                    yield compute_pb2.WatchJobResponse(status=convert.job_status(job))
                if job.state.terminal:
                    return
                if await wait_set(watch.changed, WATCH_BACKSTOP_S):
                    job, read = watch.take(job)
                else:
                    read = True  # the backstop: a lost notification cannot stall a stream
                if read:
                    job = await self._registry.jobs.get(job_id)


def _submitted(job: Job, *, existing: bool) -> compute_pb2.SubmitJobResponse:
    return compute_pb2.SubmitJobResponse(
        job_id=str(job.job_id),
        peer_id=str(job.peer_id) if job.peer_id else "",
        existing=existing,
    )


def _page_token(capability: str, peer_id: uuid.UUID) -> str:
    """Where the next page starts: opaque to clients, just the last row's key."""
    return base64.urlsafe_b64encode(json.dumps([capability, str(peer_id)]).encode()).decode()


def _page_position(token: str) -> tuple[str, uuid.UUID] | None:
    if not token:
        return None
    try:
        capability, peer = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(capability), uuid.UUID(peer)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidArgument("page_token is not one this service gave out") from exc
