"""`anvil-compute run MODULE.wasm`: run a guest locally in exactly the job sandbox.

For guest authors: same ABI, limits and worker process as a job on a peer.
Exit status: 0 on success, the guest's own status when it exits non-zero,
124 when it timed out, 125 for any other failure (trap, fuel, memory, output
too large, invalid module); the reason goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from daemon.exceptions import InvalidArgument
from daemon.executors.result import ExecutionResult, RunEnd
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.limits import Limits
from daemon.executors.wasm.pool import PoolSettings

EXIT_TIMED_OUT = 124
EXIT_FAILED = 125


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a WASM guest locally in the job sandbox",
        description="Run a WASI command module once, in the same sandbox and limits as a job: "
        "params as argv and env, inputs read-only at /input/0, /input/1, ... (the first is "
        "also stdin), files the guest writes to /output saved to --output-dir.",
    )
    parser.add_argument("module", type=Path, metavar="MODULE.wasm")
    parser.add_argument(
        "--input",
        dest="inputs",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="input file (repeatable): the i-th is /input/<i> (0, 1, ...); /input/0 is also stdin",
    )
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        type=_param,
        default=[],
        metavar="K=V",
        help="parameter (repeatable): argv '--K=V' and environment ANVIL_PARAM_<K>",
    )
    parser.add_argument("--fuel", type=_positive(int), help="fuel units (≈ wasm instructions)")
    parser.add_argument("--timeout", type=_positive(float), metavar="SECONDS")
    parser.add_argument("--memory", type=_positive(float), metavar="MiB", help="per linear memory")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("output"),
        metavar="DIR",
        help="where /output files go; created if missing, must be empty (default ./output)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        metavar="DIR",
        help="compiled-module cache (default %(default)s)",
    )
    parser.set_defaults(handler=run)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "anvil-compute" / "wasm"


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return name, value


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a value > 0, got {text!r}")
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    limits = Limits().with_overrides(fuel=args.fuel, timeout_s=args.timeout, memory_mib=args.memory)
    if not args.module.is_file():
        raise InvalidArgument(f"module {args.module} is not a file")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(_run(args, limits))
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    for output in result.outputs:
        print(f"output: {output.path} ({output.size} bytes)", file=sys.stderr)
    return exit_status(result)


async def _run(args: argparse.Namespace, limits: Limits) -> ExecutionResult:
    settings = PoolSettings(workers=1, cache_dir=args.cache_dir)
    async with WasmExecutor(settings) as executor:
        return await executor.run(
            args.module,
            output_dir=args.output_dir,
            inputs=args.inputs,
            params=args.params,
            limits=limits,
            program=args.module.name,
        )


def exit_status(result: ExecutionResult) -> int:
    """The process exit status for a result; prints the reason of a failure."""
    if result.succeeded:
        return 0
    print(f"anvil-compute run: {result.outcome.value}: {result.message}", file=sys.stderr)
    if result.outcome is RunEnd.NONZERO_EXIT and result.exit_code:
        return result.exit_code
    if result.outcome is RunEnd.TIMED_OUT:
        return EXIT_TIMED_OUT
    return EXIT_FAILED
