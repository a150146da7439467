"""Test clients for a live Bastion: a Pusher client, a raw socket, a signed REST caller.

* :class:`PusherClient` wraps a ``websockets`` client connection and speaks the
  Pusher protocol (JSON frames, ``data`` double-encoding). It reads only when the
  test asks (a test can leave frames unread, or read ``client.ws`` itself):

  - :meth:`~PusherClient.recv` / :meth:`~PusherClient.expect` take *the next*
    frame (``expect`` asserts what it is): nothing may come in between;
  - :meth:`~PusherClient.wait_for` takes the earliest frame that matches and keeps
    the frames it passes over for later reads (:meth:`~PusherClient.received`
    lists every frame read so far): for streams where other frames interleave.

* :class:`RawWebSocket` writes hand-built bytes (handshakes, frames with wrong
  masking, RSV bits, binary opcodes, lying length headers) for the malformed cases;
  :meth:`RawWebSocket.open_stalled` is one with a tiny receive buffer that reads
  only when asked (a slow consumer).
* :func:`http_request` and :func:`rest` speak HTTP/1.1 over a plain socket, so a
  request can be signed (or mis-signed) exactly as a test needs (signatures by
  :mod:`support.signing`).

Every wait goes through :mod:`support.timeouts`; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pusher
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from .signing import hmac_hex, signed_rest_request
from .timeouts import DEFAULT_WAIT, within

__all__ = [
    "APP_ID",
    "APP_KEY",
    "APP_SECRET",
    "DEFAULT_QUERY",
    "OTHER_APP_ID",
    "OTHER_APP_KEY",
    "OTHER_APP_SECRET",
    "Closed",
    "HttpResult",
    "PusherClient",
    "RawFrame",
    "RawWebSocket",
    "build_frame",
    "data_of",
    "hmac_hex",
    "http_request",
    "make_sdk",
    "open_client",
    "open_ws",
    "open_ws_url",
    "read_until_closed",
    "rest",
    "served",
    "signed_target",
]

APP_ID = "12345"
APP_KEY = "app-key"
APP_SECRET = "app-secret"
OTHER_APP_ID = "67890"
OTHER_APP_KEY = "other-key"
OTHER_APP_SECRET = "other-secret"

DEFAULT_QUERY = "protocol=7&client=bastion-tests&version=0.0.1&flash=false"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

Message = dict[str, Any]


def data_of(message: Message) -> Any:
    """A server frame's ``data``, decoded when it is the usual JSON string."""
    data = message.get("data")
    if isinstance(data, str):
        try:
            return json.loads(data)
        except ValueError:
            return data
    return data


# --- the Pusher client over websockets ---------------------------------------------------


@dataclass(frozen=True)
class Closed:
    """How a connection ended, and the frames read before the close."""

    code: int
    reason: str
    frames: list[Message]


#: The server's answers to ``pusher:subscribe``.
_ANSWERS = frozenset(
    ("pusher_internal:subscription_succeeded", "pusher:subscription_error", "pusher:error")
)


def _parse(raw: str | bytes) -> Message:
    assert isinstance(raw, str), f"expected a text frame, got {raw!r}"
    parsed: Message = json.loads(raw)
    return parsed


