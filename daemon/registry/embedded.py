"""The embedded default: a private PostgreSQL in the data directory (pgserver).

pgserver keeps the pids of the processes using a server in
`PGDATA/.handle_pids.json` and stops the server when the last one leaves. A
process killed with SIGKILL never removes its pid, so the list never empties
again and every later clean stop leaves the server running. So each start and
stop first prunes the pids whose process is gone. A pid can be reused by an
unrelated process, so the start time (in clock ticks since boot, from
/proc/PID/stat) of each process this module added is kept beside the list
(`.anvil_handle_pids.json`): a live pid whose process started at another time
is a stranger, and is pruned too.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon.exceptions import RegistryUnavailable

# Both in PGDATA: pgserver's list of pids, and ours of their start times.
HANDLE_PIDS = ".handle_pids.json"
HANDLE_STARTS = ".anvil_handle_pids.json"


class EmbeddedPostgres:
    """A pgserver instance owned by this process; `close()` stops it if we started it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    def start(self) -> str:
        """Start (or join) the server; return its connection URL. Raises RegistryUnavailable."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (systemd
                # services, containers); pgserver then uses /tmp, which is fine.
                warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
                # Imported here: heavy, and only needed for the embedded default.
                from pgserver.postgres_server import get_server

                with _handles(self.data_dir) as handles:
                    handles.prune()
                # "stop": the server stops when the last process using it exits,
                # so two daemons sharing a data directory share one server.
                self._server = get_server(self.data_dir, cleanup_mode="stop")
                with _handles(self.data_dir) as handles:
                    handles.record(os.getpid())
            uri: str = self._server.get_uri()
        except Exception as exc:  # pgserver raises plain exceptions on start failure
            raise RegistryUnavailable(
                f"cannot start embedded PostgreSQL in {self.data_dir}: {exc}"
            ) from exc
        return uri

    def close(self) -> None:
        """Leave the server; stop it if no other live process uses it."""
        if self._server is not None:
            with _handles(self.data_dir) as handles:
                handles.prune()
                handles.forget(os.getpid())
            self._server.cleanup()
            self._server = None

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handles:
    """pgserver's pid list for one PGDATA, and the start times of the pids we added."""

    def __init__(self, pgdata: Path) -> None:
        self._pids_path = pgdata / HANDLE_PIDS
        self._starts_path = pgdata / HANDLE_STARTS

    def prune(self) -> list[int]:
        """Drop the pids whose process is gone (or is another process now); return them."""
        pids = _read(self._pids_path, [])
        starts = _read(self._starts_path, {})
        gone = [pid for pid in pids if not _alive(pid, starts.get(str(pid)))]
        if gone:
            _write(self._pids_path, [pid for pid in pids if pid not in gone])
        kept = {key: t for key, t in starts.items() if int(key) in pids and int(key) not in gone}
        if kept != starts:
            _write(self._starts_path, kept)
        return gone

    def record(self, pid: int) -> None:
        """Remember when `pid` (which pgserver just listed) started."""
        starts = _read(self._starts_path, {})
        started = _start_ticks(pid)
        if started is not None:
            starts[str(pid)] = started
            _write(self._starts_path, starts)

    def forget(self, pid: int) -> None:
        starts = _read(self._starts_path, {})
        if starts.pop(str(pid), None) is not None:
            _write(self._starts_path, starts)


@contextmanager
def _handles(pgdata: Path) -> Iterator[_Handles]:
    """The handle lists under pgserver's own inter-process lock (as pgserver edits them)."""
    from pgserver.postgres_server import PostgresServer

    # pgserver keys its lists by the resolved path; so do we.
    with PostgresServer._lock:
        yield _Handles(pgdata.expanduser().resolve())


def _alive(pid: int, started: int | None) -> bool:
    """Whether `pid` is a running process (the one that started at `started`, when known)."""
    now = _start_ticks(pid)
    return now is not None and (started is None or now == started)


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot; None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start = fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    return None if state in ("Z", "X") else start


def _read(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except ValueError:
        return default  # torn by a crash mid-write: nothing in it can be trusted


def _write(path: Path, value: Any) -> None:
    temp = path.with_name(f"{path.name}.tmp")
    temp.write_text(json.dumps(value))
    os.replace(temp, path)
