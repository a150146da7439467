"""Per-message microbenchmark: the Python a WebSocket message costs, in-process.

No sockets and no second process: a :class:`~bastion.server.runtime.Node` is built
(not started), connections are opened through the real listener
(:class:`~bastion.server.http.HttpConnection`: the upgrade request, its gates,
``connection_established``) over transports that only count the bytes written,
and masked client frames are fed to ``data_received``. What is measured is the
CPU time from a frame's bytes to the bytes written for it (the write itself is a
counter here: the kernel's share of a real ``send()`` is what the side-by-side
benchmarks add).

Cases:

* ``client_event``: a ``client-typing`` event on a private channel with one other
  subscriber, relayed to it (the chat / typing / cursor case of #13);
* ``ping``: a ``pusher:ping``, answered with a ``pusher:pong``;
* ``connect``: a whole upgrade request to ``connection_established``, then the
  transport lost (what a reconnect storm costs per connection);
* ``connect_close``: the same, with the client's close frame answered before the
  transport is lost, as every connection of ``connect_storm.py`` ends;
* ``floor_connect_close``: ``connect_close`` on the bare floor server of
  ``fanout.py`` (httptools, the accept key, the greeting, the close echoed; no
  check, limit, registry or count): what any Python server on uvloop pays, so
  ``connect_close`` over it is the Python Bastion adds per connection.

Prints one JSON line: CPU microseconds per unit for each case (the best of
``--repeat`` rounds; process CPU time).

``--evict-kib N`` writes to every cache line of an N KiB buffer before each unit
and subtracts what that costs alone: the unit then runs with cold CPU caches, as
a connection of a real storm does (its callbacks run between system calls whose
kernel work evicts them). With 8192 on a 2-core VM a connection costs about 1.4
times its warm figure.

    python bench/message_path.py [--messages 20000] [--repeat 5] [--case client_event ...]
        [--evict-kib 8192]
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import hmac
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import uvloop

from bastion.config import settings_from_mapping
from bastion.server.http import HttpConnection
from bastion.server.runtime import Node

APP_ID = "1"
APP_KEY = "bench-key"
APP_SECRET = "bench-secret-0123456789abcdef"
PEER = "203.0.113.7"
CHANNEL = "private-chat"


class Sink:
    """A transport that keeps nothing but the protocol it hands over to."""

    def __init__(self) -> None:
        self.written = 0
        self.frames: list[bytes] = []
        self.closed = False
        self.keep = False
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (PEER, 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.keep:
            self.frames.append(bytes(data))

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def masked(payload: bytes) -> bytes:
    """One masked client text frame (RFC 6455 §5.3)."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes((0x81, 0x80 | size))
    else:
        head = bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


#: A client's close frame (1000, masked), as pusher-js sends it on disconnect().
CLIENT_CLOSE = bytes((0x88, 0x82)) + b"\x01\x02\x03\x04" + bytes((0x03 ^ 0x01, 0xE8 ^ 0x02))


def upgrade_request() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /app/{APP_KEY}?protocol=7&client=js&version=8.4.0&flash=false HTTP/1.1\r\n"
        "Host: 127.0.0.1:6001\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _settings() -> Any:
    return settings_from_mapping(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "security": {
                "max_connections_per_ip": 10**6,
                "new_connections_per_ip": {"rate": 1e9, "burst": 10**9},
                "rest_requests_per_ip": {"rate": 1e9, "burst": 10**9},
                "auth_failures_per_ip": {"rate": 1e9, "burst": 10**9},
            },
            "audit": {"enabled": False},
            "apps": [
                {
                    "id": APP_ID,
                    "key": APP_KEY,
                    "secret": APP_SECRET,
                    "enable_client_messages": True,
                    "max_client_events_per_second": 10**6,
                    "max_messages_per_second": {"rate": 1e9, "burst": 10**9},
                    "subscribe_attempts": {"rate": 1e9, "burst": 10**9},
                }
            ],
        },
        environ={},
    )


def connect(node: Node) -> tuple[Any, Sink]:
    """A connected WebSocket (the real listener's upgrade), and its transport."""
    sink = Sink()
    listener = HttpConnection(node.ctx)
    listener.connection_made(sink)  # type: ignore[arg-type]
    listener.data_received(upgrade_request())
    websocket = sink.protocol
    if websocket is None or sink.closed:
        raise SystemExit("the upgrade failed")
    return websocket, sink


