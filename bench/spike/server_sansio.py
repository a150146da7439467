"""Spike candidate 2: asyncio Protocol + httptools + websockets sans-I/O.

One port serves both:

* ``GET /app/x`` with an Upgrade header: httptools parses the request, the head is
  handed to ``websockets.server.ServerProtocol`` which validates the handshake and
  then parses every later frame;
* ``POST /trigger``: the body is framed ONCE with ``websockets.frames.Frame`` and the
  same bytes are written to every subscriber's transport (no await), then ``200 {}``.

``--fanout library`` instead asks each connection's ServerProtocol to frame the
message (one framing per subscriber) to show what pre-framing saves.
``--fanout coalesce`` queues the frame and, once per loop iteration, writes every
frame queued meanwhile as ONE shared bytes object to each subscriber: fewer send()
calls when triggers arrive together (an experiment, not a candidate).

Spike code: no flow control, no limits, no auth. Run on ``--loop asyncio|uvloop``.
The process stops by itself after ``--max-seconds`` or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal

import httptools
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

SUBSCRIBERS: dict[asyncio.Transport, Connection] = {}
FANOUT_MODE = "raw"
_QUEUED: list[bytes] = []


def _flush_queued() -> None:
    data = b"".join(_QUEUED)
    _QUEUED.clear()
    for transport in SUBSCRIBERS:
        transport.write(data)


class Connection(asyncio.Protocol):
    """One TCP connection: HTTP/1.1 until it upgrades, then WebSocket."""

    __slots__ = ("body", "headers", "parser", "transport", "url", "ws")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.ws: ServerProtocol | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_lost(self, exc: Exception | None) -> None:
        SUBSCRIBERS.pop(self.transport, None)

    # httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # data_received sees HttpParserUpgrade next and switches protocol
        if self.parser.get_method() == b"POST" and self.url == b"/trigger":
            self.fan_out(b"".join(self.body))
            self.transport.write(OK)
            if not self.parser.should_keep_alive():
                self.transport.close()
        else:
            self.transport.write(NOT_FOUND)
            self.transport.close()

    # ---------------------------------------------------------------------------------
    def fan_out(self, payload: bytes) -> None:
        if FANOUT_MODE == "raw":
            frame = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
            for transport in SUBSCRIBERS:
                transport.write(frame)
        elif FANOUT_MODE == "coalesce":
            if not _QUEUED:
                asyncio.get_running_loop().call_soon(_flush_queued)
            _QUEUED.append(Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[]))
        else:
            for transport, conn in SUBSCRIBERS.items():
                ws = conn.ws
                assert ws is not None
                ws.send_text(payload)
                for chunk in ws.data_to_send():
                    transport.write(chunk)

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.receive_data(data)
            self.flush_ws()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgrade(data[exc.args[0] :])
        except httptools.HttpParserError:
            self.transport.write(BAD_REQUEST)
            self.transport.close()

    def upgrade(self, rest: bytes) -> None:
        if self.url.partition(b"?")[0] != b"/app/x":
            self.transport.write(NOT_FOUND)
            self.transport.close()
            return
        # The websockets sans-I/O protocol only accepts a request it parsed itself, so
        # it gets the head back as bytes: a per-connection cost, never per message.
        head = [b"GET ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        ws = ServerProtocol()
        ws.receive_data(b"".join(head))
        (request,) = ws.events_received()
        response = ws.accept(request)
        ws.send_response(response)
        for chunk in ws.data_to_send():
            self.transport.write(chunk)
        if response.status_code != 101:
            self.transport.close()
            return
        self.ws = ws
        SUBSCRIBERS[self.transport] = self
        if rest:
            ws.receive_data(rest)
            self.flush_ws()

    def flush_ws(self) -> None:
        ws = self.ws
        assert ws is not None
        ws.events_received()  # clients only receive in this spike; drop what they send
        for chunk in ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.close()


async def serve(port: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Connection, "127.0.0.1", port, backlog=4096)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    server.close()


def main() -> None:
    global FANOUT_MODE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    ap.add_argument("--fanout", choices=["raw", "library", "coalesce"], default="raw")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    args = ap.parse_args()
    FANOUT_MODE = args.fanout
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.port, args.max_seconds))
    else:
        asyncio.run(serve(args.port, args.max_seconds))


if __name__ == "__main__":
    main()
