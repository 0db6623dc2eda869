"""`anvil-compute serve`: run this host's peer until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon import config, logs
from daemon.config import Settings
from daemon.execution import JobExecutor
from daemon.node import Node

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the peer daemon",
        description="Run the peer. With no arguments: embedded PostgreSQL and the built-in "
        "store in the data directory, the example capabilities, 127.0.0.1:50051.",
    )
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--listen", metavar="HOST:PORT")
    parser.add_argument("--database-url")
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/anvil-compute/...)")
    parser.add_argument("--region")
    parser.add_argument("--log-level", default="info")
    parser.set_defaults(handler=run)


async def build_executors(settings: Settings) -> Mapping[str, JobExecutor]:
    """The executors this peer can use, by capability kind."""
    from daemon.executors.job_executor import WasmJobExecutor

    return {"wasm": await WasmJobExecutor.create(settings)}


async def serve(settings: Settings) -> None:
    node = Node(settings, executor_factory=build_executors)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        await stop.wait()
        log.info("shutting down: draining for up to %.0f s", settings.drain_grace_s)
    finally:
        await node.stop()


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    settings = config.load(
        config_file=args.config,
        overrides={
            "data_dir": args.data_dir,
            "listen": args.listen,
            "database_url": args.database_url,
            "region": args.region,
        },
    )
    import uvloop

    uvloop.run(serve(settings))
    return 0
