"""`anvil-compute serve`: run this host's peer until SIGTERM/SIGINT, then drain.

Under systemd (`Type=notify`, systemd/anvil-compute.service) it reports
READY=1 once migrations and registration are done, STATUS= lines as things
change, WATCHDOG=1 from the event loop (so a wedged loop gets the daemon
restarted) and STOPPING=1 when the drain begins. Prometheus metrics are served
on `metrics_listen` for the daemon's whole life.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from daemon import config, logs, metrics
from daemon.config import Settings
from daemon.exceptions import AnvilError
from daemon.executors.result import JobExecutor
from daemon.loops import every
from daemon.node import Node
from daemon.storage.fetcher import Fetcher
from daemon.systemd import Notifier

log = logging.getLogger(__name__)

# How often the queue depth and the STATUS= line are refreshed.
REPORT_INTERVAL_S = 2.0
# Shutdown beyond the drain grace: deregistering, closing pools and workers.
STOP_MARGIN_S = 15.0


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the peer daemon",
        description="Run the peer. With no arguments: embedded PostgreSQL and the built-in "
        "store in the data directory, the example capabilities, 127.0.0.1:50051, "
        "metrics on 127.0.0.1:9464.",
    )
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--listen", metavar="HOST:PORT")
    parser.add_argument("--database-url")
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/anvil-compute/...)")
    parser.add_argument("--region")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="'' turns metrics off")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS)
    parser.set_defaults(handler=run)


async def build_executors(settings: Settings, fetcher: Fetcher) -> Mapping[str, JobExecutor]:
    """The executors this peer can use, by capability kind."""
    from daemon.executors.wasm.job import WasmJobExecutor

    wasm = await WasmJobExecutor.create(settings)
    executors: dict[str, JobExecutor] = {"wasm": wasm}
    if any(cap.kind == "podman" for cap in settings.capabilities):
        from daemon.executors.podman.job import PodmanJobExecutor

        try:
            executors["podman"] = await PodmanJobExecutor.create(settings, fetcher=fetcher)
        except BaseException:
            await wasm.close()
            raise
    return executors


async def serve(
    settings: Settings,
    notifier: Notifier | None = None,
    reload: Callable[[], Settings] | None = None,
) -> None:
    """Run one peer until SIGTERM/SIGINT, then drain; raise AnvilError if it cannot start.

    On SIGHUP (`systemctl reload`), `reload()` re-reads the settings and the
    peer runs their capabilities from then on; other settings need a restart.
    """
    notifier = notifier or Notifier()
    # Bound first: a taken metrics port fails the start before any migration runs.
    metrics_server = (
        metrics.MetricsServer(settings.metrics_listen) if settings.metrics_listen else None
    )
    if metrics_server is not None:
        log.info("metrics on http://%s/metrics", metrics_server.address)
    node = Node(settings, executor_factory=build_executors)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    if reload is not None:

        def on_sighup() -> None:
            task = asyncio.create_task(_reload(node, reload, notifier), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    watchdog = (
        asyncio.create_task(_watchdog(notifier, notifier.watchdog_s), name="systemd-watchdog")
        if notifier.watchdog_s
        else None
    )
    reporter: asyncio.Task[None] | None = None
    try:
        notifier.status("starting: registry, migrations, registration")
        await node.start()
        metrics.PEER.info(
            {
                "peer_id": str(node.peer_id),
                "region": settings.region,
                "address": node.address,
                "hrw_backend": node.hrw_backend,
            }
        )
        metrics.READY.set(1)
        notifier.ready(f"serving on {node.address} as peer {node.peer_id}")
        reporter = asyncio.create_task(_report(node, notifier), name="status-report")
        await stop.wait()
        running = node.runner.running_jobs if node.runner else 0
        log.info(
            "shutting down: draining %d running job(s) for up to %.0f s",
            running,
            settings.drain_grace_s,
        )
        metrics.READY.set(0)
        notifier.stopping(f"draining: {running} job(s) running, up to {settings.drain_grace_s:g} s")
        # The drain grace comes from the config: let it win over TimeoutStopSec.
        notifier.notify(
            extend_timeout_usec=str(int((settings.drain_grace_s + STOP_MARGIN_S) * 1e6))
        )
    except BaseException:
        metrics.READY.set(0)
        notifier.stopping("failed to start" if reporter is None else "stopping after an error")
        raise
    finally:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        try:
            await node.stop()
        finally:
            # The watchdog keeps pinging through the drain: stopping can take a while.
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            if metrics_server is not None:
                await asyncio.to_thread(metrics_server.close)
            notifier.status("stopped")


async def _reload(node: Node, reload: Callable[[], Settings], notifier: Notifier) -> None:
    """Re-read the config's capabilities; a bad config keeps the running ones."""
    notifier.notify(reloading="1")
    try:
        settings = await asyncio.to_thread(reload)
        await node.reload_capabilities(settings.capabilities)
    except AnvilError as exc:
        log.error("reload refused, still running the capabilities from before: %s", exc)
    finally:
        notifier.notify(ready="1")


async def _watchdog(notifier: Notifier, interval_s: float) -> None:
    """WATCHDOG=1 every interval, from the event loop: a blocked loop stops the pings."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval_s)


async def _report(node: Node, notifier: Notifier) -> None:
    """Keep the queue-depth gauge and the STATUS= line current."""
    last = ""

    async def report() -> None:
        nonlocal last
        running = node.runner.running_jobs if node.runner else 0
        queued: int | None = None
        if node.registry is not None and node.peer_id is not None:
            try:
                loads = await node.registry.jobs.active_load()
            except AnvilError as exc:
                log.debug("queue depth not refreshed: %s", exc)
            else:
                # active_load counts queued + running jobs placed on each peer.
                queued = max(0, loads.get(node.peer_id, 0) - running)
                metrics.QUEUE_DEPTH.set(queued)
        status = f"serving on {node.address}: {running} running" + (
            f", {queued} queued" if queued is not None else ""
        )
        if status != last:
            notifier.status(status)
            last = status

    await every(REPORT_INTERVAL_S, report, what="status report", at_once=True)


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level or "info")
    notifier = Notifier()
    try:

        def load() -> Settings:
            return config.load(
                config_file=args.config,
                overrides={
                    "data_dir": args.data_dir,
                    "listen": args.listen,
                    "database_url": args.database_url,
                    "region": args.region,
                    "metrics_listen": args.metrics_listen,
                    "log_level": args.log_level,
                },
            )

        settings = load()
        logs.setup(settings.log_level)
        import uvloop

        uvloop.run(serve(settings, notifier, reload=load))
    except AnvilError as exc:
        # `systemctl status` shows why; the CLI prints the same line on stderr.
        notifier.status(f"failed: {exc}")
        raise
    finally:
        notifier.close()
    return 0
