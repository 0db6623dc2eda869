"""One peer: assembles registry, storage, executors, jobs and server; starts and drains.

`start` brings the peer up in named phases, each registering what it opened
on one exit stack: the registry (and migrations), storage, the job machinery,
the server, and only then this peer's rows and its loops, so a job is never
placed here before this peer can run it. `stop` is the reverse: stop taking
work, drain running jobs, deregister, then close what the phases opened, last
opened first. It also undoes a start that failed halfway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc

import hrw
from daemon import auth
from daemon.capability_config import LocalCapability, example_capabilities
from daemon.config import Settings
from daemon.deployer import Deployer
from daemon.exceptions import AnvilError, ConfigError, FailedPrecondition
from daemon.executors.result import JobExecutor
from daemon.jobs.attempt import AttemptOptions
from daemon.jobs.dispatch import PeerLinks
from daemon.jobs.events import JobEventHub
from daemon.jobs.peer_view import PeerView
from daemon.jobs.placer import PlacementPolicy, Placer
from daemon.jobs.pruner import Pruner
from daemon.jobs.rescuer import Rescuer
from daemon.jobs.runner import Runner, RunnerOptions
from daemon.local_tokens import TOKEN_CHECK_INTERVAL_S, PeerToken, write_local_tokens
from daemon.loops import Background, every
from daemon.modules import check_fetched, pin_capabilities
from daemon.registration import Registration
from daemon.registry import Registry
from daemon.registry.embedded import EmbeddedPostgres
from daemon.registry.health import RegistryWatch
from daemon.registry.listener import JOB_EVENTS, MEMBERSHIP, Listener, peer_channel
from daemon.server import Server, ServerOptions
from daemon.services.compute import ComputeService
from daemon.services.peer import PeerService
from daemon.storage import results
from daemon.storage.anvil_client import AnvilClient
from daemon.storage.cache import DiskCache
from daemon.storage.fabric import FORWARDED_HEADER, Fabric, Owner
from daemon.storage.fabric_service import FabricObjectService
from daemon.storage.fetcher import Fetcher
from daemon.storage.local_store import LocalStore
from daemon.storage.rebalance import Rebalancer

log = logging.getLogger(__name__)

# Deployments are followed on NOTIFY; this poll is the backstop.
DEPLOY_POLL_S = 2.0


def load_or_create_peer_id(data_dir: Path) -> uuid.UUID:
    """This peer's stable identity, kept in DATA_DIR/peer_id."""
    path = data_dir / "peer_id"
    try:
        return uuid.UUID(path.read_text().strip())
    except FileNotFoundError:
        peer_id = uuid.uuid4()
        path.write_text(f"{peer_id}\n")
        return peer_id
    except ValueError as exc:
        raise ConfigError(f"{path} does not hold a UUID") from exc


# (settings, the fetcher of objects: modules, inputs, image archives) -> executors by kind
ExecutorFactory = Callable[[Settings, Fetcher], Awaitable[Mapping[str, JobExecutor]]]


@dataclass(slots=True)
class _Parts:
    """What the phases of `Node.start` build, for the phases after them."""

    url: str = ""
    registry: Registry | None = None
    listener: Listener | None = None
    hub: JobEventHub | None = None
    view: PeerView | None = None
    store: LocalStore | None = None
    fabric: Fabric | None = None
    fetcher: Fetcher | None = None
    links: PeerLinks | None = None
    placer: Placer | None = None


