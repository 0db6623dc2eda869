"""`anvil-compute demo`: one peer on the embedded defaults runs every example capability.

Starts a node in this process (embedded PostgreSQL and the built-in store in a
temporary data directory unless --data-dir is given), stores sample inputs and
the digits model as objects, submits one job per example capability through
the gRPC API, prints what came back, and stops.

Where Podman is installed, the node also offers the example container
capability `demo:busybox-wc`: its image is built here, stored as an object,
and `podman load`ed by the node from that object on first use, through a
private Podman service with its own storage. Without Podman it is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from daemon import config, logs
from daemon.capability_config import LocalCapability, parse_capability
from daemon.client import ComputeClient
from daemon.commands.jobs import state_name
from daemon.commands.serve import build_executors
from daemon.exceptions import Unavailable
from daemon.executors.podman import example_image
from daemon.executors.podman.service import PodmanService
from daemon.node import Node
from daemon.pb.anvil import compute_pb2

DEMO_BUCKET = "demo"
CONTAINER_CAPABILITY = "demo:busybox-wc"

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
    container = await asyncio.to_thread(_container_setup, settings.data_dir)
    if isinstance(container, str):
        print(f"{CONTAINER_CAPABILITY}: skipped ({container})")
    else:
        settings = dataclasses.replace(
            settings,
            capabilities=(*settings.capabilities, container.capability),
            podman_socket=str(container.service.socket),
        )
    try:
        return await _run_examples(
            settings, started, None if isinstance(container, str) else container
        )
    finally:
        if not isinstance(container, str):
            await asyncio.to_thread(container.service.stop)


async def _run_examples(
    settings: config.Settings, started: float, container: _Container | None
) -> int:
    node = Node(settings, executor_factory=build_executors)
    await node.start()
    print(f"peer {node.peer_id} serving on {node.address} ({time.monotonic() - started:.1f} s)\n")
    failures = 0
    try:
        token = settings.token_path.read_text().strip() if settings.auth else None
        async with ComputeClient(node.address, token=token) as client:
            examples = await _examples(client, settings.data_dir / "demo-inputs")
            if container is not None:
                examples.append(await _container_example(client, container, examples[0]))
            for example in examples:
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
    refs = {path.name: await client.upload(path, bucket=DEMO_BUCKET) for path in paths}

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


@dataclass(frozen=True)
class _Container:
    service: PodmanService
    archive: Path
    capability: LocalCapability


def _container_setup(data_dir: Path) -> _Container | str:
    """Build the example image and start a private Podman service; or why not."""
    if shutil.which("podman") is None:
        return "podman is not installed; .ci/install-podman.sh installs it"
    try:
        archive_bytes, image_id = example_image.build()
    except SystemExit as exc:  # the builder explains a missing busybox this way
        return str(exc)
    archive = data_dir / "demo-image" / "busybox.oci.tar"
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(archive_bytes)
    digest = hashlib.sha256(archive_bytes).hexdigest()
    # The ref `ComputeClient.upload` gives it (content-addressed), known in advance
    # so the capability can name it before the node starts.
    ref = f"anvil://{DEMO_BUCKET}/{quote(f'{digest}/{archive.name}')}?sha256={digest}"
    capability = parse_capability(
        CONTAINER_CAPABILITY,
        {"podman_image": image_id, "podman_archive": ref, "command": ["wc", "-w"]},
    )
    service = PodmanService(data_dir / "podman", private_storage=True)
    try:
        service.start()
    except Unavailable as exc:
        return f"podman did not start: {str(exc).splitlines()[-1]}"
    return _Container(service=service, archive=archive, capability=capability)


async def _container_example(
    client: ComputeClient, container: _Container, wordcount: Example
) -> Example:
    ref = await client.upload(container.archive, bucket=DEMO_BUCKET)
    if ref != container.capability.image_archive:
        raise RuntimeError(f"the image archive was stored as {ref}, not where expected")
    return Example(
        CONTAINER_CAPABILITY,
        wordcount.inputs,
        {},
        lambda s: f"{s.output.decode().strip()} words, by busybox wc in a container",
    )


def _first_line(status: compute_pb2.GetJobStatusResponse) -> str:
    return status.output.decode().strip().splitlines()[0][:160]
