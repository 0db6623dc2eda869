"""Who may act on what: a tenant's own jobs, the buckets its scopes name, registry rows.

Every RPC handler asks here, so each rule is written once. Three kinds of
caller (SECURITY.md): tenants (their own jobs, the objects their scopes name,
the outputs of their jobs), operators (`compute:register`, `compute:admin`:
every job, every registry row) and peers (a `peer:<uuid>` token: objects for
the fabric, their own registry rows). `claims` None means authentication was
switched off explicitly: everyone may do everything.

Another tenant's job, and its result objects, are NOT_FOUND rather than
PERMISSION_DENIED: a tenant does not learn which job ids exist.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable

from daemon import auth
from daemon.auth import Claims
from daemon.exceptions import JobNotFound, NotFound, ObjectNotFound, PermissionDenied
from daemon.registry.models import Job
from daemon.storage.refs import Scheme, parse_ref

# Where runners store the outputs of jobs: `<job id>/<attempt>/...`. Written by
# peers only; read by the job's submitter, operators and peers.
RESULTS_BUCKET = "anvil-results"

# job id -> the tenant that submitted it (None: no such job).
OwnerLookup = Callable[[uuid.UUID], Awaitable[str | None]]


def tenant_of(claims: Claims | None) -> str:
    """Whose jobs the caller's are ('' with authentication off)."""
    return "" if claims is None else claims.tenant


def sees_job(claims: Claims | None, job: Job) -> bool:
    return claims is None or claims.is_admin or job.submitted_by == claims.tenant


def visible_job(claims: Claims | None, job: Job) -> Job:
    """`job`, if the caller may see it. Raises JobNotFound, worded like a missing job."""
    if not sees_job(claims, job):
        raise JobNotFound(f"job {job.job_id} not found")
    return job


def check_submit(claims: Claims | None, capability: str) -> None:
    """Raises PermissionDenied unless the caller may submit jobs to `capability`."""
    if claims is not None and not claims.allows(auth.SCOPE_SUBMIT, capability):
        raise PermissionDenied(f"token for {claims.sub!r} may not submit to {capability!r}")


def check_register(claims: Claims | None, peer_id: uuid.UUID | None) -> None:
    """Operators register for any peer (None: for every peer of a region); a peer
    only for itself. Raises PermissionDenied."""
    if claims is None or claims.allows(auth.SCOPE_REGISTER):
        return
    if peer_id is None:
        raise PermissionDenied(
            f"token for {claims.sub!r} may not deploy to a whole region: that takes an "
            "operator token (compute:register)"
        )
    if claims.peer_id != str(peer_id):
        raise PermissionDenied(
            f"token for {claims.sub!r} may not change the registry rows of peer {peer_id}: "
            "that takes an operator token (compute:register) or the peer's own"
        )


def result_job_id(key: str) -> uuid.UUID | None:
    """The job whose output `key` (in RESULTS_BUCKET) is, if it is one."""
    head = key.partition("/")[0]
    try:
        return uuid.UUID(head)
    except ValueError:
        return None


async def check_read(claims: Claims | None, bucket: str, key: str, owner_of: OwnerLookup) -> None:
    """Raises PermissionDenied (bucket not in the caller's scopes) or ObjectNotFound
    (another tenant's job output) unless the caller may read `bucket/key`."""
    if claims is None or claims.peer_id is not None:
        return
    if bucket == RESULTS_BUCKET:
        if claims.is_admin:
            return
        job_id = result_job_id(key)
        owner = await owner_of(job_id) if job_id is not None else None
        if owner is not None and owner == claims.tenant:
            return
        raise ObjectNotFound(f"object {bucket}/{key} not found")
    if not claims.allows(auth.SCOPE_OBJECT_READ, f"{bucket}/{key}"):
        raise PermissionDenied(f"token for {claims.sub!r} may not read {bucket}/{key}")


def check_write(claims: Claims | None, bucket: str, key: str) -> None:
    """Raises PermissionDenied unless the caller may write `bucket/key`."""
    if claims is None or claims.peer_id is not None:
        return
    if bucket == RESULTS_BUCKET:
        raise PermissionDenied(f"{RESULTS_BUCKET} holds job outputs: only peers write there")
    if not claims.allows(auth.SCOPE_OBJECT_WRITE, f"{bucket}/{key}"):
        raise PermissionDenied(f"token for {claims.sub!r} may not write {bucket}/{key}")


async def check_inputs(claims: Claims | None, refs: Iterable[str], owner_of: OwnerLookup) -> None:
    """A job reads its inputs with its peer's rights: its submitter must hold them itself.

    `sha256:` refs name bytes wherever they are stored, so they take read rights
    on every bucket. Raises PermissionDenied or NotFound, InvalidArgument (bad ref).
    """
    if claims is None:
        return
    for text in refs:
        ref = parse_ref(text)
        if ref.scheme is Scheme.SHA256:
            if not claims.allows(auth.SCOPE_OBJECT_READ):
                raise PermissionDenied(
                    f"token for {claims.sub!r} may not read {text}: a sha256: input needs "
                    "object:read on every bucket; name the object by anvil://BUCKET/KEY"
                )
            continue
        try:
            await check_read(claims, ref.bucket, ref.key, owner_of)
        except NotFound as exc:
            raise NotFound(f"input {text}: {exc}") from exc
