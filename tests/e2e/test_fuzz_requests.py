"""Hypothesis-generated requests against a live daemon: answered with a status, never a crash."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.pb.anvil import compute_pb2, compute_pb2_grpc
from tests.e2e.cluster import Peer, PeerFactory, free_port, wait_serving
from tests.e2e.guests import examples_config

pytestmark = pytest.mark.e2e

# What a well-behaved server may answer to arbitrary input; INTERNAL or UNKNOWN
# would mean an unhandled error inside the daemon.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}

text = st.text(max_size=40)
refs = st.one_of(
    text,
    st.builds(lambda b, k: f"anvil://{b}/{k}", text, text),
    st.builds(lambda h: f"sha256:{h}", st.text("0123456789abcdef", max_size=70)),
)
submits = st.builds(
    compute_pb2.SubmitJobRequest,
    capability=st.one_of(text, st.sampled_from(["text:wordcount", "TEXT", "a:", ":b"])),
    region=st.one_of(text, st.just("local")),
    inputs=st.lists(refs, max_size=4),
    params=st.dictionaries(text, text, max_size=4),
    locality_key=text,
    idempotency_key=text,
    timeout_ms=st.integers(0, 2**64 - 1),
    resources=st.dictionaries(text, text, max_size=3),
    max_attempts=st.integers(0, 2**32 - 1),
    queue_timeout_ms=st.integers(0, 2**64 - 1),
)
ids = st.one_of(text, st.uuids().map(str))


@pytest.fixture(scope="module")
def live_peer(tmp_path_factory: pytest.TempPathFactory, pg_server_url: str) -> Iterator[Peer]:
    import psycopg
    from psycopg import sql

    root = tmp_path_factory.mktemp("fuzz")
    name = f"anvil_fuzz_{free_port()}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(pg_server_url, dbname=name)
    secret = root / "secret"
    secret.write_text("fuzz-secret-" + "y" * 40)
    factory = PeerFactory(root, url, secret)
    peer = factory.start(config=examples_config(), ANVIL_DEFAULT_TIMEOUT_MS="5000")
    yield peer
    factory.stop_all()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=submits, job_id=ids)
def test_random_requests_get_a_proper_status(
    live_peer: Peer, request: compute_pb2.SubmitJobRequest, job_id: str
) -> None:
    metadata = (("authorization", f"Bearer {live_peer.token}"),)
    with grpc.insecure_channel(live_peer.address) as channel:
        stub = compute_pb2_grpc.ComputeServiceStub(channel)
        calls = [
            lambda: stub.SubmitJob(request, metadata=metadata, timeout=10),
            lambda: stub.GetJobStatus(
                compute_pb2.GetJobStatusRequest(job_id=job_id), metadata=metadata, timeout=10
            ),
            lambda: stub.CancelJob(
                compute_pb2.CancelJobRequest(job_id=job_id, reason=request.region),
                metadata=metadata,
                timeout=10,
            ),
            lambda: stub.ListCapabilities(
                compute_pb2.ListCapabilitiesRequest(
                    capability=request.capability, region=request.region
                ),
                metadata=metadata,
                timeout=10,
            ),
        ]
        answers = []
        for call in calls:
            try:
                call()
                answers.append((grpc.StatusCode.OK, ""))
            except grpc.RpcError as exc:
                answers.append((exc.code(), exc.details()))
    unexpected = [(code, details) for code, details in answers if code not in EXPECTED]
    assert not unexpected
    assert live_peer.process.poll() is None, "the daemon died"


def test_server_still_healthy_after_fuzzing(live_peer: Peer) -> None:
    wait_serving(live_peer.address, live_peer.process, live_peer.log_path)
    assert "unhandled error" not in live_peer.log()
