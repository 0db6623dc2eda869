import uuid
from datetime import timedelta

from daemon.jobs.state import JobState
from daemon.registry import Registry
from daemon.registry.models import AttemptResult, JobSpec


async def test_submit_claim_finish_round_trip(registry: Registry) -> None:
    peer = uuid.uuid4()
    result = await registry.jobs.submit(
        JobSpec(capability="text:wordcount", region="local", timeout_ms=1000), peer_id=peer
    )
    assert result.job.state is JobState.QUEUED
    job = await registry.jobs.claim(result.job.job_id, peer, lease=timedelta(seconds=5))
    assert job is not None and job.attempt == 1
    done = await registry.jobs.finish(
        job.job_id,
        peer_id=peer,
        attempt=1,
        outcome=AttemptResult(state=JobState.SUCCEEDED, output=b"x"),
    )
    assert done.state is JobState.SUCCEEDED and done.output == b"x"
