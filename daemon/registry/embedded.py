"""The embedded default: a private PostgreSQL in the data directory (pgserver)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from daemon.exceptions import RegistryUnavailable


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

                # "stop": the server stops when the last process using it exits,
                # so two daemons sharing a data directory share one server.
                self._server = get_server(self.data_dir, cleanup_mode="stop")
            uri: str = self._server.get_uri()
        except Exception as exc:  # pgserver raises plain exceptions on start failure
            raise RegistryUnavailable(
                f"cannot start embedded PostgreSQL in {self.data_dir}: {exc}"
            ) from exc
        return uri

    def close(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
