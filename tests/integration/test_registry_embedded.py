"""The embedded PostgreSQL (pgserver): a clean stop stops it, even after a user was kill -9'd."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.eventually import eventually

# A process that uses the embedded server like a daemon does: starts (or joins)
# it, prints its URL, then, with "hold", waits for stdin to close before closing.
USER = """
import sys
from pathlib import Path
from daemon.registry.embedded import EmbeddedPostgres
pg = EmbeddedPostgres(Path(sys.argv[1]))
print(pg.start(), flush=True)
if sys.argv[2] == "hold":
    sys.stdin.read()
pg.close()
"""


class User:
    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url

    async def kill(self) -> None:
        self.process.kill()
        await self.process.wait()

    async def leave(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert await asyncio.wait_for(self.process.wait(), 60) == 0


async def use(pgdata: Path, mode: str) -> User:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        USER,
        str(pgdata),
        mode,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    url = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().strip()
    assert url.startswith("postgresql://"), url
    if mode != "hold":
        assert await asyncio.wait_for(process.wait(), 60) == 0
    return User(process, url)


def postmasters(pgdata: Path) -> list[int]:
    """Pids of the PostgreSQL servers running on `pgdata`."""
    target = str(pgdata.resolve())
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "postgres" and target in (proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


@pytest.fixture
async def pgdata(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "pg"
    yield path
    for pid in postmasters(path):  # whatever a failing test left running: fast shutdown
        psutil.Process(pid).send_signal(signal.SIGINT)


async def test_a_clean_stop_after_a_kill_9_stops_the_server(pgdata: Path) -> None:
    killed = await use(pgdata, "hold")
    assert postmasters(pgdata)
    await killed.kill()
    assert postmasters(pgdata), "the server outlives a killed user"
    after = await use(pgdata, "start-and-stop")
    assert after.url == killed.url
    await eventually(lambda: not postmasters(pgdata), timeout=15)
    # And it starts again from the same directory.
    again = await use(pgdata, "start-and-stop")
    assert again.url == killed.url
    await eventually(lambda: not postmasters(pgdata), timeout=15)


async def test_a_reused_pid_does_not_keep_the_server_up(pgdata: Path) -> None:
    killed = await use(pgdata, "hold")
    await killed.kill()
    # The killed user's pid now belongs to a stranger: a live process that
    # started at another time than the one recorded for that pid.
    stranger = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        pids = pgdata / ".handle_pids.json"
        starts = pgdata / ".anvil_handle_pids.json"
        recorded = json.loads(starts.read_text())[str(killed.process.pid)]
        pids.write_text(json.dumps([stranger.pid]))
        starts.write_text(json.dumps({str(stranger.pid): recorded}))
        await use(pgdata, "start-and-stop")
        await eventually(lambda: not postmasters(pgdata), timeout=15)
    finally:
        stranger.kill()
        await stranger.wait()


async def test_a_live_user_keeps_the_server_up(pgdata: Path) -> None:
    killed = await use(pgdata, "hold")
    await killed.kill()
    holder = await use(pgdata, "hold")
    await use(pgdata, "start-and-stop")
    (server,) = postmasters(pgdata)
    assert psutil.Process(server).is_running()  # still in use by `holder`
    await holder.leave()
    await eventually(lambda: not postmasters(pgdata), timeout=15)
