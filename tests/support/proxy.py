"""A TCP proxy on 127.0.0.1 that a test can pause, cut with a reset, and point elsewhere.

Clients that reconnect by themselves (pusher-js) connect to the proxy's port; the
test decides what their connections meet:

* :meth:`TcpProxy.reset` aborts every open pair: the client sees a TCP reset (an
  abrupt network loss, no close frame);
* :meth:`TcpProxy.pause` holds new connections: accepted, but nothing is read or
  forwarded until :meth:`TcpProxy.resume` (a reconnect then happens exactly when
  the test is ready for it, no sleep involved);
* :meth:`TcpProxy.retarget` sends the connections made from now on to another
  port (a client reconnecting to another node behind one address).

The proxy runs its own event loop on a daemon thread; every method is called
from the test's thread and returns once done. Bounded: it stops with the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from support.timeouts import scaled

__all__ = ["TcpProxy"]

_T = TypeVar("_T")
_CHUNK = 65_536


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target``.

    Args:
        target: the port connections go to (until :meth:`retarget`).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        #: Connections accepted so far (each reconnect is one more).
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._open = asyncio.Event()

    # --- from the test's thread ---------------------------------------------------------

    def start(self) -> TcpProxy:
        """Listen on a free port (``port``)."""
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        """Close everything and end the thread."""
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(scaled(5))

    def pause(self) -> None:
        """Hold new connections (accepted, not forwarded) until :meth:`resume`."""
        self._loop.call_soon_threadsafe(self._open.clear)

    def resume(self) -> None:
        """Forward held and new connections again."""
        self._loop.call_soon_threadsafe(self._open.set)

    def retarget(self, target: int) -> None:
        """Connections made from now on go to ``target``."""
        self.target = target

    def reset(self) -> int:
        """Abort every open pair with a TCP reset to the client; how many."""
        return self._call(self._reset())

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- on the proxy's loop ------------------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(scaled(10))

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset()

    async def _reset(self) -> int:
        pairs = list(self._pairs)
        self._pairs.clear()
        for client, upstream in pairs:
            sock = client.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close() sends RST, not FIN.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.transport.abort()
            upstream.transport.abort()
        return len(pairs)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    # One side ended: end the other (a FIN stays a FIN).
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()
