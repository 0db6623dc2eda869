"""Apply the numbered migrations in sql/ once, under an advisory lock."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from daemon.exceptions import AnvilError
from daemon.registry.driver import translate_errors

# Any 64-bit constant unique to this application; every peer uses the same one,
# so peers that start together apply each migration exactly once.
MIGRATION_LOCK_KEY = 0x616E76696C5F6D67  # "anvil_mg"
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, kw_only=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(AnvilError):
    """The database's applied migrations disagree with the files shipped."""


def load_migrations() -> list[Migration]:
    """The migrations shipped with the package, in order; raise on a gap in numbering."""
    found = []
    for entry in resources.files("daemon.sql").iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(
                Migration(
                    version=int(match.group(1)),
                    name=match.group(2),
                    sql=entry.read_text("utf-8"),
                )
            )
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(f"migration {expected:04d} is missing")
    return found


async def migrate(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """Apply pending migrations in one transaction; return the versions applied.

    Idempotent. Raises MigrationError when an applied migration's text changed or
    the database is newer than this code.
    """
    migrations = load_migrations()
    with translate_errors():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            await conn.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version INT PRIMARY KEY,
                    name TEXT NOT NULL,
                    sha256 TEXT NOT NULL,
                    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )
                """
            )
            cur = await conn.execute("SELECT version, sha256 FROM schema_migrations")
            applied: dict[int, str] = {}
            for row in await cur.fetchall():
                version, digest = (row["version"], row["sha256"]) if isinstance(row, dict) else row
                applied[version] = digest
            known = {m.version for m in migrations}
            newer = sorted(v for v in applied if v not in known)
            if newer:
                raise MigrationError(
                    f"database has migrations {newer} that this anvil-compute does not know; "
                    "upgrade the daemon"
                )
            done = []
            for migration in migrations:
                if migration.version in applied:
                    if applied[migration.version] != migration.sha256:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} was changed "
                            "after it was applied"
                        )
                    continue
                # No parameters: psycopg sends it as one simple query, so a
                # migration file may hold many statements.
                await conn.execute(migration.sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.sha256),
                )
                done.append(migration.version)
            return done
