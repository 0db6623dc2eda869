"""PostgreSQL registry: capabilities, peers and jobs (psycopg 3, async pool)."""

from __future__ import annotations

from datetime import timedelta

from daemon.registry.capabilities import CapabilityStore
from daemon.registry.driver import Pool, open_pool, translate_errors
from daemon.registry.jobs import JobStore
from daemon.registry.migrations import migrate
from daemon.registry.peers import PeerStore

DEFAULT_PEER_TTL = timedelta(seconds=15)


class Registry:
    """The registry's three stores over one connection pool; `close()` closes the pool."""

    def __init__(self, pool: Pool, *, peer_ttl: timedelta = DEFAULT_PEER_TTL) -> None:
        self.pool = pool
        self.capabilities = CapabilityStore(pool, peer_ttl=peer_ttl)
        self.peers = PeerStore(pool, peer_ttl=peer_ttl)
        self.jobs = JobStore(pool)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        peer_ttl: timedelta = DEFAULT_PEER_TTL,
        max_size: int = 10,
        run_migrations: bool = True,
    ) -> Registry:
        """Open a pool (and apply pending migrations); raise RegistryUnavailable."""
        pool = await open_pool(url, max_size=max_size)
        try:
            if run_migrations:
                async with pool.connection() as conn:
                    await migrate(conn)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, peer_ttl=peer_ttl)

    async def close(self) -> None:
        with translate_errors():
            await self.pool.close()

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["CapabilityStore", "JobStore", "PeerStore", "Registry"]
