"""`anvil-compute` entry point: one subcommand per module under daemon.commands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# The WASM worker pool starts its workers with fork+exec; gRPC's fork handlers
# are not needed for that and only print a warning on every spawn.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from daemon import __version__
from daemon.exceptions import AnvilError

# Each module defines `register(subparsers)`, which adds its subcommand(s) and
# sets `handler` (args -> exit code) as a parser default.
COMMAND_MODULES: tuple[str, ...] = (
    "daemon.commands.serve",
    "daemon.commands.demo",
    "daemon.commands.jobs",
    "daemon.commands.objects",
    "daemon.commands.run",
    "daemon.commands.new_guest",
    "daemon.commands.migrate",
    "daemon.commands.token",
    "daemon.commands.deploy",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anvil-compute",
        description="Compute node daemon of the Anvil storage fabric.",
    )
    parser.add_argument("--version", action="version", version=f"anvil-compute {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; AnvilErrors print one line on stderr and exit 1."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except AnvilError as exc:
        print(f"anvil-compute: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
