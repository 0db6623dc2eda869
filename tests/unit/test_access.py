"""Who may act on what (daemon/access.py) and the scope grammar under it (daemon/auth.py)."""

from __future__ import annotations

import dataclasses
import uuid

import jwt
import pytest

from daemon import access, auth
from daemon.exceptions import InvalidArgument, JobNotFound, ObjectNotFound, PermissionDenied
from daemon.jobs.state import JobState
from tests.unit.test_watch import job as watched_job

SECRET = b"s" * 40


def claims(sub: str, *scopes: str, tenant: str = "") -> auth.Claims:
    return auth.Claims(sub=sub, scopes=frozenset(scopes), exp=2**40, tenant=tenant)


@pytest.mark.parametrize(
    ("granted", "action", "resource", "allowed"),
    [
        ("object:read", "object:read", "b/k", True),
        ("object:read|*", "object:read", "b/k", True),
        ("object:read|b/*", "object:read", "b/k", True),
        ("object:read|b/*", "object:read", "bb/k", False),
        ("object:read|b/pre*", "object:read", "b/prefix/x", True),
        ("object:read|b/pre*", "object:read", "b/other", False),
        ("object:read|b/k", "object:read", "b/k", True),
        ("object:read|b/k", "object:read", "b/k2", False),
        ("object:read|b/*", "object:write", "b/k", False),
        ("object:*|b/*", "object:write", "b/k", True),
        ("object:*", "compute:read", "*", False),
        ("*", "compute:register", "*", True),
        ("*|*", "compute:register", "*", True),
        # A scope bound to some resources does not grant "everything".
        ("object:read|b/*", "object:read", "*", False),
        ("compute:submit|text:*", "compute:submit", "text:wordcount", True),
        ("compute:submit|text:*", "compute:submit", "data:csv", False),
        ("compute:*", "compute:admin", "*", True),
    ],
)
def test_scopes_match_as_anvil_spells_them(
    granted: str, action: str, resource: str, allowed: bool
) -> None:
    assert claims("x", granted).allows(action, resource) is allowed


def test_a_bound_scope_still_opens_the_door() -> None:
    c = claims("x", "object:read|photos/*")
    assert c.has_action("object:read") and not c.has_action("object:write")


@pytest.mark.parametrize("text", ["", "|b/*", "object:read|", "object:read|a\nb"])
def test_malformed_scopes_are_refused_when_issued(text: str) -> None:
    with pytest.raises(InvalidArgument):
        auth.issue_token(SECRET, sub="x", scopes=[text], ttl_s=60)


def test_unreadable_scopes_in_a_token_grant_nothing() -> None:
    assert not claims("x", "object:read|").has_action("object:read")


def test_the_tenant_is_the_tenant_claim_else_the_subject() -> None:
    token = auth.issue_token(SECRET, sub="app-1", scopes=[], ttl_s=60, tenant="acme")
    assert auth.verify_token(token, SECRET).tenant == "acme"
    token = auth.issue_token(SECRET, sub="app-1", scopes=[], ttl_s=60)
    assert auth.verify_token(token, SECRET).tenant == "app-1"
    # Anvil's own tokens name the tenant by number.
    anvil = jwt.encode({"sub": "app", "exp": 2**40, "scopes": [], "tenant_id": 7}, SECRET)
    assert auth.verify_token(anvil, SECRET).tenant == "anvil-tenant:7"


def test_peers_are_known_by_subject_and_scope() -> None:
    peer = uuid.uuid4()
    assert claims(f"peer:{peer}", auth.SCOPE_PEER).peer_id == str(peer)
    assert claims(f"peer:{peer}", auth.SCOPE_READ).peer_id is None
    assert claims("alice", auth.SCOPE_PEER).peer_id is None


def test_registration_is_for_operators_or_the_peer_itself() -> None:
    peer = uuid.uuid4()
    access.check_register(claims("op", auth.SCOPE_REGISTER), peer)
    access.check_register(claims(f"peer:{peer}", auth.SCOPE_PEER), peer)
    access.check_register(None, peer)  # authentication off
    for caller in (
        claims(f"peer:{uuid.uuid4()}", auth.SCOPE_PEER),
        claims("alice", *auth.CLIENT_SCOPES),
    ):
        with pytest.raises(PermissionDenied):
            access.check_register(caller, peer)


async def test_result_objects_belong_to_the_jobs_submitter() -> None:
    job = uuid.uuid4()
    owners = {job: "alice"}

    async def owner_of(job_id: uuid.UUID) -> str | None:
        return owners.get(job_id)

    key = f"{job}/1/stdout"
    await access.check_read(claims("alice", auth.SCOPE_READ), access.RESULTS_BUCKET, key, owner_of)
    await access.check_read(claims("op", auth.SCOPE_ADMIN), access.RESULTS_BUCKET, key, owner_of)
    await access.check_read(
        claims(f"peer:{uuid.uuid4()}", auth.SCOPE_PEER), access.RESULTS_BUCKET, key, owner_of
    )
    for caller, result_key in (
        (claims("mallory", *auth.CLIENT_SCOPES), key),
        (claims("alice", auth.SCOPE_READ, tenant="other"), key),
        (claims("alice", auth.SCOPE_READ), f"{uuid.uuid4()}/1/stdout"),
        (claims("alice", auth.SCOPE_READ), "not-a-job/1/stdout"),
    ):
        with pytest.raises(ObjectNotFound):
            await access.check_read(caller, access.RESULTS_BUCKET, result_key, owner_of)
    with pytest.raises(PermissionDenied):
        access.check_write(claims("alice", *auth.OPERATOR_SCOPES), access.RESULTS_BUCKET, key)
    access.check_write(claims(f"peer:{job}", *auth.PEER_SCOPES), access.RESULTS_BUCKET, key)


def test_a_job_is_visible_to_its_tenant_and_operators_only() -> None:
    job = dataclasses.replace(watched_job(JobState.QUEUED, 0), submitted_by="alice")
    assert access.visible_job(claims("alice", auth.SCOPE_READ), job) is job
    assert access.visible_job(claims("root", auth.SCOPE_ADMIN), job) is job
    with pytest.raises(JobNotFound, match=f"job {job.job_id} not found"):
        access.visible_job(claims("bob", auth.SCOPE_READ), job)
