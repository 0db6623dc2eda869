"""One peer: assembles registry, storage, executors, runner and server; starts and drains.

Start-up order matters: the registry (and migrations) first, then the server,
then this peer's row and capabilities, and only then the runner, so a job is
never placed here before this peer can serve it. Shutdown is the reverse: stop
taking work, drain running jobs, deregister, stop serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from pathlib import Path

import grpc
import jwt

from daemon import __version__, auth
from daemon.capability_config import LocalCapability
from daemon.config import Settings
from daemon.exceptions import AnvilError, ConfigError, NotFound
from daemon.executors.result import JobExecutor
from daemon.jobs.dispatch import PeerLinks
from daemon.jobs.events import JobEventHub
from daemon.jobs.peer_view import PeerView
from daemon.jobs.rescuer import Rescuer
from daemon.jobs.runner import Runner, RunnerOptions
from daemon.modules import pin_or_explain
from daemon.registry import Registry
from daemon.registry.embedded import EmbeddedPostgres
from daemon.registry.health import RegistryWatch
from daemon.registry.listener import JOB_EVENTS, MEMBERSHIP, Listener, peer_channel
from daemon.registry.models import Capability, CapabilitySpec
from daemon.server import Server, ServerOptions
from daemon.services.compute import ComputeService, SubmitPolicy
from daemon.services.peer import PeerService
from daemon.storage import results
from daemon.storage.anvil_client import AnvilClient
from daemon.storage.cache import DiskCache
from daemon.storage.fabric import FORWARDED_HEADER, Fabric, Owner
from daemon.storage.fabric_service import FabricObjectService
from daemon.storage.fetcher import Fetcher, pin
from daemon.storage.local_store import LocalStore
from daemon.storage.rebalance import Rebalancer

log = logging.getLogger(__name__)

# Tokens `serve` writes into the data directory; renewed while it runs, a day
# before they expire.
CLIENT_TOKEN_TTL_S = 30 * 24 * 3600
TOKEN_RENEW_BEFORE_S = 24 * 3600
TOKEN_CHECK_INTERVAL_S = 3600
PEER_TOKEN_TTL_S = 3600


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


def _token_fresh(path: Path, secret: bytes, scopes: tuple[str, ...]) -> bool:
    """A valid token with exactly these scopes and more than a day left is at `path`."""
    try:
        claims = auth.verify_token(path.read_text().strip(), secret)
    except (OSError, AnvilError, jwt.PyJWTError):
        return False
    return claims.exp - time.time() > TOKEN_RENEW_BEFORE_S and claims.scopes == frozenset(scopes)


def write_local_tokens(settings: Settings, secret: bytes) -> None:
    """client.token (a tenant: its own jobs, every bucket) and operator.token
    (registration, every job), 0600 in the data directory; kept if still fresh."""
    for path, sub, scopes in (
        (settings.token_path, "local-client", auth.CLIENT_SCOPES),
        (settings.operator_token_path, "local-operator", auth.OPERATOR_SCOPES),
    ):
        if not _token_fresh(path, secret, scopes):
            auth.write_token(path, secret, sub=sub, scopes=scopes, ttl_s=CLIENT_TOKEN_TTL_S)


async def pin_capabilities(
    capabilities: tuple[LocalCapability, ...], fetcher: Fetcher
) -> tuple[LocalCapability, ...]:
    """Each WASM capability with its module pinned by sha256 (resolved now when the
    config gives none). Raises AnvilError naming the capability."""
    pinned = []
    for cap in capabilities:
        if cap.kind != "wasm":
            pinned.append(cap)
            continue
        module, digest = await pin_or_explain(
            cap.name, cap.module, cap.module_sha256, resolve=functools.partial(pin, fetcher)
        )
        pinned.append(dataclasses.replace(cap, module=module, module_sha256=digest))
    return tuple(pinned)


# (settings, the fetcher of objects: modules, inputs, image archives) -> executors by kind
ExecutorFactory = Callable[[Settings, Fetcher], Awaitable[Mapping[str, JobExecutor]]]


class Node:
    def __init__(self, settings: Settings, *, executor_factory: ExecutorFactory) -> None:
        self.settings = settings
        self._executor_factory = executor_factory
        self._cleanup: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.peer_id: uuid.UUID | None = None
        self.address = ""
        self.server: Server | None = None
        self.runner: Runner | None = None
        self.registry: Registry | None = None
        self._peer_token: tuple[str, float] | None = None
        self._secret: bytes | None = None
        # This peer's capabilities, their modules pinned (set by start()).
        self.capabilities: tuple[LocalCapability, ...] = settings.capabilities

    async def start(self) -> None:
        """Bring the peer up; raise ConfigError / RegistryUnavailable on failure."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.peer_id = peer_id = load_or_create_peer_id(s.data_dir)
        url = s.database_url
        if url is None:
            embedded = EmbeddedPostgres(s.data_dir / "postgres")
            url = await asyncio.to_thread(embedded.start)
            self._cleanup.append(lambda: asyncio.to_thread(embedded.close))
        self.registry = registry = await Registry.connect(
            url, peer_ttl=timedelta(seconds=s.peer_ttl_s), max_size=s.db_pool_size
        )
        self._cleanup.append(registry.close)

        listener = Listener(url, [JOB_EVENTS, MEMBERSHIP, peer_channel(peer_id.hex)])
        await listener.start()
        self._cleanup.append(listener.close)
        hub = JobEventHub(listener)
        await hub.start()
        self._cleanup.append(hub.close)
        view = PeerView(registry, listener, refresh_s=max(s.peer_ttl_s / 3, 0.2))
        self._cleanup.append(view.close)

        store = LocalStore(s.data_dir, max_bytes=s.max_store_bytes)
        cache = DiskCache(s.data_dir / "cache", max_bytes=s.cache_max_bytes)
        self._cleanup.append(lambda: asyncio.to_thread(cache.close))

        if s.auth:
            self._secret = auth.load_or_create_secret(s.secret_path)
            write_local_tokens(s, self._secret)
        peer_credentials = (
            auth.channel_credentials(
                ca=s.peer_tls_ca_file, cert=s.peer_tls_cert_file, key=s.peer_tls_key_file
            )
            if s.peer_tls_ca_file
            else None
        )
        links = PeerLinks(token=self._peer_bearer, credentials=peer_credentials)
        self._cleanup.append(links.close)

        def owners(key: str) -> list[Owner]:
            order = view.store_peers(s.region).failover_order(key)
            return [Owner(c.peer_id, c.address) for c in order]

        fabric = Fabric(
            store=store,
            peer_id=peer_id,
            owners=owners,
            connect=lambda address: self._peer_store(address, peer_credentials),
        )
        self._cleanup.append(fabric.close)
        fetcher = Fetcher(cache, local=store, anvil=fabric)
        # Modules named by object refs are resolved over the fabric's current members.
        await view.refresh()
        self.capabilities = await pin_capabilities(s.capabilities, fetcher)

        executors = await self._executor_factory(s, fetcher)
        for executor in executors.values():
            self._cleanup.append(executor.close)
        capabilities = {c.name: c for c in self.capabilities}
        self.runner = runner = Runner(
            registry=registry,
            peer_id=peer_id,
            capabilities=capabilities,
            executors=executors,
            fetcher=fetcher,
            fabric=fabric,
            hub=hub,
            options=RunnerOptions(
                lease=timedelta(seconds=s.lease_s),
                poll_interval_s=s.poll_interval_s,
                max_inline_output=s.max_inline_output,
                default_timeout_ms=s.default_timeout_ms,
                max_timeout_ms=round(s.max_job_timeout_s * 1000),
                executor_slots={
                    kind: ex.capacity for kind, ex in executors.items() if ex.capacity is not None
                },
                max_running=s.max_running_jobs,
                work_root=s.data_dir / "work",
            ),
        )

        def dispatch(target: uuid.UUID, address: str, job_id: uuid.UUID) -> None:
            if target == peer_id:
                runner.wake()
            else:
                links.dispatch_soon(address, job_id)

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
                registry=registry,
                view=view,
                hub=hub,
                dispatch=dispatch,
                policy=SubmitPolicy(
                    balance=s.balance, max_timeout_ms=round(s.max_job_timeout_s * 1000)
                ),
                resolve_module=functools.partial(pin, fetcher),
            ),
            peer=PeerService(peer_id=peer_id, region=s.region, worker=runner),
            objects=FabricObjectService(fabric, owner_of=registry.jobs.owner),
        )
        await server.set_serving(False)
        await server.start()
        self._cleanup.append(lambda: server.stop(1.0))
        watch = RegistryWatch(url, registry.pool, on_change=server.set_registry_reachable)
        await watch.start()
        self._cleanup.append(watch.close)
        self.address = s.advertise or server.address

        await self._announce(prune=True)
        await view.start()
        await runner.start()
        self._cleanup.append(runner.close)
        rescuer = Rescuer(
            registry=registry,
            view=view,
            dispatch=dispatch,
            interval_s=max(s.lease_s / 4, 0.2),
            retention=timedelta(seconds=s.job_retention_s) if s.job_retention_s else None,
            sweep_results=lambda: results.sweep(store, registry.jobs.outputs),
        )
        rebalancer = Rebalancer(
            fabric=fabric,
            store=store,
            members=lambda: frozenset(
                str(c.peer_id) for c in view.store_peers(s.region).candidates
            ),
        )
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="peer-heartbeat"),
            asyncio.create_task(rescuer.run(), name="rescuer"),
            asyncio.create_task(rescuer.prune_loop(), name="job-pruner"),
            asyncio.create_task(rebalancer.run(), name="object-rebalancer"),
            asyncio.create_task(self._queue_notifications(listener), name="queue-notify"),
        ]
        if self._secret is not None:
            self._tasks.append(asyncio.create_task(self._token_loop(), name="token-renewal"))
        await server.set_serving(True)
        log.info(
            "peer %s serving on %s (region %s, capabilities %s)",
            peer_id,
            self.address,
            s.region,
            ", ".join(sorted(capabilities)) or "none",
        )

    async def _announce(self, *, prune: bool = False) -> None:
        """Register this peer and the capabilities it runs (idempotent upserts).

        With `prune`, rows for capabilities this peer no longer offers are
        removed: they would attract jobs that nobody here claims.
        """
        s, registry, peer_id = self.settings, self.registry, self.peer_id
        assert registry is not None and peer_id is not None
        await registry.peers.upsert(
            peer_id=peer_id, address=self.address, region=s.region, version=__version__
        )
        if prune:
            stale = await registry.capabilities.prune(peer_id, [c.name for c in self.capabilities])
            if stale:
                log.warning("no longer offering %s: removed from the registry", ", ".join(stale))
        for spec in self._own_rows():
            await registry.capabilities.register(spec)

    def _own_rows(self) -> list[CapabilitySpec]:
        """The registry rows this peer's capabilities should have."""
        assert self.peer_id is not None
        return [
            CapabilitySpec(
                peer_id=self.peer_id,
                region=self.settings.region,
                capability=cap.name,
                resources=cap.resources,
                max_concurrency=cap.max_concurrency,
                executor=cap.executor_message(),
            )
            for cap in self.capabilities
        ]

    async def _reassert(self) -> None:
        """Restore this peer's rows where someone changed or removed them.

        One read per heartbeat; a write (and the membership NOTIFY it causes)
        only when a row differs, so a tampered row heals within a heartbeat.
        """
        assert self.registry is not None and self.peer_id is not None
        found = {
            c.capability: c for c in await self.registry.capabilities.find(peer_id=self.peer_id)
        }
        for spec in self._own_rows():
            row = found.get(spec.capability)
            if row is None or _row_differs(row, spec):
                log.warning(
                    "registry row of %s on this peer was changed or removed: restoring it",
                    spec.capability,
                )
                await self.registry.capabilities.register(spec)

    def _peer_bearer(self) -> str | None:
        if self._secret is None:
            return None
        now = time.time()
        # Renewed well before expiry: a call may sit in a retry loop for minutes.
        if self._peer_token is None or self._peer_token[1] - now < PEER_TOKEN_TTL_S / 4:
            token = auth.issue_token(
                self._secret,
                sub=f"peer:{self.peer_id}",
                scopes=[auth.SCOPE_PEER, auth.SCOPE_OBJECT_READ, auth.SCOPE_OBJECT_WRITE],
                ttl_s=PEER_TOKEN_TTL_S,
            )
            self._peer_token = (token, now + PEER_TOKEN_TTL_S)
        return self._peer_token[0]

    def _peer_store(self, address: str, credentials: grpc.ChannelCredentials | None) -> AnvilClient:
        """A client of another peer's store; its calls are never forwarded again."""

        def metadata() -> list[tuple[str, str]]:
            token = self._peer_bearer()
            bearer = [("authorization", f"Bearer {token}")] if token else []
            return [*bearer, (FORWARDED_HEADER, "1")]

        return AnvilClient.connect(address, credentials=credentials, metadata=metadata)

    async def _heartbeat_loop(self) -> None:
        assert self.registry is not None and self.peer_id is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self.registry.peers.heartbeat(self.peer_id)
                await self._reassert()
            except NotFound:
                # The row is gone (deleted by hand, a restored database): announce
                # this peer again, or it would never be placed on.
                await self._announce()
            except AnvilError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat failed")

    async def _token_loop(self) -> None:
        """Keep client.token and operator.token valid while the peer runs."""
        assert self._secret is not None
        while True:
            await asyncio.sleep(TOKEN_CHECK_INTERVAL_S)
            try:
                await asyncio.to_thread(write_local_tokens, self.settings, self._secret)
            except (OSError, AnvilError) as exc:
                log.warning("cannot renew the local tokens: %s", exc)

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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # a loop that died must not stop the shutdown
                log.exception("background task %s had failed", task.get_name())
        if self.registry is not None and self.peer_id is not None:
            with contextlib.suppress(AnvilError):
                await self.registry.capabilities.deregister_peer(self.peer_id)
                await self.registry.peers.set_state(self.peer_id, "down")
        while self._cleanup:
            close = self._cleanup.pop()
            try:
                await close()
            except Exception:
                log.exception("error while shutting down")


def _row_differs(row: Capability, spec: CapabilitySpec) -> bool:
    return (
        row.region != spec.region
        or dict(row.resources) != dict(spec.resources)
        or row.max_concurrency != spec.max_concurrency
        or dict(row.executor) != dict(spec.executor)
    )
