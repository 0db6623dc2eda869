"""The daemon's errors: one root, each carrying the gRPC status it maps to.

Every layer raises these (driver and library errors are translated at the
boundary with `raise ... from exc`); the gRPC server turns `code` into a status
in exactly one place (`daemon/status.py`).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """Mirrors the gRPC status codes we use, without importing grpc here."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    INTERNAL = "INTERNAL"


class AnvilError(Exception):
    """Root of every error the daemon raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL


class InvalidArgument(AnvilError):
    """The caller sent something malformed; retrying the same request cannot help."""

    code = ErrorCode.INVALID_ARGUMENT


class NotFound(AnvilError):
    code = ErrorCode.NOT_FOUND


class JobNotFound(NotFound):
    pass


class CapabilityNotFound(NotFound):
    pass


class ObjectNotFound(NotFound):
    pass


class AlreadyExists(AnvilError):
    code = ErrorCode.ALREADY_EXISTS


class IdempotencyConflict(AlreadyExists):
    """An idempotency key was reused with a different request."""


class FailedPrecondition(AnvilError):
    code = ErrorCode.FAILED_PRECONDITION


class NoCapablePeer(FailedPrecondition):
    """No live peer in the region registered the capability with the resources asked for."""


class JobAlreadyFinished(FailedPrecondition):
    """The job is in a terminal state; the first terminal write won."""


class StaleAttempt(FailedPrecondition):
    """A write came from an attempt that no longer owns the job (rescued, cancelled or re-run)."""


class ResourceExhausted(AnvilError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Unauthenticated(AnvilError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(AnvilError):
    code = ErrorCode.PERMISSION_DENIED


class DeadlineExceeded(AnvilError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Unavailable(AnvilError):
    code = ErrorCode.UNAVAILABLE


class RegistryUnavailable(Unavailable):
    """PostgreSQL could not be reached or dropped the connection."""


class DataLoss(AnvilError):
    code = ErrorCode.DATA_LOSS


class DigestMismatch(DataLoss):
    """Bytes did not match the digest they were expected to have."""


class ConfigError(AnvilError):
    """A setting is unknown or has a bad value; the message names the key."""

    code = ErrorCode.INVALID_ARGUMENT


class InvalidModule(InvalidArgument):
    """Bytes that are not a runnable WASI command (not wasm, unknown import, no `_start`)."""
