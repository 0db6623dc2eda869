"""`anvil-compute migrate`: apply the registry migrations and exit."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import psycopg

from daemon import config
from daemon.registry.driver import translate_errors
from daemon.registry.embedded import EmbeddedPostgres
from daemon.registry.migrations import migrate


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="apply pending registry migrations",
        description="Apply pending registry migrations (idempotent, safe to run concurrently).",
    )
    parser.add_argument("--database-url", help="PostgreSQL URL (default: embedded server)")
    parser.add_argument("--data-dir", type=Path, help="data directory of the embedded server")
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.set_defaults(handler=run)


async def _migrate(url: str) -> list[int]:
    with translate_errors():
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await migrate(conn)


def run(args: argparse.Namespace) -> int:
    settings = config.load(
        config_file=args.config,
        overrides={"database_url": args.database_url, "data_dir": args.data_dir},
    )
    if settings.database_url is not None:
        applied = asyncio.run(_migrate(settings.database_url))
    else:
        with EmbeddedPostgres(settings.data_dir / "postgres") as server:
            applied = asyncio.run(_migrate(server.start()))
    if applied:
        print("applied migrations: " + ", ".join(f"{v:04d}" for v in applied))
    else:
        print("registry schema is up to date")
    return 0
