"""The async psycopg pool and the translation of driver errors into ours."""

from __future__ import annotations

import asyncio
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
from daemon.registry import queries

Connection = psycopg.AsyncConnection[dict[str, Any]]

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


class Pool(psycopg_pool.AsyncConnectionPool[Connection]):
    """The registry's pool; while the registry is known to be unreachable it hands out nothing.

    `mark_unreachable` (from daemon/registry/health.py, which probes the server)
    makes every request for a connection, and every one already waiting, fail
    at once with PoolTimeout (RegistryUnavailable once translated), instead of
    each waiting out the pool's timeout for a server that is not there.
    """

    _unreachable: asyncio.Future[str] | None = None

    @property
    def unreachable(self) -> bool:
        return self._unreachable is not None and self._unreachable.done()

    def mark_unreachable(self, why: str) -> None:
        if self._unreachable is None or self._unreachable.done():
            self._unreachable = asyncio.get_running_loop().create_future()
        self._unreachable.set_result(why)

    def mark_reachable(self) -> None:
        if self._unreachable is not None and self._unreachable.done():
            self._unreachable = None

    async def fetch_one(self, query: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run the named query (daemon/registry/sql) on its own; its first row, if any."""
        with translate_errors():
            async with self.connection() as conn:
                cur = await conn.execute(queries.get(query), params)
                return await cur.fetchone()

    async def fetch_all(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run the named query on its own; all its rows."""
        with translate_errors():
            async with self.connection() as conn:
                cur = await conn.execute(queries.get(query), params)
                return await cur.fetchall()

    async def run(self, query: str, params: dict[str, Any]) -> None:
        """Run the named query on its own, for its effect."""
        with translate_errors():
            async with self.connection() as conn:
                await conn.execute(queries.get(query), params)

    async def getconn(self, timeout: float | None = None) -> Connection:
        down = self._unreachable
        if down is None:
            down = self._unreachable = asyncio.get_running_loop().create_future()
        if not down.done():
            get = asyncio.ensure_future(super().getconn(timeout))
            either: list[asyncio.Future[Any]] = [get, down]
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                await self._abandon(get)
                raise
            if get.done():
                return get.result()
            await self._abandon(get)
        raise psycopg_pool.PoolTimeout(f"the registry is unreachable: {down.result()}")

    async def _abandon(self, get: asyncio.Future[Connection]) -> None:
        """Cancel a checkout; a connection it got all the same goes back to the pool."""
        get.cancel()
        await asyncio.wait([get])
        if not get.cancelled() and get.exception() is None:
            await self.putconn(get.result())


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # Autocommit: every named query is one statement, hence its own transaction;
    # multi-statement work opens an explicit `conn.transaction()`.
    await conn.set_autocommit(True)


async def open_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 30.0
) -> Pool:
    """Open a pool and wait until a connection works; raise RegistryUnavailable otherwise."""
    pool = Pool(
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
