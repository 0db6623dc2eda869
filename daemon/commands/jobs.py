"""Client commands: submit, status, watch, cancel, capabilities (against any peer)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grpc import aio

from daemon import config
from daemon.client import INPUT_BUCKET, ComputeClient, find_token
from daemon.convert import PROTO_TO_JOB_STATE
from daemon.exceptions import AnvilError, ErrorCode, InvalidArgument
from daemon.jobs.state import JobState
from daemon.pb.anvil import compute_pb2
from daemon.registry.models import MAX_QUEUE_TIMEOUT_MS
from daemon.status import error_code

DEFAULT_ENDPOINT = "127.0.0.1:50051"


class RemoteError(AnvilError):
    """A peer answered with an error status."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code


def _add_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint", default=DEFAULT_ENDPOINT, metavar="HOST:PORT", help="any peer"
    )
    parser.add_argument("--data-dir", type=Path, help="where to find client.token")
    parser.add_argument("--token", help="bearer token (default: $ANVIL_TOKEN, then client.token)")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    submit = subparsers.add_parser("submit", help="submit a job")
    submit.add_argument("capability")
    submit.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATH|REF",
        help="an object ref, or a local file to upload first (repeatable; the first is stdin)",
    )
    submit.add_argument(
        "--param", action="append", default=[], metavar="K=V", help="a job parameter"
    )
    submit.add_argument(
        "--bucket",
        default=INPUT_BUCKET,
        help="where local --input files are uploaded (default: %(default)s); a token "
        "limited to some buckets names one of them",
    )
    submit.add_argument("--region", default="", help="default: the receiving peer's region")
    submit.add_argument("--timeout", type=float, default=0, help="seconds (default: peer's)")
    submit.add_argument(
        "--queue-timeout",
        type=float,
        default=0,
        metavar="SECONDS",
        help="how long the job may wait queued for a peer before it fails "
        "(default: the peer's queue_timeout_s)",
    )
    submit.add_argument("--idempotency-key", default="")
    submit.add_argument("--locality-key", default="")
    submit.add_argument("--wait", action="store_true", help="follow the job and print its output")
    _add_endpoint(submit)
    submit.set_defaults(handler=lambda a: _run(a, _submit))

    for name, helptext, handler in (
        ("status", "show a job", _status),
        ("watch", "follow a job until it ends", _watch),
        ("cancel", "cancel a job", _cancel),
    ):
        cmd = subparsers.add_parser(name, help=helptext)
        cmd.add_argument("job_id")
        _add_endpoint(cmd)
        cmd.set_defaults(handler=lambda a, h=handler: _run(a, h))

    caps = subparsers.add_parser("capabilities", help="list registered capabilities")
    caps.add_argument("--capability", default="")
    caps.add_argument("--region", default="")
    caps.add_argument("--live", action="store_true", help="only peers with a fresh heartbeat")
    _add_endpoint(caps)
    caps.set_defaults(handler=lambda a: _run(a, _capabilities))


def _run(
    args: argparse.Namespace, body: Callable[[ComputeClient, argparse.Namespace], Awaitable[int]]
) -> int:
    data_dir = args.data_dir or config.load().data_dir

    async def main() -> int:
        async with ComputeClient(args.endpoint, token=find_token(args.token, data_dir)) as client:
            try:
                return await body(client, args)
            except aio.AioRpcError as exc:
                raise RemoteError(error_code(exc.code()), exc.details() or "") from exc

    return asyncio.run(main())


def _params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--param {item!r}: expected KEY=VALUE")
        params[key] = value
    return params


def state_name(status: compute_pb2.GetJobStatusResponse) -> str:
    return PROTO_TO_JOB_STATE[status.state].value.upper()