class PusherClient:
    """A Pusher-speaking test client on a ``websockets`` connection.

    Open one with :func:`open_client` (a port) or :meth:`connect` (a URL); it is an
    async context manager that closes the connection on exit.
    """

    def __init__(self, ws: ClientConnection, established: Message) -> None:
        self.ws = ws
        self.established = established
        data = data_of(established)
        self.socket_id: str = data["socket_id"]
        self.activity_timeout: int = data["activity_timeout"]
        #: Every frame read so far, in order (``connection_established`` first).
        self.frames: list[Message] = [established]
        #: Frames read but not yet returned (passed over by :meth:`wait_for`).
        self._unread: deque[Message] = deque()

    @classmethod
    async def connect(cls, url: str, **connect_kwargs: Any) -> PusherClient:
        """Connect to ``url`` (``ws://…/app/KEY?…``) and read ``connection_established``."""
        ws = await open_ws_url(url, **connect_kwargs)
        first = _parse(await within(ws.recv()))
        assert first["event"] == "pusher:connection_established", first
        return cls(ws, first)

    async def __aenter__(self) -> PusherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            await self.close()

    # --- sending --------------------------------------------------------------------------

    async def send(self, message: Message | str) -> None:
        """Send one text frame (a dict is JSON-encoded)."""
        text = message if isinstance(message, str) else json.dumps(message)
        await within(self.ws.send(text))

    async def subscribe(
        self,
        channel: str,
        auth: str | None = None,
        channel_data: str | None = None,
        *,
        interleaved: bool = False,
    ) -> Message:
        """Send ``pusher:subscribe`` and return the server's answer.

        The answer is the next frame; with ``interleaved=True`` it is the first
        ``subscription_succeeded``, ``subscription_error`` or ``pusher:error`` on
        ``channel``, the frames before it (member or count updates, watchlist events)
        kept for later reads.
        """
        data: dict[str, Any] = {"channel": channel}
        if auth is not None:
            data["auth"] = auth
        if channel_data is not None:
            data["channel_data"] = channel_data
        await self.send({"event": "pusher:subscribe", "data": data})
        if not interleaved:
            return await self.recv()
        return await self.wait_for(channel=channel, where=lambda m: m["event"] in _ANSWERS)

    async def subscribed(
        self, channel: str, auth: str | None = None, channel_data: str | None = None
    ) -> Message:
        """Subscribe and assert success; returns ``subscription_succeeded``."""
        reply = await self.subscribe(channel, auth, channel_data)
        assert reply["event"] == "pusher_internal:subscription_succeeded", reply
        assert reply["channel"] == channel, reply
        assert isinstance(reply["data"], str), reply
        return reply

    async def signin(self, auth: str, user_data: str) -> None:
        """Send ``pusher:signin`` (the answer is read like any other frame)."""
        await self.send({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}})

    async def barrier(self) -> None:
        """Ping and assert the very next frame is the pong: nothing else was pending.

        The server handles a connection's frames in order and writes its answers in
        order, so anything it meant to send before our ping arrives first.
        """
        await self.send({"event": "pusher:ping", "data": {}})
        message = await self.recv()
        assert message["event"] == "pusher:pong", f"unexpected frame before pong: {message}"

    async def ping(self, seconds: float = DEFAULT_WAIT) -> Message:
        """Ping and wait for the pong, passing over (and keeping) other frames.

        A round trip: the server has handled everything sent before. Unlike
        :meth:`barrier`, frames may come before the pong (subscription counts, …).
        """
        await self.send({"event": "pusher:ping", "data": {}})
        return await self.wait_for("pusher:pong", seconds=seconds)

    # --- receiving ------------------------------------------------------------------------

    async def _read(self) -> Message:
        message = _parse(await self.ws.recv())
        self.frames.append(message)
        return message

    async def recv(self, seconds: float = DEFAULT_WAIT) -> Message:
        """The next frame not yet returned, parsed."""
        if self._unread:
            return self._unread.popleft()
        return await within(self._read(), seconds)

    async def expect(
        self, event: str, channel: str | None = None, *, seconds: float = DEFAULT_WAIT
    ) -> Message:
        """The next frame, asserting its event (and channel)."""
        message = await self.recv(seconds)
        assert message.get("event") == event, f"expected {event}, got {message}"
        if channel is not None:
            assert message.get("channel") == channel, message
        return message

    async def wait_for(
        self,
        event: str | None = None,
        channel: str | None = None,
        *,
        where: Callable[[Message], bool] | None = None,
        seconds: float = DEFAULT_WAIT,
    ) -> Message:
        """The earliest frame not yet returned with ``event`` (on ``channel``, ``where``).

        The frames it passes over stay for later reads, in order.

        Raises:
            TimeoutError: no such frame within ``scaled(seconds)``.
            AssertionError: the connection closed first.
        """

        def matches(message: Message) -> bool:
            return (
                (event is None or message.get("event") == event)
                and (channel is None or message.get("channel") == channel)
                and (where is None or where(message))
            )

        for index, message in enumerate(self._unread):
            if matches(message):
                del self._unread[index]
                return message

        async def read_until_match() -> Message:
            while True:
                try:
                    message = await self._read()
                except ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd is not None else 1006
                    raise AssertionError(
                        f"connection closed ({code}) before {event!r} on {channel!r}; "
                        f"got {self.frames[-10:]}"
                    ) from None
                if matches(message):
                    return message
                self._unread.append(message)

        try:
            return await within(read_until_match(), seconds)
        except TimeoutError:
            raise TimeoutError(
                f"no {event!r} frame on {channel!r} in time; got {self.frames[-10:]}"
            ) from None

    def received(self, event: str | None = None, channel: str | None = None) -> list[Message]:
        """Every frame read so far (returned or not) with ``event`` (on ``channel``)."""
        return [
            message
            for message in self.frames
            if (event is None or message.get("event") == event)
            and (channel is None or message.get("channel") == channel)
        ]

    async def closed(self, seconds: float = DEFAULT_WAIT) -> Closed:
        """Read until the server closes; the close code and the frames not yet returned."""
        unread, self._unread = list(self._unread), deque()
        ended = await read_until_closed(self.ws, seconds)
        self.frames.extend(ended.frames)
        return Closed(ended.code, ended.reason, unread + ended.frames)

    @property
    def is_open(self) -> bool:
        """Whether the connection is open (no close frame received or sent)."""
        return self.ws.state is State.OPEN

    async def close(self) -> None:
        """Close politely (used at teardown)."""
        await within(self.ws.close())