def subscribe(node: Node, websocket: Any) -> None:
    socket_id = websocket.session.socket_id
    signature = hmac.new(
        APP_SECRET.encode(), f"{socket_id}:{CHANNEL}".encode(), hashlib.sha256
    ).hexdigest()
    frame = {
        "event": "pusher:subscribe",
        "data": {"channel": CHANNEL, "auth": f"{APP_KEY}:{signature}"},
    }
    websocket.data_received(masked(json.dumps(frame).encode()))
    node.ctx.outbox.flush()


def _best(rounds: int, units: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        gc.disable()
        try:
            start = time.process_time()
            run()
            elapsed = time.process_time() - start
        finally:
            gc.enable()
        best = min(best, elapsed / units)
    return best * 1e6


class Evictor:
    """Writes to every cache line of a buffer (nothing when it is empty)."""

    def __init__(self, kib: int) -> None:
        self.buffer = bytearray(kib * 1024)
        self.zeros = bytes(len(self.buffer) // 64)

    def __call__(self) -> None:
        if self.buffer:
            self.buffer[::64] = self.zeros

    def cost(self, repeat: int, units: int) -> float:
        """Best microseconds per eviction alone (0 without a buffer)."""
        if not self.buffer:
            return 0.0

        def alone() -> None:
            for _ in range(units):
                self()

        return _best(repeat, units, alone)


def measure_floor(messages: int, repeat: int, evict: Evictor) -> float:
    """Best microseconds per connection of the bare floor server, closed by its client."""
    from fanout import FloorConnection  # (bench/ is on sys.path: this file's directory)

    def storm() -> None:
        for _ in range(messages):
            evict()
            connection, sink = FloorConnection(), Sink()
            connection.connection_made(sink)  # type: ignore[arg-type]
            connection.data_received(upgrade_request())  # (made in the loop, as connect's)
            connection.data_received(CLIENT_CLOSE)
            if not sink.closed:
                raise SystemExit("the floor did not answer the close")
            connection.connection_lost(None)

    return _best(repeat, messages, storm) - evict.cost(repeat, messages)


def measure(case: str, messages: int, repeat: int, evict: Evictor | None = None) -> float:
    """Best microseconds per unit of ``case`` (less the eviction's own cost, if any)."""
    evict = evict or Evictor(0)
    if case == "floor_connect_close":
        return measure_floor(messages, repeat, evict)
    loop = uvloop.new_event_loop()
    try:
        node = Node(_settings(), loop)
        outbox = node.ctx.outbox
        if case in ("connect", "connect_close"):
            close = CLIENT_CLOSE if case == "connect_close" else None

            def storm() -> None:
                for _ in range(messages):
                    evict()
                    websocket, sink = connect(node)
                    outbox.flush()
                    if close is not None:
                        websocket.data_received(close)
                        if not sink.closed:
                            raise SystemExit("the close was not answered")
                    websocket.connection_lost(None)

            return _best(repeat, messages, storm) - evict.cost(repeat, messages)
        sender, _ = connect(node)
        receiver, received = connect(node)
        for websocket in (sender, receiver):
            subscribe(node, websocket)
        if case == "client_event":
            payload = json.dumps(
                {"event": "client-typing", "channel": CHANNEL, "data": {"typing": True}},
                separators=(",", ":"),
            ).encode()
            sink = received
        else:
            payload = b'{"event":"pusher:ping","data":{}}'
            sink = sender.transport
        frames = [masked(payload) for _ in range(256)]

        def relay() -> None:
            for index in range(messages):
                evict()
                sender.data_received(frames[index & 255])
                outbox.flush()

        before = sink.written
        result = _best(repeat, messages, relay) - evict.cost(repeat, messages)
        if sink.written == before:
            raise SystemExit(f"{case}: nothing was written")
        return result
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> None:
    """Run the cases and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--case",
        action="append",
        choices=["client_event", "ping", "connect", "connect_close", "floor_connect_close"],
    )
    parser.add_argument("--evict-kib", type=int, default=0, help="cold caches: see above")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)
    evict = Evictor(args.evict_kib)
    cases = args.case or ["client_event", "ping", "connect", "connect_close"]
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "messages": args.messages,
        "repeat": args.repeat,
        "evict_kib": args.evict_kib,
        "us_per_unit": {
            case: round(measure(case, args.messages, args.repeat, evict), 2) for case in cases
        },
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
