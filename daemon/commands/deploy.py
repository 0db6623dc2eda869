"""`anvil-compute deploy` / `undeploy`: run a WASM module on the fabric without a restart.

`deploy NAME MODULE.wasm` stores the module as an object, registers NAME for
one peer (`--peer`) or every peer of a region, and waits until those peers
have checked it and take its jobs. Operators' commands: they use
DATA_DIR/operator.token unless `--token` or `$ANVIL_TOKEN` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from grpc import aio

from daemon import config
from daemon.client import ComputeClient, find_token, looks_like_ref
from daemon.commands.jobs import DEFAULT_ENDPOINT, RemoteError
from daemon.exceptions import InvalidArgument
from daemon.pb.anvil import compute_pb2
from daemon.registry.models import STATUS_READY
from daemon.status import error_code
from daemon.storage.refs import parse_ref

MODULE_BUCKET = "modules"
READY_WAIT_S = 60.0


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    deploy = subparsers.add_parser(
        "deploy",
        help="deploy a WASM module as a capability",
        description="Store MODULE (a .wasm file, or an object ref) and deploy it as NAME: to "
        "one peer with --peer, else to every live peer of the region, and to peers that join "
        "it later. Waits until the peers take its jobs.",
    )
    deploy.add_argument("name", metavar="NAME", help="the capability, e.g. text:grep")
    deploy.add_argument("module", metavar="MODULE", help="a .wasm file or an object ref")
    deploy.add_argument("--region", default="", help="default: the peer's region")
    deploy.add_argument("--peer", default="", metavar="ID", help="one peer only")
    deploy.add_argument("--max-concurrency", type=int, default=2, metavar="N")
    deploy.add_argument("--timeout", type=float, default=0, metavar="S", help="seconds per job")
    deploy.add_argument("--memory", type=int, default=0, metavar="MiB")
    deploy.add_argument("--fuel", type=int, default=0, metavar="N")
    deploy.add_argument("--no-wait", action="store_true", help="do not wait for the peers")
    _add_connection(deploy)
    deploy.set_defaults(handler=lambda a: _run(a, _deploy))

    undeploy = subparsers.add_parser(
        "undeploy",
        help="undeploy a capability",
        description="Stop NAME on one peer (--peer) or on the whole region: new jobs are "
        "refused, running ones finish.",
    )
    undeploy.add_argument("name", metavar="NAME")
    undeploy.add_argument("--region", default="", help="default: the peer's region")
    undeploy.add_argument("--peer", default="", metavar="ID", help="one peer only")
    _add_connection(undeploy)
    undeploy.set_defaults(handler=lambda a: _run(a, _undeploy))


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, metavar="HOST:PORT")
    parser.add_argument("--data-dir", type=Path, help="where to find operator.token")
    parser.add_argument("--token", help="bearer token (default: $ANVIL_TOKEN, then operator.token)")


def _run(args: argparse.Namespace, body: Any) -> int:
    data_dir = args.data_dir or config.load().data_dir
    token = find_token(args.token, data_dir, file="operator.token")

    async def main() -> int:
        async with ComputeClient(args.endpoint, token=token) as client:
            try:
                code: int = await body(client, args)
                return code
            except aio.AioRpcError as exc:
                raise RemoteError(error_code(exc.code()), exc.details() or "") from exc

    return asyncio.run(main())


def executor_of(ref: str, args: argparse.Namespace) -> compute_pb2.Executor:
    """The WASM executor a deployment registers: the pinned module and its limits."""
    if args.max_concurrency < 1 or min(args.timeout, args.memory, args.fuel) < 0:
        raise InvalidArgument("--max-concurrency must be >= 1; --timeout, --memory, --fuel >= 0")
    return compute_pb2.Executor(
        wasm=compute_pb2.WasmExecutor(
            module_ref=ref,
            module_sha256=parse_ref(ref).sha256 or "",
            limits=compute_pb2.ResourceLimits(
                timeout_ms=round(args.timeout * 1000), memory_mib=args.memory, fuel=args.fuel
            ),
        )
    )


async def _deploy(client: ComputeClient, args: argparse.Namespace) -> int:
    if looks_like_ref(args.module):
        ref = args.module
    else:
        ref = await client.upload(Path(args.module), bucket=MODULE_BUCKET)
    executor = executor_of(ref, args)
    await client.deploy(
        args.name,
        executor,
        peer_id=args.peer,
        region=args.region,
        max_concurrency=args.max_concurrency,
    )
    where = f"peer {args.peer}" if args.peer else f"every peer of region {args.region!r}"
    if not args.peer and not args.region:
        where = "every peer of the endpoint's region"
    print(f"deployed {args.name} ({ref}) to {where}", flush=True)
    if args.no_wait:
        return 0
    return await _wait_ready(client, args)


async def _wait_ready(client: ComputeClient, args: argparse.Namespace) -> int:
    """Wait until every row of the deployment is ready (0) or one failed (1)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_WAIT_S
    while True:
        rows = [
            row
            for row in await client.capabilities(args.name, args.region, live_only=True)
            if row.source != "config" and (not args.peer or row.peer_id == args.peer)
        ]
        failed = [row for row in rows if row.status.startswith("failed")]
        for row in failed:
            print(f"peer {row.peer_id}: {row.status}", file=sys.stderr)
        if failed:
            return 1
        if rows and all(row.status == STATUS_READY for row in rows):
            for row in rows:
                print(f"ready on peer {row.peer_id}")
            return 0
        if loop.time() > deadline:
            pending = ", ".join(f"{row.peer_id} ({row.status})" for row in rows) or "no peer yet"
            print(f"not ready after {READY_WAIT_S:g} s: {pending}", file=sys.stderr)
            return 1
        await asyncio.sleep(0.2)


async def _undeploy(client: ComputeClient, args: argparse.Namespace) -> int:
    await client.undeploy(args.name, peer_id=args.peer, region=args.region)
    print(f"undeployed {args.name}")
    return 0
