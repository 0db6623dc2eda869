"""Shared fixtures: a real PostgreSQL for the whole session, a clean database per test.

The server is `ANVIL_TEST_DATABASE_URL` when set (CI may point it at any
PostgreSQL), else an embedded one started with pgserver. Each test gets a new
database cloned from a template that already has the migrations applied, which
takes a few milliseconds instead of re-running the migrations.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from daemon.registry import Registry
from daemon.registry.embedded import EmbeddedPostgres
from daemon.registry.migrations import migrate

TEMPLATE_DB = "anvil_test_template"


def _with_database(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the test PostgreSQL server (maintenance database)."""
    external = os.environ.get("ANVIL_TEST_DATABASE_URL")
    if external:
        yield external
        return
    with EmbeddedPostgres(tmp_path_factory.mktemp("pg")) as server:
        yield server.start()


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str) -> str:
    """Name of a template database with every migration applied."""
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))

    async def apply() -> None:
        async with await psycopg.AsyncConnection.connect(
            _with_database(pg_server_url, TEMPLATE_DB), autocommit=True
        ) as conn:
            await migrate(conn)

    asyncio.run(apply())
    return TEMPLATE_DB


@pytest.fixture
def empty_database_url(pg_server_url: str) -> Iterator[str]:
    """A brand-new database with no schema, dropped after the test."""
    name = f"anvil_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield _with_database(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database_url(pg_server_url: str, pg_template: str) -> Iterator[str]:
    """A migrated database of this test's own, dropped after the test."""
    name = f"anvil_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(pg_template)
            )
        )
    yield _with_database(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
async def registry(database_url: str) -> AsyncIterator[Registry]:
    reg = await Registry.connect(database_url, max_size=12, run_migrations=False)
    try:
        yield reg
    finally:
        await reg.close()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
