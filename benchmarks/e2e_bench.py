"""End-to-end: a trivial WASM job through real peers, beside process baselines.

    python benchmarks/e2e_bench.py [--jobs 2000] [--latency-samples 300]

Starts an embedded PostgreSQL and 1, 2 and 3 `anvil-compute serve` processes
(every state change persisted), then measures in one run:
  - latency of one job: SubmitJob -> terminal state seen by the client (WatchJob),
    p50 / p99 over sequential jobs, on 1 peer;
  - sustained jobs/s from 16 concurrent clients, for 1, 2 and 3 peers;
  - baselines: the same do-nothing work as a subprocess (`/bin/true` and
    `python -c pass`) and as `podman run` (the example busybox image, the
    executor's hardening flags, a private Podman service) when Podman is there.
Prints medians with min-max and ratios; no figure is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wasmtime  # noqa: E402

from daemon.registry.embedded import EmbeddedPostgres  # noqa: E402
from tests.e2e.cluster import Peer, PeerFactory  # noqa: E402

NOOP_WAT = '(module (memory (export "memory") 1) (func (export "_start")))'


def config(module: Path) -> str:
    return f'[capabilities."bench:noop"]\nwasm = "{module}"\nmax_concurrency = 64\n'


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(peer: Peer, n: int) -> list[float]:
    out = []
    async with peer.client() as client:
        for i in range(n + 20):
            t0 = time.perf_counter()
            submitted = await client.submit("bench:noop", locality_key=f"lat-{i}")
            await client.wait(submitted.job_id)
            if i >= 20:  # warm-up: module compile, connections, JIT
                out.append((time.perf_counter() - t0) * 1000)
    return out


async def throughput(cluster: list[Peer], jobs: int, clients: int = 16) -> float:
    per_client = jobs // clients

    async def one(index: int) -> None:
        async with cluster[index % len(cluster)].client() as client:
            for n in range(per_client):
                submitted = await client.submit("bench:noop", locality_key=f"t{index}-{n}")
                await client.wait(submitted.job_id)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    return per_client * clients / (time.perf_counter() - t0)


def process_latency(argv: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def podman_run_latency(n: int) -> list[float]:
    """`podman run` of the example image against a private Podman service."""
    from podman_bench import CONTAINERS, build_image, load_image, podman_run_command

    from daemon.executors.podman.service import PodmanService

    with tempfile.TemporaryDirectory(prefix="e2e-podman-") as tmp:
        root = Path(tmp)
        archive, image = build_image(root)
        with PodmanService(root / "service", containers_conf=CONTAINERS / "containers.conf") as svc:
            await load_image(svc.socket, archive)
            cmd = podman_run_command(svc.socket, image)
            # Off the loop (nothing else runs by now); the first run is a warm-up.
            return (await asyncio.to_thread(process_latency, cmd, n + 1))[1:]


def show(name: str, samples: list[float], ours_p50: float | None = None) -> None:
    p50 = statistics.median(samples)
    ratio = f"  {p50 / ours_p50:8.1f}x ours" if ours_p50 else ""
    print(
        f"  {name:<34} p50 {p50:8.2f} ms  p99 {percentile(samples, 0.99):8.2f} ms"
        f"  [{min(samples):.2f}-{max(samples):.2f}]{ratio}"
    )


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="anvil-bench-"))
    module = root / "noop.wasm"
    module.write_bytes(wasmtime.wat2wasm(NOOP_WAT))
    pg = EmbeddedPostgres(root / "pg")
    url = pg.start()
    secret = root / "secret"
    secret.write_text("bench-" + "s" * 48)
    factory = PeerFactory(root / "peers", url, secret)
    try:
        cluster = [factory.start(config=config(module), ANVIL_MAX_RUNNING_JOBS="64")]
        lat = await latency(cluster[0], args.latency_samples)
        rates = {1: await throughput(cluster, args.jobs)}
        for n in (2, 3):
            cluster.append(factory.start(config=config(module), ANVIL_MAX_RUNNING_JOBS="64"))
            await asyncio.sleep(2)  # let every peer see the new member
            rates[n] = await throughput(cluster, args.jobs)
    finally:
        factory.stop_all()
        pg.close()
        shutil.rmtree(root, ignore_errors=True)

    ours = statistics.median(lat)
    print(f"trivial job, SubmitJob -> terminal state seen by the client ({len(lat)} sequential):")
    show("anvil-compute (WASM, 1 peer)", lat)
    show("subprocess /bin/true", process_latency(["/bin/true"], 200), ours)
    show("subprocess python -c pass", process_latency([sys.executable, "-c", "pass"], 50), ours)
    if shutil.which("podman"):
        show("podman run --rm (busybox echo ok)", await podman_run_latency(20), ours)
    else:
        print("  podman run: skipped (no podman here; .ci/install-podman.sh installs it)")
    print(f"goal p50 <= 5 ms: {ours:.2f} ms {'met' if ours <= 5 else 'NOT met'}")
    print(f"sustained jobs/s, 16 clients each waiting for its job, {args.jobs} jobs:")
    for n, rate in rates.items():
        plural = "s" if n > 1 else " "
        print(f"  {n} peer{plural}  {rate:8.0f} jobs/s  ({rate / rates[1]:.2f}x 1 peer)")
    print(
        f"goal >= 500 jobs/s on one node: {rates[1]:.0f} {'met' if rates[1] >= 500 else 'NOT met'}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--latency-samples", type=int, default=300)
    asyncio.run(main(parser.parse_args()))
