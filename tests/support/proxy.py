"""A TCP proxy on loopback that tests can stall or cut, to fail the network for real."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """Listens on 127.0.0.1 and forwards each connection to a Unix socket or TCP address.

    ``stall()`` keeps connections open but stops moving bytes (a dead network
    without FIN); ``resume()`` moves them again; ``cut()`` closes every
    connection (a reset); ``block()`` cuts and refuses new ones until
    ``unblock()`` (the database is unreachable); ``refuse()`` refuses new ones
    and leaves the open ones be; ``retarget()`` cuts and sends new
    connections to another TCP address (a Service routing to another pod).
    ``delay`` seconds hold every byte from the server to the client that long (a
    slow link; order is kept; a change applies to connections made after it).
    """

    def __init__(
        self, unix_path: str | None = None, host: str | None = None, port: int | None = None, delay: float = 0.0
    ) -> None:
        self.unix_path, self.host, self.target_port = unix_path, host, port
        self.delay = delay
        self.port = 0
        self.connections = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.blocked = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def block(self) -> None:
        self.blocked = True
        self.cut()

    def refuse(self) -> None:
        """Refuse new connections; the open ones go on (``unblock()`` ends this)."""
        self.blocked = True

    def unblock(self) -> None:
        self.blocked = False

    def retarget(self, host: str, port: int) -> None:
        self.unix_path, self.host, self.target_port = None, host, port
        self.cut()

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.blocked:
            writer.transport.abort()
            return
        try:
            if self.unix_path is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self.unix_path)
            else:
                up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for source, sink, late in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.get_running_loop().create_task(self._pump(source, sink, late))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, late: bool) -> None:
        if late and self.delay:
            await self._pump_late(source, sink)
            return
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ConnectionError):
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        sink.transport.abort()
        self._writers.discard(sink)

    async def _pump_late(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Forward each chunk ``delay`` seconds after it was read (reading goes on meanwhile)."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ConnectionError):
                while data := await source.read(65536):
                    chunks.put_nowait((loop.time() + self.delay, data))
            chunks.put_nowait((loop.time() + self.delay, b""))

        reader = loop.create_task(read())
        try:
            with contextlib.suppress(OSError, ConnectionError):
                while True:
                    due, data = await chunks.get()
                    await asyncio.sleep(max(0.0, due - loop.time()))
                    if not data:
                        break
                    await self._flowing.wait()
                    sink.write(data)
                    await sink.drain()
        finally:
            reader.cancel()
            sink.transport.abort()
            self._writers.discard(sink)
