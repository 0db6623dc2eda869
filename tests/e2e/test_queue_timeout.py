"""Jobs never wait silently forever: real peers, a job whose only capable peer leaves."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from daemon.convert import PROTO_TO_JOB_STATE
from daemon.jobs.state import JobState
from daemon.pb.anvil import compute_pb2
from tests.e2e.cluster import PeerFactory
from tests.e2e.guests import SLEEP_WAT, examples_config, write_guest
from tests.e2e.test_cli import cli
from tests.eventually import eventually

pytestmark = pytest.mark.e2e

NO_PEER = "no live peer in region 'local' has registered capability 'test:long'"
WAITING = "waiting for a peer: " + NO_PEER


def state(status: compute_pb2.GetJobStatusResponse) -> JobState:
    return PROTO_TO_JOB_STATE[status.state]


def queue_timeout_error(seconds: int) -> re.Pattern[str]:
    return re.compile(
        rf"no peer ran this job within its queue timeout of {seconds} s "
        rf"\(queued since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ\): {re.escape(NO_PEER)}"
    )


@pytest.mark.timeout(240)
async def test_a_job_whose_only_capable_peer_left_fails_at_its_queue_timeout(
    peers: PeerFactory, tmp_path: Path
) -> None:
    long = write_guest(tmp_path, "long", SLEEP_WAT.replace("NANOS", str(30 * 10**9)))
    only = await asyncio.to_thread(
        peers.start,
        config=f'[capabilities."test:long"]\nwasm = "{long}"\nmax_concurrency = 2\n',
        ANVIL_DRAIN_GRACE_S="0.5",
    )
    other = await asyncio.to_thread(peers.start, config=examples_config())
    await asyncio.to_thread(peers.wait_converged, [only, other])

    refused = await asyncio.to_thread(cli, other, "submit", "test:long", "--queue-timeout", "-1")
    assert refused.returncode == 1 and "--queue-timeout -1" in refused.stderr, refused.stderr
    async with other.client() as client:
        watched = (await client.submit("test:long", queue_timeout_ms=12_000)).job_id
        submitted = await asyncio.to_thread(
            cli, other, "submit", "test:long", "--queue-timeout", "12"
        )
        assert submitted.returncode == 0, submitted.stderr
        by_cli = submitted.stdout.strip()

        async def both_run_on_the_only_capable_peer() -> bool:
            found = [await client.status(i) for i in (watched, by_cli)]
            seen = [(state(s), s.peer_id) for s in found]
            assert seen == [(JobState.RUNNING, only.peer_id)] * 2, seen
            return True

        await eventually(both_run_on_the_only_capable_peer, timeout=30)

        statuses: list[compute_pb2.GetJobStatusResponse] = []

        async def follow() -> None:
            async for status in client.watch(watched):
                statuses.append(status)

        following = asyncio.create_task(follow())
        # It hands both back (drain grace 0.5 s) and its capability goes with it.
        assert await asyncio.to_thread(only.terminate, 60) == 0

        async def says_why_it_waits() -> bool:
            status = await client.status(by_cli)
            assert (state(status), status.error) == (JobState.QUEUED, WAITING), status
            return True

        await eventually(says_why_it_waits, timeout=10)
        shown = await asyncio.to_thread(cli, other, "status", by_cli)
        assert json.loads(shown.stdout)["error"] == WAITING, shown.stdout

        # The CLI's watch follows it to its end: FAILED, 12 s after it was handed back.
        ended = await asyncio.to_thread(cli, other, "watch", by_cli)
        assert ended.returncode == 1, ended.stdout + ended.stderr
        assert f"QUEUED     attempt 1: {WAITING}" in ended.stdout, ended.stdout
        assert re.search(rf"job {by_cli} FAILED: " + queue_timeout_error(12).pattern, ended.stderr)
        await asyncio.wait_for(following, 30)

    final = statuses[-1]
    assert (state(final), final.attempt) == (JobState.FAILED, 1), final
    assert queue_timeout_error(12).fullmatch(final.error), final.error
    # The watch showed the reason while the job waited: an error-only change,
    # read by the stream's backstop, not announced as a change of state.
    waits = [s.error for s in statuses if state(s) is JobState.QUEUED]
    assert WAITING in waits, [(state(s), s.error) for s in statuses]
