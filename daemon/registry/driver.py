"""The async psycopg pool and the translation of driver errors into ours."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from daemon.exceptions import (
    AlreadyExists,
    AnvilError,
    InvalidArgument,
    NotFound,
    RegistryUnavailable,
)

Pool = psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]]

# A lost server must surface as an error within seconds, not after the kernel's
# TCP timeouts (minutes): peers decide from it when to kill their own guests.
CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # Autocommit: every named query is one statement, hence its own transaction;
    # multi-statement work opens an explicit `conn.transaction()`.
    await conn.set_autocommit(True)


async def open_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 30.0
) -> Pool:
    """Open a pool and wait until a connection works; raise RegistryUnavailable otherwise."""
    pool: Pool = psycopg_pool.AsyncConnectionPool(
        url,
        # Connections are opened up front: growing the pool under load means
        # connecting while the event loop is busiest.
        min_size=max(min_size, min(4, max_size)),
        max_size=max_size,
        open=False,
        timeout=timeout,
        kwargs={"row_factory": dict_row, **CONNECT_OPTIONS},
        configure=_configure,
        # No check on checkout: it costs a round trip per query. A connection
        # broken by a server restart fails one query (RegistryUnavailable, which
        # every caller retries or reports) and the pool then replaces it.
        name="anvil-registry",
    )
    try:
        await pool.open(wait=True, timeout=timeout)
    except psycopg_pool.PoolTimeout as exc:
        await pool.close()
        raise RegistryUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
    return pool


def _message(exc: psycopg.Error) -> str:
    diag = exc.diag
    return diag.message_primary or str(exc)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise driver errors as the daemon's typed errors (never a bare psycopg error)."""
    try:
        yield
    except AnvilError:
        raise
    except psycopg.errors.UniqueViolation as exc:
        raise AlreadyExists(_message(exc)) from exc
    except psycopg.errors.ForeignKeyViolation as exc:
        raise NotFound(_message(exc)) from exc
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
        raise InvalidArgument(_message(exc)) from exc
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        raise RegistryUnavailable(f"registry unavailable: {exc}") from exc
    except psycopg.Error as exc:
        raise AnvilError(f"registry error: {exc}") from exc
