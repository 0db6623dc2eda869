"""Frozen value objects passed between the registry and the rest of the daemon."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from daemon import resources as resources_mod
from daemon.exceptions import InvalidArgument
from daemon.jobs.state import JobState

# Capability names: lowercase words joined by ':' (`text:wordcount`,
# `video:transcode:h264`); also '-', '_', '.' inside a word.
CAPABILITY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9][a-z0-9._-]*)*$")
REGION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_CAPABILITY_LENGTH = 128
MAX_INPUTS = 256
MAX_PARAMS = 128
MAX_PARAM_BYTES = 64 * 1024
MAX_IDEMPOTENCY_KEY = 256
MAX_LOCALITY_KEY = 1024
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000
# How long a job may wait queued for a peer before it fails: the operator's
# default (queue_timeout_s) and the most a job may ask for.
DEFAULT_QUEUE_TIMEOUT_MS = 24 * 3600 * 1000
MAX_QUEUE_TIMEOUT_MS = 30 * 24 * 3600 * 1000
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_LIMIT = 100
# A registered executor description, as stored (JSON): a module ref or an
# image, a command, limits. Bounded so that no registration can make a
# ListCapabilities page too large to send.
MAX_EXECUTOR_BYTES = 16 * 1024
MAX_MODULE_REF = 2048
MAX_IMAGE_REF = 1024
MAX_COMMAND_ARGS = 64
MAX_COMMAND_ARG = 4096
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def parse_uuid(value: str | uuid.UUID, *, field_name: str) -> uuid.UUID:
    """Parse a UUID; raise InvalidArgument naming the field when malformed."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError) as exc:
        raise InvalidArgument(f"{field_name}: {value!r} is not a UUID") from exc


def validate_capability(name: str) -> str:
    if not name:
        raise InvalidArgument("capability must not be empty")
    if len(name) > MAX_CAPABILITY_LENGTH or not CAPABILITY_RE.match(name):
        raise InvalidArgument(
            f"capability {name!r} must be lowercase words joined by ':' "
            f"(e.g. 'text:wordcount'), at most {MAX_CAPABILITY_LENGTH} characters"
        )
    return name


def validate_region(region: str) -> str:
    if not REGION_RE.match(region):
        raise InvalidArgument(f"region {region!r} must be 1..63 letters, digits, '.', '_' or '-'")
    return region


