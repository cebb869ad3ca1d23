"""A cuttable TCP relay on loopback: a network link that tests and benchmarks can break and mend.

Put it between a leaf node and the cluster (``Topology.set_uplink(leaf, [proxy.url("tls")])``): bytes pass through
untouched (TLS included), :meth:`TcpProxy.cut` drops every relayed connection at once and refuses new ones (what a
dead link looks like to both ends), :meth:`TcpProxy.restore` lets them through again. It runs its own event loop
in a thread, so synchronous and asynchronous callers use it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence

from bus.errors import TransportError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_CHUNK = 64 * 1024  # bytes read at a time per direction
DEFAULT_START_TIMEOUT = 5.0  # seconds for the relay's thread to listen


class TcpProxy:
    """Relays each accepted connection to the first of ``targets`` (host, port) that accepts."""

    def __init__(self, targets: Sequence[tuple[str, int]], host: str = DEFAULT_HOST, port: int = 0) -> None:
        if not targets:
            raise TransportError("a proxy needs at least one target")
        self.targets = list(targets)
        self.host = host
        self.port = port
        self.cuts = 0
        self._cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, scheme: str = "nats") -> str:
        """``scheme://host:port`` of the relay."""
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        """Whether the link is down."""
        return self._cut

    def start(self) -> TcpProxy:
        """Listen (in a thread of its own); returns once the port is known."""
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            self._server = loop.run_until_complete(asyncio.start_server(self._relay, self.host, self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(DEFAULT_START_TIMEOUT):
            raise TransportError("the proxy did not start listening")
        return self

    def cut(self) -> None:
        """Drop every relayed connection now and refuse new ones until :meth:`restore`."""
        self._cut = True
        self.cuts += 1
        self._call(self._drop_all)

    def restore(self) -> None:
        """Let connections through again (the ends reconnect by themselves)."""
        self._cut = False

    def stop(self) -> None:
        """Drop everything and end the thread; idempotent."""
        if self._loop is None:
            return
        loop, self._loop = self._loop, None

        async def shutdown() -> None:
            self._drop_all()
            if self._server is not None:
                self._server.close()
            relays = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
            for task in relays:  # let every relay end before the loop does (no task destroyed while pending)
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(timeout=DEFAULT_START_TIMEOUT)

    def _call(self, fn) -> None:
        if self._loop is not None:
            done = threading.Event()

            def run() -> None:
                try:
                    fn()
                finally:
                    done.set()

            self._loop.call_soon_threadsafe(run)
            done.wait(DEFAULT_START_TIMEOUT)

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        upstream = None
        for host, port in self.targets:
            with contextlib.suppress(OSError):
                upstream = await asyncio.open_connection(host, port)
                break
        if upstream is None:
            writer.transport.abort()
            return
        up_reader, up_writer = upstream
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(DEFAULT_CHUNK):
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.transport.abort()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