async def read_until_closed(ws: ClientConnection, seconds: float = DEFAULT_WAIT) -> Closed:
    """Read frames until the server closes ``ws``; the code is 1006 without a close frame."""
    frames: list[Message] = []

    async def drain() -> Closed:
        while True:
            try:
                raw = await ws.recv()
            except ConnectionClosed as exc:
                received = exc.rcvd
                if received is None:
                    return Closed(1006, "", frames)
                return Closed(received.code, received.reason, frames)
            frames.append(json.loads(raw))

    return await within(drain(), seconds)


async def open_ws_url(url: str, **connect_kwargs: Any) -> ClientConnection:
    """A raw ``websockets`` connection to ``url`` (first frame not read).

    Loopback only, no compression, no keepalive pings (tests control all traffic);
    ``connect_kwargs`` (``ssl=``, ``sock=``, ``max_queue=``…) override the defaults.
    """
    options: dict[str, Any] = {
        "proxy": None,
        "compression": None,
        "ping_interval": None,
        "open_timeout": None,
        "close_timeout": 2,
        "max_queue": 1024,
        **connect_kwargs,
    }
    return await within(connect(url, **options))


async def open_ws(port: int, key: str = APP_KEY, query: str = DEFAULT_QUERY) -> ClientConnection:
    """A raw ``websockets`` connection to ``/app/{key}`` (first frame not read)."""
    return await open_ws_url(f"ws://127.0.0.1:{port}/app/{key}" + (f"?{query}" if query else ""))


async def open_client(port: int, key: str = APP_KEY, query: str = DEFAULT_QUERY) -> PusherClient:
    """Connect and read ``pusher:connection_established``."""
    return await PusherClient.connect(
        f"ws://127.0.0.1:{port}/app/{key}" + (f"?{query}" if query else "")
    )


# --- the raw socket ---------------------------------------------------------------------


@dataclass(frozen=True)
class RawFrame:
    """One frame as read off the wire."""

    fin: bool
    opcode: int
    payload: bytes

    def json(self) -> Any:
        """The payload of a text frame, parsed."""
        return json.loads(self.payload)

    @property
    def close_code(self) -> int:
        """The status code of a close frame (1005 when it carries none)."""
        assert self.opcode == OP_CLOSE
        return int.from_bytes(self.payload[:2], "big") if len(self.payload) >= 2 else 1005