class Node:
    def __init__(self, settings: Settings, *, executor_factory: ExecutorFactory) -> None:
        self.settings = settings
        self._executor_factory = executor_factory
        self._stack = contextlib.AsyncExitStack()
        self._background = Background()
        self._parts = _Parts()
        self.peer_id: uuid.UUID | None = None
        self.address = ""
        self.server: Server | None = None
        self.runner: Runner | None = None
        self.registry: Registry | None = None
        self.registration: Registration | None = None
        self.deployer: Deployer | None = None
        self._executor_kinds: frozenset[str] = frozenset()
        self._deploy_wake = asyncio.Event()
        self.hrw_backend = ""
        self._secret: bytes | None = None
        # This peer's capabilities, their modules pinned (set by start()).
        self.capabilities: tuple[LocalCapability, ...] = settings.capabilities

    async def start(self) -> None:
        """Bring the peer up; raise ConfigError / RegistryUnavailable on failure
        (`stop` then closes what was opened)."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.peer_id = load_or_create_peer_id(s.data_dir)
        # numba loads and compiles (or reads its cache) in a thread meanwhile,
        # so the first placement after READY costs what the hundredth does.
        warm_up = asyncio.create_task(asyncio.to_thread(hrw.warm_up), name="hrw-warm-up")
        try:
            await self._start_registry()
            await self._start_storage()
            await self._start_jobs()
            await self._start_server()
            self.hrw_backend = await warm_up
            await self._come_online()
        finally:
            if not warm_up.done():
                warm_up.cancel()
        log.info(
            "peer %s serving on %s (region %s, capabilities %s; hrw %s)",
            self.peer_id,
            self.address,
            s.region,
            ", ".join(sorted(c.name for c in self.capabilities)) or "none",
            self.hrw_backend,
        )
        examples = {str(c.module) for c in example_capabilities()}
        if not examples & {c.module for c in self.capabilities}:
            log.info(
                "the example capabilities are not offered: the config's [capabilities] "
                'tables replace them; name one as wasm = "builtin:text-wordcount" to keep it'
            )

    # -- phases ---------------------------------------------------------------
    async def _start_registry(self) -> None:
        """PostgreSQL (embedded when no URL is set), migrations, LISTEN, the job events."""
        s, parts, stack = self.settings, self._parts, self._stack
        assert self.peer_id is not None
        url = s.database_url
        if url is None:
            embedded = EmbeddedPostgres(s.data_dir / "postgres")
            url = await asyncio.to_thread(embedded.start)
            stack.push_async_callback(asyncio.to_thread, embedded.close)
        parts.url = url
        self.registry = parts.registry = await Registry.connect(
            url, peer_ttl=timedelta(seconds=s.peer_ttl_s), max_size=s.db_pool_size
        )
        stack.push_async_callback(parts.registry.close)
        parts.listener = Listener(url, [JOB_EVENTS, MEMBERSHIP, peer_channel(self.peer_id.hex)])
        await parts.listener.start()
        stack.push_async_callback(parts.listener.close)
        parts.hub = JobEventHub(parts.listener)
        await parts.hub.start()
        stack.push_async_callback(parts.hub.close)
        parts.view = PeerView(parts.registry, parts.listener, refresh_s=max(s.peer_ttl_s / 3, 0.2))
        stack.push_async_callback(parts.view.close)

    async def _start_storage(self) -> None:
        """The built-in store, the verified cache, links to the other peers' stores."""
        s, parts, stack = self.settings, self._parts, self._stack
        assert self.peer_id is not None and parts.view is not None
        parts.store = LocalStore(s.data_dir, max_bytes=s.max_store_bytes)
        cache = DiskCache(s.data_dir / "cache", max_bytes=s.cache_max_bytes)
        stack.push_async_callback(asyncio.to_thread, cache.close)
        if s.auth:
            self._secret = auth.load_or_create_secret(s.secret_path)
            write_local_tokens(s, self._secret)
        credentials = (
            auth.channel_credentials(
                ca=s.peer_tls_ca_file, cert=s.peer_tls_cert_file, key=s.peer_tls_key_file
            )
            if s.peer_tls_ca_file
            else None
        )
        token = PeerToken(self._secret, self.peer_id)
        parts.links = PeerLinks(token=token, credentials=credentials)
        stack.push_async_callback(parts.links.close)
        view, region = parts.view, s.region

        def owners(key: str) -> list[Owner]:
            order = view.store_peers(region).failover_order(key)
            return [Owner(c.peer_id, c.address) for c in order]

        parts.fabric = Fabric(
            store=parts.store,
            peer_id=self.peer_id,
            owners=owners,
            connect=functools.partial(_peer_store, token=token, credentials=credentials),
        )
        stack.push_async_callback(parts.fabric.close)
        parts.fetcher = Fetcher(cache, local=parts.store, anvil=parts.fabric)

    async def _start_jobs(self) -> None:
        """Pinned capabilities, executors, the runner, and placement."""
        s, parts, stack = self.settings, self._parts, self._stack
        assert self.peer_id is not None and parts.registry is not None and parts.view is not None
        assert parts.fetcher is not None and parts.fabric is not None and parts.hub is not None
        assert parts.links is not None
        # Modules named by object refs are resolved over the fabric's current members.
        await parts.view.refresh()
        self.capabilities = await pin_capabilities(s.capabilities, parts.fetcher.pin)
        executors = await self._executor_factory(s, parts.fetcher)
        # The operator's ceiling on any job's timeout: the runner and placement share it.
        max_timeout_ms = round(s.max_job_timeout_s * 1000)
        for executor in executors.values():
            stack.push_async_callback(executor.close)
        self._executor_kinds = frozenset(executors)
        self.runner = runner = Runner(
            registry=parts.registry,
            peer_id=self.peer_id,
            capabilities={c.name: c for c in self.capabilities},
            executors=executors,
            fetcher=parts.fetcher,
            fabric=parts.fabric,
            hub=parts.hub,
            options=RunnerOptions(
                lease=timedelta(seconds=s.lease_s),
                poll_interval_s=s.poll_interval_s,
                attempt=AttemptOptions(
                    max_inline_output=s.max_inline_output,
                    default_timeout_ms=s.default_timeout_ms,
                    max_timeout_ms=max_timeout_ms,
                ),
                executor_slots={
                    kind: ex.capacity for kind, ex in executors.items() if ex.capacity is not None
                },
                max_running=s.max_running_jobs,
                work_root=s.data_dir / "work",
            ),
        )
        peer_id, links = self.peer_id, parts.links

        def dispatch(target: uuid.UUID, address: str, job_id: uuid.UUID) -> None:
            if target == peer_id:
                runner.wake()
            else:
                links.dispatch_soon(address, job_id)

        parts.placer = Placer(
            view=parts.view,
            dispatch=dispatch,
            policy=PlacementPolicy(balance=s.balance, max_timeout_ms=max_timeout_ms),
        )

    async def _start_server(self) -> None:
        """The gRPC server, NOT_SERVING until the peer comes online; the registry watch."""
        s, parts, stack = self.settings, self._parts, self._stack
        assert self.peer_id is not None and parts.registry is not None and parts.view is not None
        assert parts.hub is not None and parts.placer is not None and parts.fabric is not None
        assert parts.fetcher is not None and self.runner is not None
        tls = (
            auth.server_credentials(
                auth.TlsFiles(
                    cert=s.tls_cert_file, key=s.tls_key_file, client_ca=s.tls_client_ca_file
                )
            )
            if s.tls_cert_file and s.tls_key_file
            else None
        )
        self.server = server = Server(
            ServerOptions(listen=s.listen, secret=self._secret, credentials=tls),
            compute=ComputeService(
                registry=parts.registry,
                view=parts.view,
                hub=parts.hub,
                placer=parts.placer,
                resolve_module=parts.fetcher.pin,
                check_module=functools.partial(check_fetched, parts.fetcher),
                region=s.region,
                queue_timeout_ms=round(s.queue_timeout_s * 1000),
            ),
            peer=PeerService(peer_id=self.peer_id, region=s.region, worker=self.runner),
            objects=FabricObjectService(parts.fabric, owner_of=parts.registry.jobs.owner),
        )
        await server.set_serving(False)
        await server.start()
        stack.push_async_callback(server.stop, 1.0)
        watch = RegistryWatch(
            parts.url, parts.registry.pool, on_change=server.set_registry_reachable
        )
        await watch.start()
        stack.push_async_callback(watch.close)
        self.address = s.advertise or server.address

    async def _come_online(self) -> None:
        """Announce this peer, start claiming, start the loops, then serve."""
        s, parts = self.settings, self._parts
        assert self.peer_id is not None and parts.registry is not None and parts.view is not None
        assert parts.placer is not None and parts.store is not None and parts.fabric is not None
        assert parts.listener is not None and self.runner is not None and self.server is not None
        registry, store, view, fabric = parts.registry, parts.store, parts.view, parts.fabric
        self.registration = registration = Registration(
            registry=registry, peer_id=self.peer_id, region=s.region, config=self._config
        )
        await registration.announce(self.address, prune=True)
        assert parts.fetcher is not None
        runner = self.runner
        self.deployer = deployer = Deployer(
            registry=registry,
            peer_id=self.peer_id,
            region=s.region,
            config=self._config,
            kinds=self._executor_kinds,
            check_module=functools.partial(check_fetched, parts.fetcher),
            apply=runner.set_capabilities,
        )
        # What was deployed to this peer (or its region) before it started runs
        # again, checked, before it takes any job.
        await deployer.sync()
        await view.start()
        await runner.start()
        self._stack.push_async_callback(runner.close)
        rescuer = Rescuer(registry=registry, view=view, placer=parts.placer)
        pruner = Pruner(
            registry=registry,
            retention=timedelta(seconds=s.job_retention_s) if s.job_retention_s else None,
            sweep_results=lambda: results.sweep(store, registry.jobs.outputs),
            min_interval_s=max(s.lease_s / 4, 0.2),
        )
        rebalancer = Rebalancer(
            fabric=fabric,
            store=store,
            members=lambda: frozenset(
                str(c.peer_id) for c in view.store_peers(s.region).candidates
            ),
        )
        loops = self._background
        loops.start(
            "peer-heartbeat", every(s.heartbeat_s, registration.heartbeat, what="heartbeat")
        )
        loops.start("rescuer", every(max(s.lease_s / 4, 0.2), rescuer.sweep, what="rescue sweep"))
        loops.start("job-pruner", every(pruner.interval_s, pruner.run_once, what="pruning"))
        loops.start("object-rebalancer", rebalancer.run())
        loops.start(
            "deployments",
            every(
                DEPLOY_POLL_S, deployer.sync, what="following deployments", wake=self._deploy_wake
            ),
        )
        loops.start("deploy-notify", self._membership_news(parts.listener))
        loops.start("queue-notify", self._queue_notifications(parts.listener))
        if self._secret is not None:
            secret = self._secret

            async def renew_tokens() -> None:
                await asyncio.to_thread(write_local_tokens, s, secret)

            loops.start(
                "token-renewal",
                every(TOKEN_CHECK_INTERVAL_S, renew_tokens, what="renewing the local tokens"),
            )
        await self.server.set_serving(True)

    def _config(self) -> tuple[LocalCapability, ...]:
        """The capabilities this peer's config gives, modules pinned (reload changes them)."""
        return self.capabilities

    async def _membership_news(self, listener: Listener) -> None:
        """Capabilities deployed, undeployed or re-checked: follow them at once."""
        async with listener.subscribe(MEMBERSHIP) as queue:
            while True:
                await queue.get()
                self._deploy_wake.set()

    async def reload_capabilities(self, capabilities: tuple[LocalCapability, ...]) -> None:
        """Run the capabilities of a re-read config from now on (SIGHUP): pinned,
        announced (rows the config no longer names are pruned), claimed. Raises
        AnvilError, and then nothing changed."""
        parts = self._parts
        if self.registration is None or self.deployer is None or parts.fetcher is None:
            raise FailedPrecondition("the peer has not started")
        pinned = await pin_capabilities(capabilities, parts.fetcher.pin)
        kinds = {c.kind for c in pinned} - self._executor_kinds
        if kinds:
            raise FailedPrecondition(
                f"the new config needs a {', '.join(sorted(kinds))} executor this peer did not "
                "start with: restart it"
            )
        self.capabilities = pinned
        await self.registration.announce(self.address, prune=True)
        await self.deployer.sync()
        log.info("reloaded capabilities: %s", ", ".join(c.name for c in pinned) or "none")

    async def _queue_notifications(self, listener: Listener) -> None:
        assert self.runner is not None and self.peer_id is not None
        async with listener.subscribe(peer_channel(self.peer_id.hex)) as queue:
            while True:
                await queue.get()
                self.runner.wake()

    async def stop(self, *, drain_s: float | None = None) -> None:
        """Stop taking work, drain running jobs, deregister, stop serving, close."""
        grace = self.settings.drain_grace_s if drain_s is None else drain_s
        if self.server is not None:
            await self.server.set_serving(False)
        if self.registry is not None and self.peer_id is not None:
            with contextlib.suppress(AnvilError):
                await self.registry.peers.set_state(self.peer_id, "draining")
        if self.runner is not None:
            await self.runner.drain(grace)
        await self._background.close()
        if self.registration is not None:
            with contextlib.suppress(AnvilError):
                await self.registration.leave()
        try:
            await self._stack.aclose()
        except Exception:
            log.exception("error while shutting down")


def _peer_store(
    address: str, *, token: PeerToken, credentials: grpc.ChannelCredentials | None
) -> AnvilClient:
    """A client of another peer's store; its calls are never forwarded again."""

    def metadata() -> list[tuple[str, str]]:
        bearer = token()
        return [
            *([("authorization", f"Bearer {bearer}")] if bearer else []),
            (FORWARDED_HEADER, "1"),
        ]

    return AnvilClient.connect(address, credentials=credentials, metadata=metadata)
