"""Spike candidate 3: picows WebSocket listener.

picows' listener only speaks the WebSocket upgrade: its docs say incoming requests
must be HTTP/1.1 GET without a body (a non-zero Content-Length is rejected), and a
non-101 answer is always sent with ``Connection: close``. So ``POST /trigger`` with a
JSON body cannot be served on the WebSocket port at all. To still measure fan-out,
this server opens a SECOND port on the same loop with a tiny httptools HTTP protocol
for ``POST /trigger``; it prints ``listening WS_PORT HTTP_PORT``.

``--fanout raw`` (default) frames the body ONCE with ``websockets.frames.Frame`` and
writes it with ``WSTransport.underlying_transport.write``; ``--fanout send`` uses
``WSTransport.send`` (picows frames per subscriber, in C).

The process stops by itself after ``--max-seconds`` or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal

import httptools
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server
from websockets.frames import Frame, Opcode

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

SUBSCRIBERS: set[WSTransport] = set()
FANOUT_MODE = "raw"


class Subscriber(WSListener):  # type: ignore[misc]
    def on_ws_connected(self, transport: WSTransport) -> None:
        SUBSCRIBERS.add(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        SUBSCRIBERS.discard(transport)


def route(request: WSUpgradeRequest) -> WSListener | None:
    if request.path.partition(b"?")[0] == b"/app/x":
        return Subscriber()
    return None


def fan_out(payload: bytes) -> None:
    if FANOUT_MODE == "raw":
        frame = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
        for ws in SUBSCRIBERS:
            ws.underlying_transport.write(frame)
    else:
        for ws in SUBSCRIBERS:
            ws.send(WSMsgType.TEXT, payload)


class TriggerHTTP(asyncio.Protocol):
    """Minimal keep-alive HTTP/1.1 endpoint for POST /trigger on the second port."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_method() == b"POST" and self.url == b"/trigger":
            fan_out(b"".join(self.body))
            self.transport.write(OK)
        else:
            self.transport.write(NOT_FOUND)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()


async def serve(port: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    ws_server = await ws_create_server(route, "127.0.0.1", port, backlog=4096)
    http_server = await loop.create_server(TriggerHTTP, "127.0.0.1", 0, backlog=4096)
    ws_port = ws_server.sockets[0].getsockname()[1]
    http_port = http_server.sockets[0].getsockname()[1]
    print(f"listening {ws_port} {http_port}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    ws_server.close()
    http_server.close()


def main() -> None:
    global FANOUT_MODE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    ap.add_argument("--fanout", choices=["raw", "send"], default="raw")
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
