"""A TCP hop between a peer and PostgreSQL that a test can cut and restore, as a
network partition would: on a cut every connection is dropped and new ones are
refused; on a restore the same address accepts again."""

from __future__ import annotations

import asyncio
import contextlib

from psycopg.conninfo import conninfo_to_dict


class RegistryLink:
    def __init__(self, database_url: str) -> None:
        params = conninfo_to_dict(database_url)
        host = str(params.get("host") or "localhost")
        self._port = int(params.get("port") or 5432)
        self._socket = f"{host}/.s.PGSQL.{self._port}" if host.startswith("/") else None
        self._host = host
        self._dbname = str(params["dbname"])
        self._user = str(params.get("user") or "postgres")
        self._password = str(params.get("password") or "")
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> str:
        """Listen on a free loopback port; return the conninfo that goes through the link."""
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        password = f" password={self._password}" if self._password else ""
        return f"host=127.0.0.1 port={self.port} user={self._user} dbname={self._dbname}{password}"

    async def cut(self) -> None:
        assert self._server is not None
        server, self._server = self._server, None
        server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        await server.wait_closed()

    async def restore(self) -> None:
        """Accept connections again, on the same port."""
        await self.start()

    async def close(self) -> None:
        if self._server is not None:
            await self.cut()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._socket is not None:
            up_reader, up_writer = await asyncio.open_unix_connection(self._socket)
        else:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers += [writer, up_writer]

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