def describe(status: compute_pb2.GetJobStatusResponse) -> dict[str, Any]:
    out: dict[str, Any] = {
        "job_id": status.job_id,
        "state": state_name(status),
        "capability": status.capability,
        "peer_id": status.peer_id,
        "attempt": status.attempt,
    }
    if status.HasField("exit_code"):
        out["exit_code"] = status.exit_code
    if status.error:
        out["error"] = status.error
    if status.output_refs:
        out["output_refs"] = list(status.output_refs)
    if status.output:
        out["output"] = status.output.decode("utf-8", "replace")
    return out


def _queue_timeout_ms(seconds: float) -> int:
    """--queue-timeout in milliseconds; 0 leaves it to the peer. Raises InvalidArgument."""
    if not (seconds == 0 or 0.001 <= seconds <= MAX_QUEUE_TIMEOUT_MS / 1000):
        raise InvalidArgument(
            f"--queue-timeout {seconds:g}: expected 0 (the peer's default) or "
            f"0.001 to {MAX_QUEUE_TIMEOUT_MS // 1000} seconds"
        )
    return round(seconds * 1000)


async def _submit(client: ComputeClient, args: argparse.Namespace) -> int:
    queue_timeout_ms = _queue_timeout_ms(args.queue_timeout)
    inputs = await client.resolve_inputs(args.input, bucket=args.bucket)
    response = await client.submit(
        args.capability,
        region=args.region,
        inputs=inputs,
        params=_params(args.param),
        idempotency_key=args.idempotency_key,
        locality_key=args.locality_key,
        timeout_ms=int(args.timeout * 1000),
        queue_timeout_ms=queue_timeout_ms,
    )
    if not args.wait:
        print(response.job_id)
        return 0
    final = await client.wait(response.job_id)
    return _print_final(final)


def _print_final(final: compute_pb2.GetJobStatusResponse) -> int:
    if PROTO_TO_JOB_STATE[final.state] is JobState.SUCCEEDED:
        sys.stdout.buffer.write(final.output)
        if final.output and not final.output.endswith(b"\n"):
            sys.stdout.write("\n")
        for ref in final.output_refs:
            print(ref)
        return 0
    print(f"job {final.job_id} {state_name(final)}: {final.error}", file=sys.stderr)
    return 1


async def _status(client: ComputeClient, args: argparse.Namespace) -> int:
    print(json.dumps(describe(await client.status(args.job_id)), indent=2))
    return 0


async def _watch(client: ComputeClient, args: argparse.Namespace) -> int:
    last = None
    async for status in client.watch(args.job_id):
        last = status
        where = f" on {status.peer_id}" if status.peer_id else ""
        # A queued job's error says why it waits (no capable peer, a lost lease).
        why = (
            f": {status.error}"
            if status.error and PROTO_TO_JOB_STATE[status.state] is JobState.QUEUED
            else ""
        )
        print(f"{state_name(status):<10} attempt {status.attempt}{where}{why}", flush=True)
    if last is None:
        return 1
    return _print_final(last)


async def _cancel(client: ComputeClient, args: argparse.Namespace) -> int:
    response = await client.cancel(args.job_id)
    print(PROTO_TO_JOB_STATE[response.state].value.upper())
    return 0


async def _capabilities(client: ComputeClient, args: argparse.Namespace) -> int:
    rows = await client.capabilities(args.capability, args.region, args.live)
    print(
        f"{'CAPABILITY':<24} {'REGION':<10} {'PEER':<36} {'LIVE':<4} {'STATUS':<8} "
        f"{'SOURCE':<8} {'MAX':>4} {'RUN':>4} {'QUEUED':>6}"
    )
    for cap in rows:
        live = "yes" if cap.peer_live else "no"
        status = cap.status if len(cap.status) <= 8 else "failed"
        print(
            f"{cap.capability:<24} {cap.region:<10} {cap.peer_id:<36} {live:<4} {status:<8} "
            f"{cap.source:<8} {cap.max_concurrency:>4} {cap.running_jobs:>4} {cap.queued_jobs:>6}"
        )
        if cap.status.startswith("failed"):
            print(f"  {cap.status}")
    return 0