def build_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    declared_length: int | None = None,
) -> bytes:
    """Hand-build one WebSocket frame; every field can be wrong on purpose."""
    first = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
    length = len(payload) if declared_length is None else declared_length
    mask_bit = 0x80 if mask else 0
    if length < 126:
        header = bytes([first, mask_bit | length])
    elif length < 1 << 16:
        header = bytes([first, mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + length.to_bytes(8, "big")
    if mask:
        key = os.urandom(4)
        header += key
        payload = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return header + payload


class RawWebSocket:
    """A TCP socket on which the test writes exactly the bytes it wants."""

    def __init__(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.port = port
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawWebSocket:
        """Open a plain TCP connection to the node."""
        reader, writer = await within(asyncio.open_connection("127.0.0.1", port))
        return cls(port, reader, writer)

    @classmethod
    async def open(cls, port: int, path: str = f"/app/{APP_KEY}?{DEFAULT_QUERY}") -> RawWebSocket:
        """Connect, upgrade, and read ``connection_established``."""
        raw = await cls.connect(port)
        status, _ = await raw.handshake(path)
        assert status == 101
        first = await raw.read_frame()
        assert first.opcode == OP_TEXT
        assert first.json()["event"] == "pusher:connection_established"
        return raw

    @classmethod
    async def open_stalled(
        cls, port: int, path: str = f"/app/{APP_KEY}?protocol=7", *, receive_buffer: int = 4096
    ) -> RawWebSocket:
        """Connect and upgrade a client that reads only when the test asks (a slow consumer).

        The socket's receive buffer is ``receive_buffer`` bytes and the stream takes
        at most ~2 KiB off it unasked, so once the test stops reading the server's
        writes soon wait in the server's own buffers.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        try:
            await within(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)))
            reader, writer = await within(asyncio.open_connection(sock=sock, limit=1024))
        except BaseException:
            sock.close()
            raise
        raw = cls(port, reader, writer)
        status, _ = await raw.handshake(path)
        assert status == 101
        assert (await raw.read_json())["event"] == "pusher:connection_established"
        return raw

    def write(self, data: bytes) -> None:
        """Write bytes as they are."""
        self.writer.write(data)

    def handshake_request(
        self, path: str, *, version: str = "13", extra_headers: Sequence[str] = ()
    ) -> bytes:
        """The bytes of an upgrade request."""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            f"Sec-WebSocket-Version: {version}",
            *extra_headers,
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def handshake(
        self, path: str, *, version: str = "13", extra_headers: Sequence[str] = ()
    ) -> tuple[int, dict[str, str]]:
        """Send an upgrade request; return the response status and headers."""
        self.write(self.handshake_request(path, version=version, extra_headers=extra_headers))
        return await self.read_head()

    async def read_head(self) -> tuple[int, dict[str, str]]:
        """Read an HTTP response head."""
        head = await within(self.reader.readuntil(b"\r\n\r\n"))
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    def send_frame(self, opcode: int, payload: bytes, **kwargs: Any) -> None:
        """Build and write one frame (see :func:`build_frame`)."""
        self.write(build_frame(opcode, payload, **kwargs))

    def send_text(self, text: str | bytes) -> None:
        """Write one masked text frame."""
        self.send_frame(OP_TEXT, text if isinstance(text, bytes) else text.encode())

    async def read_frame(self, seconds: float = DEFAULT_WAIT) -> RawFrame:
        """Read one server frame (server frames are never masked)."""
        return await within(self._read_frame(), seconds)

    async def _read_frame(self) -> RawFrame:
        reader = self.reader
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        assert not second & 0x80, "server frames must not be masked"
        payload = await reader.readexactly(length)
        return RawFrame(bool(first & 0x80), first & 0x0F, payload)

    async def read_json(self) -> dict[str, Any]:
        """Read one text frame and parse it."""
        frame = await self.read_frame()
        assert frame.opcode == OP_TEXT, frame
        parsed: dict[str, Any] = frame.json()
        return parsed

    async def read_close(self, seconds: float = DEFAULT_WAIT) -> tuple[int, list[RawFrame]]:
        """Read frames until a close frame (its code) or EOF (1006)."""

        async def drain() -> tuple[int, list[RawFrame]]:
            frames: list[RawFrame] = []
            while True:
                try:
                    frame = await self._read_frame()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return 1006, frames
                if frame.opcode == OP_CLOSE:
                    return frame.close_code, frames
                frames.append(frame)

        return await within(drain(), seconds)

    async def read_eof(self, seconds: float = DEFAULT_WAIT) -> bytes:
        """Read until the server closes the TCP connection; return what came."""

        async def drain() -> bytes:
            try:
                return await self.reader.read()
            except ConnectionError:
                return b""

        return await within(drain(), seconds)

    async def close(self) -> None:
        """Close the socket."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await within(self.writer.wait_closed(), 2)


# --- HTTP and REST ------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResult:
    """One HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body, parsed as JSON."""
        return json.loads(self.body)


async def http_request(
    port: int,
    method: str,
    target: str,
    body: bytes = b"",
    headers: Iterable[str] = (),
) -> HttpResult:
    """One HTTP/1.1 request with ``Connection: close``; read the response to EOF."""
    reader, writer = await within(asyncio.open_connection("127.0.0.1", port))
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += list(headers)
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    try:
        raw = await within(reader.read())
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    head_lines = head.decode("latin-1").split("\r\n")
    status = int(head_lines[0].split(" ")[1])
    response_headers = {}
    for line in head_lines[1:]:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return HttpResult(status, response_headers, payload)


def signed_target(
    method: str,
    path: str,
    *,
    key: str = APP_KEY,
    secret: str = APP_SECRET,
    body: bytes = b"",
    params: Iterable[tuple[str, str]] = (),
    timestamp: float | None = None,
) -> str:
    """``path?query`` signed per the REST API's auth_version 1.0 (protocol note §15.2)."""
    target, _ = signed_rest_request(
        method=method,
        path=path,
        key=key,
        secret=secret,
        body=body,
        params=dict(params),
        timestamp=None if timestamp is None else int(timestamp),
    )
    return target


async def rest(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw_body: bytes | None = None,
    key: str = APP_KEY,
    secret: str = APP_SECRET,
    params: Iterable[tuple[str, str]] = (),
    timestamp: float | None = None,
) -> HttpResult:
    """A signed REST call; ``body`` is JSON-encoded unless ``raw_body`` is given."""
    payload = (
        raw_body if raw_body is not None else b"" if body is None else json.dumps(body).encode()
    )
    target = signed_target(
        method, path, key=key, secret=secret, body=payload, params=params, timestamp=timestamp
    )
    return await http_request(port, method, target, payload)


def make_sdk(
    port: int,
    app_id: str = APP_ID,
    key: str = APP_KEY,
    secret: str = APP_SECRET,
    **options: Any,
) -> pusher.Pusher:
    """The official PyPI ``pusher`` SDK pointed at the node (call it via a thread)."""
    client = pusher.Pusher(
        app_id=app_id, key=key, secret=secret, host="127.0.0.1", port=port, ssl=False, **options
    )
    # Loopback only: never let an environment proxy setting reroute the SDK.
    client._pusher_client.http.session.trust_env = False
    return client


async def served(port: int) -> bool:
    """Whether a new TCP connection gets an HTTP answer (False: dropped, no byte back)."""
    try:
        reader, writer = await within(asyncio.open_connection("127.0.0.1", port))
    except OSError:
        return False
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            data = await within(reader.read())
        except OSError:  # reset: dropped
            return False
        return data.startswith(b"HTTP/1.1 ")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
