"""`anvil-compute migrate` as a user runs it: a real process, a real PostgreSQL."""

import subprocess
import sys
from pathlib import Path

import psycopg

from daemon.registry.migrations import load_migrations


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_migrate_against_a_database_url(empty_database_url: str) -> None:
    first = run_cli("migrate", "--database-url", empty_database_url)
    assert first.returncode == 0, first.stderr
    versions = ", ".join(f"{m.version:04d}" for m in load_migrations())
    assert f"applied migrations: {versions}" in first.stdout
    second = run_cli("migrate", "--database-url", empty_database_url)
    assert second.returncode == 0 and "up to date" in second.stdout
    with psycopg.connect(empty_database_url) as conn:
        count = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert count == (len(load_migrations()),)


def test_migrate_on_the_embedded_default(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    env.pop("ANVIL_DATABASE_URL", None)
    result = run_cli("migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert "applied migrations" in result.stdout
    assert (tmp_path / "anvil-compute" / "postgres" / "PG_VERSION").exists()


def test_bad_config_is_one_line_on_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("colour = 'blue'\n")
    result = run_cli("migrate", "--config", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip() == f"anvil-compute: unknown setting 'colour' in {bad}"


def test_four_migrate_processes_at_once_apply_each_migration_once(
    empty_database_url: str,
) -> None:
    """Peers of a fabric start together: their migrations serialize on the lock."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "migrate", "--database-url", empty_database_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outcomes = [(p.wait(120), *p.communicate()) for p in procs]
    assert [code for code, _, _ in outcomes] == [0] * 4, outcomes
    applied = [out for _, out, _ in outcomes if "applied migrations" in out]
    assert len(applied) == 1, outcomes  # one applied them, three found them done
    with psycopg.connect(empty_database_url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [v for (v,) in rows] == [m.version for m in load_migrations()]
