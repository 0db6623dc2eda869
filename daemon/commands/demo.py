"""`anvil-compute demo`: one peer on the embedded defaults runs every example capability.

Starts a node in this process (embedded PostgreSQL and the built-in store in a
temporary data directory unless --data-dir is given), stores sample inputs and
the digits model as objects, submits one job per example capability through
the gRPC API, prints what came back, and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from daemon import config, logs
from daemon.client import ComputeClient
from daemon.commands.jobs import state_name
from daemon.commands.serve import build_executors
from daemon.node import Node
from daemon.pb.anvil import compute_pb2

TEXT = """\
Anvil turns a storage cluster into a compute fabric.
Jobs run where their data already lives, sandboxed in WebAssembly.
A peer that dies loses nothing: its jobs run again on the next peer.
"""
CSV_ROWS = [
    ("region", "product", "amount"),
    ("north", "bolts", "120"),
    ("south", "bolts", "80"),
    ("north", "nuts", "45.5"),
    ("east", "washers", "12"),
    ("south", "nuts", "60"),
    ("north", "washers", "7.25"),
    ("east", "bolts", "33"),
]


def _gradient_pgm(width: int, height: int) -> bytes:
    pixels = bytes(
        (x * 255 // (width - 1) + y * 4) % 256 for y in range(height) for x in range(width)
    )
    return f"P5\n{width} {height}\n255\n".encode() + pixels


@dataclass(frozen=True)
class Example:
    capability: str
    inputs: tuple[str, ...]
    params: dict[str, str]
    show: Callable[[compute_pb2.GetJobStatusResponse], str]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "demo", help="run every example capability on a throwaway local peer"
    )
    parser.add_argument("--data-dir", type=Path, help="keep the node's data here")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="anvil-demo-"))
    try:
        settings = config.load(
            overrides={"data_dir": data_dir, "listen": "127.0.0.1:0", "region": "local"}
        )
        import uvloop

        return uvloop.run(_demo(settings))
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)


async def _demo(settings: config.Settings) -> int:
    where = "embedded PostgreSQL" if settings.embedded_database else "PostgreSQL"
    print(f"anvil-compute demo: one peer on {where}, data in {settings.data_dir}")
    started = time.monotonic()
    node = Node(settings, executor_factory=build_executors)
    await node.start()
    print(f"peer {node.peer_id} serving on {node.address} ({time.monotonic() - started:.1f} s)\n")
    failures = 0
    try:
        token = settings.token_path.read_text().strip() if settings.auth else None
        async with ComputeClient(node.address, token=token) as client:
            for example in await _examples(client, settings.data_dir / "demo-inputs"):
                t0 = time.monotonic()
                submitted = await client.submit(
                    example.capability, inputs=example.inputs, params=example.params
                )
                final = await client.wait(submitted.job_id)
                ms = (time.monotonic() - t0) * 1000
                ok = state_name(final) == "SUCCEEDED"
                failures += not ok
                detail = example.show(final) if ok else final.error
                print(f"{example.capability:<20} {state_name(final):<10} {ms:6.0f} ms  {detail}")
    finally:
        await node.stop(drain_s=5)
    print("\nall example capabilities succeeded" if not failures else f"\n{failures} failed")
    return 1 if failures else 0


def _write_inputs(folder: Path) -> tuple[list[Path], list[str]]:
    """The sample input files, and the true labels of the sample digits."""
    folder.mkdir(parents=True, exist_ok=True)
    models = resources.files("daemon.guest_models")
    files = {
        "notes.txt": TEXT.encode(),
        "sales.csv": "".join(",".join(r) + "\n" for r in CSV_ROWS).encode(),
        "gradient.pgm": _gradient_pgm(16, 8),
        "digits.csv": models.joinpath("digits-sample.csv").read_bytes(),
        "digits-logreg.bin": models.joinpath("digits-logreg.bin").read_bytes(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    labels = models.joinpath("digits-sample.labels").read_text().split()
    return [folder / name for name in files], labels


async def _examples(client: ComputeClient, folder: Path) -> list[Example]:
    paths, labels = await asyncio.to_thread(_write_inputs, folder)
    refs = {path.name: await client.upload(path, bucket="demo") for path in paths}

    def digits(status: compute_pb2.GetJobStatusResponse) -> str:
        predicted = [str(p) for p in json.loads(status.output)["predictions"]]
        right = sum(p == t for p, t in zip(predicted, labels, strict=True))
        return f"predicted {''.join(predicted)}, true {''.join(labels)}: {right}/{len(labels)}"

    return [
        Example("text:wordcount", (refs["notes.txt"],), {}, _first_line),
        Example(
            "data:csv-aggregate",
            (refs["sales.csv"],),
            {"group_by": "region", "agg": "sum", "column": "amount"},
            lambda s: s.output.decode().strip().replace("\n", "  "),
        ),
        Example(
            "image:resize",
            (refs["gradient.pgm"],),
            {"width": "32", "height": "16"},
            lambda s: "16x8 -> 32x16 PGM: " + ", ".join(s.output_refs),
        ),
        Example("inference:digits", (refs["digits.csv"], refs["digits-logreg.bin"]), {}, digits),
    ]


def _first_line(status: compute_pb2.GetJobStatusResponse) -> str:
    return status.output.decode().strip().splitlines()[0][:160]
