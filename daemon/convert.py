"""Conversions between protobuf messages and the daemon's value objects."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from daemon.exceptions import InvalidArgument
from daemon.jobs.state import JobState
from daemon.pb.anvil import compute_pb2
from daemon.registry.models import (
    SOURCE_FLEET,
    STATUS_PENDING,
    Capability,
    FleetDeployment,
    Job,
)

JOB_STATE_TO_PROTO: dict[JobState, int] = {
    JobState.QUEUED: compute_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: compute_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: compute_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: compute_pb2.JOB_STATE_FAILED,
    JobState.TIMED_OUT: compute_pb2.JOB_STATE_TIMED_OUT,
    JobState.CANCELLED: compute_pb2.JOB_STATE_CANCELLED,
}
assert set(JOB_STATE_TO_PROTO) == set(JobState)
PROTO_TO_JOB_STATE = {v: k for k, v in JOB_STATE_TO_PROTO.items()}


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def job_status(job: Job) -> compute_pb2.GetJobStatusResponse:
    response = compute_pb2.GetJobStatusResponse(
        job_id=str(job.job_id),
        state=JOB_STATE_TO_PROTO[job.state],  # type: ignore[arg-type]
        peer_id=str(job.peer_id) if job.peer_id else "",
        attempt=job.attempt,
        output=job.output or b"",
        output_refs=list(job.output_refs),
        error=job.error,
        capability=job.capability,
        region=job.region,
        max_attempts=job.max_attempts,
        bytes_fetched_remote=job.bytes_fetched_remote,
    )
    if job.exit_code is not None:
        response.exit_code = job.exit_code
    for field, value in (
        ("submitted_at", job.submitted_at),
        ("started_at", job.started_at),
        ("finished_at", job.finished_at),
    ):
        stamp = _timestamp(value)
        if stamp is not None:
            getattr(response, field).CopyFrom(stamp)
    return response


def executor_to_dict(executor: compute_pb2.Executor) -> dict[str, Any]:
    """The executor message as the JSON stored in the registry."""
    return json_format.MessageToDict(executor, preserving_proto_field_name=True)


def executor_from_dict(data: dict[str, Any]) -> compute_pb2.Executor:
    try:
        return json_format.ParseDict(data, compute_pb2.Executor())
    except json_format.ParseError as exc:
        raise InvalidArgument(f"bad executor description: {exc}") from exc


def capability_message(
    cap: Capability, *, load: tuple[int, int] = (0, 0)
) -> compute_pb2.Capability:
    """A registry row; `load`: its (queued, running) jobs."""
    queued, running = load
    return compute_pb2.Capability(
        peer_id=str(cap.peer_id),
        region=cap.region,
        capability=cap.capability,
        resources=dict(cap.resources),
        max_concurrency=cap.max_concurrency,
        executor=executor_from_dict(dict(cap.executor)),
        peer_live=cap.peer_live,
        status=cap.status,
        source=cap.source,
        queued_jobs=queued,
        running_jobs=running,
    )


def fleet_message(deployment: FleetDeployment) -> compute_pb2.Capability:
    """A deployment to every peer of a region: no peer of its own, pending until they check it."""
    return compute_pb2.Capability(
        region=deployment.region,
        capability=deployment.capability,
        resources=dict(deployment.resources),
        max_concurrency=deployment.max_concurrency,
        executor=executor_from_dict(dict(deployment.executor)),
        status=STATUS_PENDING,
        source=SOURCE_FLEET,
    )
