"""Migrations on a real PostgreSQL: the seed's table verbatim, idempotence, concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from daemon.registry.migrations import MigrationError, load_migrations, migrate

# The seed's compute_capabilities definition, column by column:
# (name, type, nullable), plus its primary key.
SEED_COLUMNS = [
    ("peer_id", "uuid", "NO"),
    ("region", "text", "NO"),
    ("capability", "text", "NO"),
    ("resources", "jsonb", "YES"),
    ("max_concurrency", "integer", "YES"),
]

FINGERPRINT_SQL = """
SELECT 'column', table_name || '.' || column_name || ':' || data_type || ':' || is_nullable
       || ':' || coalesce(column_default, '')
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'constraint', conrelid::regclass::text || ':' || conname || ':' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'trigger', tgrelid::regclass::text || ':' || tgname FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'function', proname || ':' || md5(prosrc) FROM pg_proc
WHERE pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'type', typname FROM pg_type WHERE typnamespace = 'public'::regnamespace AND typtype = 'e'
ORDER BY 1, 2
"""


async def _fingerprint(url: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(FINGERPRINT_SQL)
        return await cur.fetchall()


async def _migrate(url: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await migrate(conn)


async def test_compute_capabilities_is_the_seed_table_verbatim(empty_database_url: str) -> None:
    await _migrate(empty_database_url)
    async with await psycopg.AsyncConnection.connect(empty_database_url) as conn:
        cur = await conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_name = 'compute_capabilities' ORDER BY ordinal_position"
        )
        assert await cur.fetchall() == SEED_COLUMNS
        cur = await conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'compute_capabilities'::regclass"
        )
        assert await cur.fetchall() == [("PRIMARY KEY (peer_id, capability)",)]


async def test_migrations_from_empty_build_every_table(empty_database_url: str) -> None:
    applied = await _migrate(empty_database_url)
    assert applied == [m.version for m in load_migrations()]
    async with await psycopg.AsyncConnection.connect(empty_database_url) as conn:
        cur = await conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        tables = [row[0] for row in await cur.fetchall()]
    assert tables == [
        "capability_executors",
        "compute_capabilities",
        "fleet_deployments",
        "job_events",
        "jobs",
        "peers",
        "schema_migrations",
    ]


async def test_applying_twice_is_a_no_op(empty_database_url: str) -> None:
    await _migrate(empty_database_url)
    before = await _fingerprint(empty_database_url)
    assert await _migrate(empty_database_url) == []
    assert await _fingerprint(empty_database_url) == before


async def test_concurrent_migrations_apply_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*(_migrate(empty_database_url) for _ in range(6)))
    expected = [m.version for m in load_migrations()]
    assert sorted(results, key=len) == [[]] * 5 + [expected]
    async with await psycopg.AsyncConnection.connect(empty_database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM schema_migrations")
        assert await cur.fetchone() == (len(expected),)


async def test_a_changed_migration_is_refused(empty_database_url: str) -> None:
    await _migrate(empty_database_url)
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as conn:
        await conn.execute("UPDATE schema_migrations SET sha256 = 'x' WHERE version = 1")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await _migrate(empty_database_url)


async def test_a_newer_database_is_refused(empty_database_url: str) -> None:
    await _migrate(empty_database_url)
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, sha256) VALUES (999, 'future', 'x')"
        )
    with pytest.raises(MigrationError, match="upgrade the daemon"):
        await _migrate(empty_database_url)


async def test_version_6_gives_existing_jobs_a_queue_timeout_and_a_queued_at(
    empty_database_url: str,
) -> None:
    """Upgrading a version-5 registry with jobs in it: none of them fails sooner
    than it should, and every job inserted afterwards must bring its own timeout."""
    before = [m for m in load_migrations() if m.version <= 5]
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE schema_migrations (version INT PRIMARY KEY, name TEXT NOT NULL, "
            "sha256 TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for m in before:
            await conn.execute(m.sql.encode())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                (m.version, m.name, m.sha256),
            )
        await conn.execute(
            "INSERT INTO jobs (job_id, capability, region, locality_key, request_sha256, "
            "timeout_ms, state, finished_at, submitted_at, updated_at) VALUES "
            "('00000000-0000-0000-0000-000000000001', 'a:b', 'r', 'k', 'x', 0, 'queued', NULL, "
            " '2026-01-01T00:00:00Z', '2026-01-01T05:00:00Z'), "
            "('00000000-0000-0000-0000-000000000002', 'a:b', 'r', 'k', 'x', 0, 'failed', now(), "
            " '2026-01-01T00:00:00Z', '2026-01-01T05:00:00Z')"
        )
    assert await _migrate(empty_database_url) == [6]
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as conn:
        await conn.execute("SET TimeZone = 'UTC'")
        cur = await conn.execute(
            "SELECT state::text, queue_timeout_ms, queued_at::text FROM jobs ORDER BY job_id"
        )
        assert await cur.fetchall() == [
            ("queued", 86_400_000, "2026-01-01 05:00:00+00"),  # its last update
            ("failed", 86_400_000, "2026-01-01 00:00:00+00"),  # its submission
        ]
        with pytest.raises(psycopg.errors.NotNullViolation, match="queue_timeout_ms"):
            await conn.execute(
                "INSERT INTO jobs (job_id, capability, region, locality_key, request_sha256, "
                "timeout_ms) VALUES (gen_random_uuid(), 'a:b', 'r', 'k', 'x', 0)"
            )