def validate_executor(executor: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of a registered executor description; raise InvalidArgument naming
    the bad field. Empty is allowed (a row registered without one)."""
    executor = dict(executor)
    if len(json.dumps(executor, separators=(",", ":"))) > MAX_EXECUTOR_BYTES:
        raise InvalidArgument(f"executor description larger than {MAX_EXECUTOR_BYTES} bytes")
    kinds = [k for k in ("wasm", "podman") if k in executor]
    if len(kinds) > 1:
        raise InvalidArgument("executor: set one of wasm or podman")
    wasm = executor.get("wasm")
    if isinstance(wasm, Mapping):
        ref = str(wasm.get("module_ref", ""))
        if not ref or len(ref) > MAX_MODULE_REF:
            raise InvalidArgument(
                f"executor.wasm.module_ref must be 1..{MAX_MODULE_REF} characters"
            )
        digest = str(wasm.get("module_sha256", ""))
        if digest and not _SHA256_HEX.fullmatch(digest):
            raise InvalidArgument("executor.wasm.module_sha256 must be 64 lowercase hex digits")
    podman = executor.get("podman")
    if isinstance(podman, Mapping):
        image = str(podman.get("image", ""))
        if not image or len(image) > MAX_IMAGE_REF:
            raise InvalidArgument(f"executor.podman.image must be 1..{MAX_IMAGE_REF} characters")
        command = podman.get("command", [])
        if not isinstance(command, list) or len(command) > MAX_COMMAND_ARGS:
            raise InvalidArgument(f"executor.podman.command: at most {MAX_COMMAND_ARGS} arguments")
        if any(not isinstance(a, str) or len(a) > MAX_COMMAND_ARG for a in command):
            raise InvalidArgument(
                f"executor.podman.command: arguments of at most {MAX_COMMAND_ARG} characters"
            )
    return executor


# Where a capability row came from (capability_executors.source).
SOURCE_CONFIG, SOURCE_DEPLOYED, SOURCE_FLEET = "config", "deployed", "fleet"
STATUS_PENDING, STATUS_READY = "pending", "ready"
MAX_STATUS = 512


def failed_status(reason: str) -> str:
    """The status of a deployed row whose module the peer could not run."""
    return ("failed: " + " ".join(reason.split()))[:MAX_STATUS]


@dataclass(frozen=True, kw_only=True, slots=True)
class CapabilitySpec:
    """What a peer registers: validated on construction."""

    peer_id: uuid.UUID
    region: str
    capability: str
    resources: Mapping[str, str] = field(default_factory=dict)
    max_concurrency: int = 1
    executor: Mapping[str, Any] = field(default_factory=dict)
    source: str = SOURCE_CONFIG
    status: str = STATUS_READY

    def __post_init__(self) -> None:
        validate_capability(self.capability)
        validate_region(self.region)
        if not 1 <= self.max_concurrency <= 100_000:
            raise InvalidArgument(
                f"max_concurrency must be between 1 and 100000, got {self.max_concurrency}"
            )
        object.__setattr__(self, "resources", resources_mod.validate(self.resources))
        object.__setattr__(self, "executor", validate_executor(self.executor))
        if self.source not in (SOURCE_CONFIG, SOURCE_DEPLOYED, SOURCE_FLEET):
            raise InvalidArgument(f"unknown capability source {self.source!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class FleetDeployment:
    """A capability deployed to every live peer of a region, now and later."""

    region: str
    capability: str
    resources: Mapping[str, str]
    max_concurrency: int
    executor: Mapping[str, Any]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> FleetDeployment:
        return cls(
            region=row["region"],
            capability=row["capability"],
            resources=dict(row["resources"] or {}),
            max_concurrency=row["max_concurrency"],
            executor=dict(row["executor"] or {}),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Capability:
    peer_id: uuid.UUID
    region: str
    capability: str
    resources: Mapping[str, str]
    max_concurrency: int
    executor: Mapping[str, Any]
    peer_address: str | None = None
    peer_live: bool = False
    source: str = SOURCE_CONFIG
    # 'ready' rows attract jobs; a deployed row is 'pending' until its peer has
    # checked the module, or 'failed: <reason>'.
    status: str = STATUS_READY

    @property
    def timeout_ms(self) -> int:
        """The registered per-run timeout (0: none): a job may only lower it."""
        for body in self.executor.values():
            if isinstance(body, Mapping):
                limits = body.get("limits")
                if isinstance(limits, Mapping):
                    try:
                        return int(limits.get("timeout_ms", 0))
                    except (TypeError, ValueError):
                        return 0
        return 0

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Capability:
        return cls(
            peer_id=row["peer_id"],
            region=row["region"],
            capability=row["capability"],
            resources=dict(row["resources"] or {}),
            max_concurrency=row["max_concurrency"] or 1,
            executor=dict(row.get("executor") or {}),
            peer_address=row.get("address"),
            peer_live=bool(row.get("peer_live", False)),
            source=row.get("source") or SOURCE_CONFIG,
            status=row.get("status") or STATUS_READY,
        )

    @property
    def ready(self) -> bool:
        return self.status == STATUS_READY


class Terms(Protocol):
    """What a registration says about how a capability runs (a row, a spec, a deployment)."""

    @property
    def executor(self) -> Mapping[str, Any]: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def resources(self) -> Mapping[str, str]: ...


def same_terms(a: Terms, b: Terms) -> bool:
    """Whether two registrations run a capability alike: the same executor,
    concurrency and resources."""
    return (
        dict(a.executor) == dict(b.executor)
        and a.max_concurrency == b.max_concurrency
        and dict(a.resources) == dict(b.resources)
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Peer:
    peer_id: uuid.UUID
    address: str
    region: str
    state: str
    version: str
    started_at: datetime
    heartbeat_at: datetime
    live: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Peer:
        return cls(
            peer_id=row["peer_id"],
            address=row["address"],
            region=row["region"],
            state=row["state"],
            version=row["version"],
            started_at=row["started_at"],
            heartbeat_at=row["heartbeat_at"],
            live=bool(row.get("live", False)),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    """A job as submitted: validated on construction, before any I/O."""

    capability: str
    region: str
    timeout_ms: int
    inputs: tuple[str, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    resources: Mapping[str, str] = field(default_factory=dict)
    locality_key: str = ""
    idempotency_key: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    submitted_by: str = ""
    # How long it may wait queued for a peer before it fails; 0: the operator's
    # default (queue_timeout_s of the peer that records it).
    queue_timeout_ms: int = 0

    def __post_init__(self) -> None:
        validate_capability(self.capability)
        validate_region(self.region)
        if not 0 <= self.timeout_ms <= MAX_TIMEOUT_MS:
            raise InvalidArgument(
                f"timeout_ms must be between 0 (the capability's default) and "
                f"{MAX_TIMEOUT_MS}, got {self.timeout_ms}"
            )
        if not 0 <= self.queue_timeout_ms <= MAX_QUEUE_TIMEOUT_MS:
            raise InvalidArgument(
                f"queue_timeout_ms must be between 0 (the operator's default) and "
                f"{MAX_QUEUE_TIMEOUT_MS}, got {self.queue_timeout_ms}"
            )
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise InvalidArgument(
                f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {self.max_attempts}"
            )
        if len(self.inputs) > MAX_INPUTS:
            raise InvalidArgument(f"at most {MAX_INPUTS} inputs, got {len(self.inputs)}")
        if any(not ref for ref in self.inputs):
            raise InvalidArgument("inputs must not contain an empty reference")
        if len(self.params) > MAX_PARAMS:
            raise InvalidArgument(f"at most {MAX_PARAMS} params, got {len(self.params)}")
        if sum(len(k) + len(v) for k, v in self.params.items()) > MAX_PARAM_BYTES:
            raise InvalidArgument(f"params larger than {MAX_PARAM_BYTES} bytes")
        if any(not k or "\x00" in k or "\x00" in v for k, v in self.params.items()):
            raise InvalidArgument("param names must be non-empty and params free of NUL bytes")
        if len(self.locality_key) > MAX_LOCALITY_KEY:
            raise InvalidArgument(f"locality_key longer than {MAX_LOCALITY_KEY}")
        if self.idempotency_key is not None and not (
            0 < len(self.idempotency_key) <= MAX_IDEMPOTENCY_KEY
        ):
            raise InvalidArgument(f"idempotency_key must be 1..{MAX_IDEMPOTENCY_KEY} characters")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "resources", resources_mod.validate(self.resources))

    def request_sha256(self) -> str:
        """Digest of what the job asks for; a reused idempotency key must match it."""
        canonical = {
            "capability": self.capability,
            "region": self.region,
            "inputs": list(self.inputs),
            "params": dict(sorted(self.params.items())),
            "resources": dict(sorted(self.resources.items())),
            "locality_key": self.locality_key,
            "timeout_ms": self.timeout_ms,
            "max_attempts": self.max_attempts,
        }
        if self.queue_timeout_ms:
            # Only when asked for: a request that leaves it to the operator
            # digests as it did before the field existed, so its retries match.
            canonical["queue_timeout_ms"] = self.queue_timeout_ms
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    job_id: uuid.UUID
    capability: str
    region: str
    inputs: tuple[str, ...]
    params: Mapping[str, str]
    resources: Mapping[str, str]
    locality_key: str
    idempotency_key: str | None
    timeout_ms: int
    max_attempts: int
    submitted_by: str
    state: JobState
    peer_id: uuid.UUID | None
    attempt: int
    lease_expires_at: datetime | None
    output: bytes | None
    output_refs: tuple[str, ...]
    error: str
    exit_code: int | None
    bytes_fetched_remote: int
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    # The next attempt may not be claimed before this (backoff after a rescue).
    run_after: datetime
    # It fails (no peer ran it) once queued this long since it was last queued.
    queue_timeout_ms: int
    queued_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        return cls(
            job_id=row["job_id"],
            capability=row["capability"],
            region=row["region"],
            inputs=tuple(row["inputs"]),
            params=dict(row["params"]),
            resources=dict(row["resources"]),
            locality_key=row["locality_key"],
            idempotency_key=row["idempotency_key"],
            timeout_ms=row["timeout_ms"],
            max_attempts=row["max_attempts"],
            submitted_by=row["submitted_by"],
            state=JobState(row["state"]),
            peer_id=row["peer_id"],
            attempt=row["attempt"],
            lease_expires_at=row["lease_expires_at"],
            output=bytes(row["output"]) if row["output"] is not None else None,
            output_refs=tuple(row["output_refs"]),
            error=row["error"],
            exit_code=row["exit_code"],
            bytes_fetched_remote=row["bytes_fetched_remote"],
            submitted_at=row["submitted_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            updated_at=row["updated_at"],
            run_after=row["run_after"],
            queue_timeout_ms=row["queue_timeout_ms"],
            queued_at=row["queued_at"],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class SubmitResult:
    job: Job
    existing: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class AttemptResult:
    """How an attempt ended, as the running peer reports it."""

    state: JobState
    output: bytes | None = None
    output_refs: tuple[str, ...] = ()
    error: str = ""
    exit_code: int | None = None
    bytes_fetched_remote: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class JobEvent:
    event_id: int
    job_id: uuid.UUID
    at: datetime
    attempt: int
    from_state: JobState | None
    to_state: JobState
    peer_id: uuid.UUID | None
    detail: str

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobEvent:
        return cls(
            event_id=row["event_id"],
            job_id=row["job_id"],
            at=row["at"],
            attempt=row["attempt"],
            from_state=JobState(row["from_state"]) if row["from_state"] else None,
            to_state=JobState(row["to_state"]),
            peer_id=row["peer_id"],
            detail=row["detail"],
        )
