"""The :class:`Outbox` and the slow-consumer cut, on real sockets from ``socketpair()``.

Each connection is a real :class:`WebSocketConnection` of a real (not listening)
:class:`Node`, on a transport the event loop made from one end of a
``socket.socketpair()``; the test reads the other end as the client would, or,
for a slow consumer, never reads it. Two thin records are added, nothing is
replaced: :class:`CountedWrites` is the real transport with each ``write()``
recorded (one ``write()`` to an idle transport is one ``send()``, so the record
shows what reached the kernel and when), and :class:`Watched` is the real
connection with its ``pause_writing`` calls recorded in the same log.

Every test runs on both loops: asyncio's and uvloop's (what ``bastion serve`` runs).

Held here: what one loop iteration writes to a connection is one ``write()``, made
after the iteration's broadcast (never inside it), in the order written; the
after-flush callbacks run after those writes; a connection whose peer stops
reading passes its write-buffer limit, the transport calls ``pause_writing``
during the flush, and the cut is scheduled for a later iteration: the broadcast
and the flush finish first, for every other connection too.

And the overflow (:mod:`bastion.server.overflow`): past the transport's 64 KiB a
peer that does not read has its frames held, not written, and gets every one in
order, a transport-full at a time, once it reads again; past
``max_write_buffer_kb`` (the transport's buffer counted) the held frames are
dropped and counted and the closing frames wait behind at most 64 KiB and one
write (:class:`Closing` records what they waited behind); a close of any kind to
a peer that never reads is aborted after the close grace.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop
from support.clients import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWebSocket, build_frame
from support.timeouts import scaled, until, within

from bastion.config import settings_from_mapping
from bastion.core.hub import AppState
from bastion.protocol import messages as msg
from bastion.server import websocket
from bastion.server.context import frame_text
from bastion.server.overflow import TRANSPORT_HIGH_WATER
from bastion.server.runtime import Node
from bastion.server.state import ConnectionState
from bastion.server.upgrade import max_frame_size
from bastion.server.websocket import WebSocketConnection

APP_ID, KEY, SECRET = "12345", "app-key", "app-secret"
CHANNEL = "news"

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

Run = Callable[[Coroutine[Any, Any, None]], None]
#: What happened to the transports, in order: ``("write", name)``, ``("pause_writing", name)``.
Log = list[tuple[str, str]]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    """Run a test's coroutine on a fresh loop of the parametrised kind."""

    def runner(main: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as loop_runner:
            loop_runner.run(main)

    yield runner


class CountedWrites(asyncio.Transport):
    """The loop's transport, each ``write()`` recorded; everything else passed through."""

    def __init__(self, inner: asyncio.Transport, name: str, log: Log) -> None:
        super().__init__()
        self.inner = inner
        self.name = name
        self.writes: list[bytes] = []
        self._log = log

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self._log.append(("write", self.name))
        self.inner.write(data)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)


class Watched(WebSocketConnection):
    """The real connection; its ``pause_writing`` calls are logged as they happen."""

    name: str
    log: Log

    def pause_writing(self) -> None:
        self.log.append(("pause_writing", self.name))
        super().pause_writing()


@dataclass
class Wired:
    """One server connection on a socketpair and the client's end of it."""

    conn: Watched
    transport: CountedWrites
    peer: socket.socket
    client: RawWebSocket | None = None
    read: list[dict[str, Any]] = field(default_factory=list)

    async def next_json(self) -> dict[str, Any]:
        assert self.client is not None, "a slow consumer's end is never read"
        message = await self.client.read_json()
        self.read.append(message)
        return message


def make_node(max_write_buffer_kb: int = 1024) -> Node:
    settings = settings_from_mapping(
        {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "max_write_buffer_kb": max_write_buffer_kb,
                "activity_timeout": 120,
            },
            "apps": [{"id": APP_ID, "key": KEY, "secret": SECRET}],
        },
        environ={},
    )
    return Node(settings, asyncio.get_running_loop())


def app_of(node: Node) -> AppState:
    return node.hub.apps_by_id[APP_ID]


async def wire(
    node: Node,
    log: Log,
    name: str,
    *,
    reading: bool = True,
    buffer: int | None = None,
    kind: type[Watched] = Watched,
) -> Wired:
    """A started connection on one end of a socketpair, as after a 101 response.

    ``reading=False``: nobody reads the client's end (a slow consumer); ``buffer``
    shrinks the kernel's send and receive buffers so that it fills quickly.
    """
    ours, theirs = socket.socketpair()
    if buffer is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    ours.setblocking(False)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    counted = CountedWrites(transport, name, log)
    app = app_of(node)
    assert node.hub.admit(app) is None
    conn = kind(node.ctx, counted, app, "127.0.0.1", max_size=max_frame_size(app))
    conn.name, conn.log = name, log
    transport.set_protocol(conn)
    conn.start()
    wired = Wired(conn, counted, theirs)
    if reading:
        reader, writer = await asyncio.open_connection(sock=theirs)
        wired.client = RawWebSocket(0, reader, writer)
        assert (await wired.next_json())["event"] == "pusher:connection_established"
    return wired


async def subscribe(wired: Wired, channel: str = CHANNEL) -> None:
    """Subscribe as a client does: a masked text frame through the client's end."""
    text = json.dumps({"event": "pusher:subscribe", "data": {"channel": channel}})
    frame = build_frame(OP_TEXT, text.encode())
    if wired.client is not None:
        wired.client.write(frame)
        answer = await wired.next_json()
        assert answer["event"] == "pusher_internal:subscription_succeeded", answer
    else:
        wired.peer.send(frame)  # a few bytes: the socket takes them at once
        await until(lambda: channel in wired.conn.session.channels)


def event(name: str, data: str) -> bytes:
    """The frame a subscriber of CHANNEL gets for one published event."""
    return frame_text(msg.channel_event(name, CHANNEL, data))


async def after_next_flush(node: Node, snapshot: Callable[[], Any]) -> Any:
    """Register an after-flush callback now; return what it saw when it ran."""
    seen: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    node.ctx.outbox.after_flush(lambda: seen.set_result(snapshot()))
    return await within(seen)


async def close_all(*wired: Wired) -> None:
    for one in wired:
        if one.client is not None:
            await one.client.close()
        else:
            one.peer.close()
        if one.conn.state is not ConnectionState.CLOSED:
            # (Not after: asyncio's transport, closed once its buffer drained, fails.)
            one.conn.transport.abort()


# --- coalescing ----------------------------------------------------------------------------


def test_one_iteration_of_writes_is_one_write_per_connection_after_the_broadcast(
    run: Run,
) -> None:
    async def main() -> None:
        node, log = make_node(), []
        a, b = await wire(node, log, "a"), await wire(node, log, "b")
        for wired in (a, b):
            await subscribe(wired)
            wired.transport.writes.clear()
        app = app_of(node)

        # One iteration: three broadcasts to both, and one frame for a alone.
        for n in range(3):
            node.hub.publish(app, [CHANNEL], "tick", str(n))
        a.conn.send(b'{"event":"pusher:pong","data":"{}"}')
        # Nothing was written inside the broadcast: it is queued for the flush.
        assert a.transport.writes == [] and b.transport.writes == []
        assert node.ctx.outbox.busy

        # After-flush callbacks run once the queued bytes are written.
        counts = await after_next_flush(
            node, lambda: (len(a.transport.writes), len(b.transport.writes))
        )
        assert counts == (1, 1)
        assert not node.ctx.outbox.busy

        ticks = [event("tick", str(n)) for n in range(3)]
        pong = frame_text(b'{"event":"pusher:pong","data":"{}"}')
        assert a.transport.writes == [b"".join([*ticks, pong])]
        assert b.transport.writes == [b"".join(ticks)]
        # The clients read them in the order written.
        assert [(await a.next_json())["data"] for _ in range(3)] == ["0", "1", "2"]
        assert (await a.next_json())["event"] == "pusher:pong"
        assert [(await b.next_json())["data"] for _ in range(3)] == ["0", "1", "2"]
        await close_all(a, b)

    run(main())


def test_each_iteration_is_its_own_write_and_order_is_kept(run: Run) -> None:
    async def main() -> None:
        node, log = make_node(), []
        a = await wire(node, log, "a")
        await subscribe(a)
        a.transport.writes.clear()
        app = app_of(node)

        node.hub.publish(app, [CHANNEL], "first", "1")
        node.hub.publish(app, [CHANNEL], "second", "2")
        await after_next_flush(node, lambda: None)
        node.hub.publish(app, [CHANNEL], "third", "3")
        await after_next_flush(node, lambda: None)

        assert a.transport.writes == [
            event("first", "1") + event("second", "2"),
            event("third", "3"),
        ]
        assert [(await a.next_json())["event"] for _ in range(3)] == ["first", "second", "third"]
        await close_all(a)

    run(main())


def test_queued_frames_go_before_what_the_protocol_answers_in_the_same_iteration(
    run: Run,
) -> None:
    async def main() -> None:
        node, log = make_node(), []
        a = await wire(node, log, "a")
        await subscribe(a)
        app = app_of(node)

        # A broadcast queued for the flush, then a WebSocket Ping in the same
        # iteration: its Pong (written by the protocol) must not overtake the event.
        node.hub.publish(app, [CHANNEL], "queued", "q")
        a.conn.data_received(build_frame(OP_PING, b"are-you-there"))
        assert a.client is not None
        first = await a.client.read_frame()
        second = await a.client.read_frame()
        assert (first.opcode, first.json()["event"]) == (OP_TEXT, "queued")
        assert (second.opcode, second.payload) == (OP_PONG, b"are-you-there")
        await close_all(a)

    run(main())


# --- the slow consumer -----------------------------------------------------------------------


def test_a_peer_that_does_not_read_is_cut_after_the_flush_not_inside_it(run: Run) -> None:
    async def main() -> None:
        node, log = make_node(max_write_buffer_kb=16), []
        slow = await wire(node, log, "slow", reading=False, buffer=4096)
        fast = await wire(node, log, "fast")
        # slow subscribes first: it is written first in every broadcast and flush.
        await subscribe(slow)
        await subscribe(fast)
        await until(lambda: bool(slow.transport.writes) and not node.ctx.outbox.busy)
        log.clear()
        app = app_of(node)
        payload = "x" * 16_000

        # One broadcast of four large events: far past slow's kernel buffers and its
        # 16 KiB write-buffer limit, in one write at the flush.
        for n in range(4):
            node.hub.publish(app, [CHANNEL], "big", f"{n}:{payload}")
        assert log == [], "nothing is written inside the broadcast"

        def at_flush_end() -> tuple[Log, ConnectionState, int, bool]:
            return (
                list(log),
                slow.conn.state,
                node.metrics.refusal_count("slow_consumer"),
                slow.conn in node.ctx.connections,
            )

        seen, state, cuts, still_listed = await after_next_flush(node, at_flush_end)
        # During the flush: slow's write made its transport pause writing, and the
        # flush went on to write fast's bytes; slow was not cut there.
        assert seen == [("write", "slow"), ("pause_writing", "slow"), ("write", "fast")]
        assert state is ConnectionState.OPEN and cuts == 0 and still_listed

        # The cut comes on a later iteration.
        await until(lambda: node.metrics.refusal_count("slow_consumer") == 1)
        assert slow.conn.state is not ConnectionState.OPEN
        assert slow.conn not in node.ctx.connections
        # The reader was not disturbed: it has every event, in order, and stays.
        for n in range(4):
            assert (await fast.next_json())["data"] == f"{n}:{payload}"
        assert fast.conn.state is ConnectionState.OPEN
        assert fast.conn in node.ctx.connections
        await close_all(slow, fast)

    run(main())


# --- the overflow: frames held while the transport is paused ---------------------------------


class Closing(Watched):
    """The real connection; records what its transport held when the close was written."""

    held_at_close: int | None = None

    def _end(self, last: bytes) -> None:
        # What the closing frames are about to wait behind in user space.
        self.held_at_close = self.transport.get_write_buffer_size()
        super()._end(last)


async def start_reading(wired: Wired) -> None:
    """The client's end starts reading (until now nobody read it)."""
    reader, writer = await asyncio.open_connection(sock=wired.peer)
    wired.client = RawWebSocket(0, reader, writer)


async def publish_one_per_iteration(
    node: Node, until_true: Callable[[], bool], *, size: int = 8000, most: int = 400
) -> int:
    """Publish ``n:xxx…`` events, one per loop iteration, until ``until_true()``; return n."""
    app = app_of(node)
    for n in range(most):
        node.hub.publish(app, [CHANNEL], "big", f"{n:05d}:" + "x" * size)
        await after_next_flush(node, lambda: None)
        if until_true():
            return n + 1
    raise AssertionError(f"not reached after {most} events")


def test_a_peer_that_pauses_gets_every_frame_in_order_once_it_reads_again(run: Run) -> None:
    async def main() -> None:
        node, log = make_node(max_write_buffer_kb=1024), []
        slow = await wire(node, log, "slow", reading=False, buffer=4096)
        await subscribe(slow)
        await until(lambda: not node.ctx.outbox.busy)

        # The peer does not read: past the transport's 64 KiB the frames are held...
        published = await publish_one_per_iteration(node, lambda: slow.conn.held_bytes > 0)
        writes_when_paused = len(slow.transport.writes)
        assert ("pause_writing", "slow") in log
        more = 10
        for _ in range(more):
            published += 1
            node.hub.publish(app_of(node), [CHANNEL], "big", f"{published - 1:05d}:" + "x" * 8000)
            await after_next_flush(node, lambda: None)
        # ... not written: the transport was not handed one more byte ...
        assert len(slow.transport.writes) == writes_when_paused
        assert slow.conn.held_bytes >= more * 8000
        # ... and nothing was dropped: the bound (1 MiB) is far.
        assert node.metrics.frames_discarded[APP_ID] == 0
        assert slow.conn.state is ConnectionState.OPEN

        # It reads again: every event, in order, none twice; what was held went out
        # a slice at a time (each slice fills the transport to 64 KiB, one frame past
        # it at most), and then frames go straight to the transport again.
        await start_reading(slow)
        assert (await slow.next_json())["event"] == "pusher:connection_established"
        assert (await slow.next_json())["event"] == "pusher_internal:subscription_succeeded"
        for n in range(published):
            assert (await slow.next_json())["data"].startswith(f"{n:05d}:")
        await until(lambda: slow.conn.held_bytes == 0)
        released = slow.transport.writes[writes_when_paused:]
        assert released, "the held frames were handed to the transport"
        largest_event = len(event("big", "00000:" + "x" * 8000))
        assert max(map(len, released)) <= TRANSPORT_HIGH_WATER + largest_event
        node.hub.publish(app_of(node), [CHANNEL], "after", "1")
        await after_next_flush(node, lambda: None)
        assert slow.transport.writes[-1] == event("after", "1")
        assert (await slow.next_json())["event"] == "after"
        assert slow.conn.state is ConnectionState.OPEN
        assert node.metrics.refusal_count("slow_consumer") == 0
        await close_all(slow)

    run(main())


def test_past_the_limit_the_held_frames_are_dropped_and_the_close_is_not_behind_them(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reader below must not race the close grace: a long one here.
    monkeypatch.setattr(websocket, "CLOSE_GRACE_SECONDS", scaled(60))

    async def main() -> None:
        node, log = make_node(max_write_buffer_kb=256), []
        slow = await wire(node, log, "slow", reading=False, buffer=4096, kind=Closing)
        await subscribe(slow)
        await until(lambda: not node.ctx.outbox.busy)

        queued: list[int] = []  # what it was owed, transport and held, after each event

        def cut() -> bool:
            queued.append(slow.conn.held_bytes + slow.transport.get_write_buffer_size())
            return node.metrics.refusal_count("slow_consumer") == 1

        published = await publish_one_per_iteration(node, cut)
        # It was owed at most max_write_buffer_kb: the transport's buffer counts.
        assert max(queued) <= 256 * 1024
        assert node.metrics.connections_closed[(APP_ID, 4100)] == 1
        assert slow.conn.state is ConnectionState.CLOSING
        # The closing frames went behind at most the transport's high-water mark and
        # the one write that passed it, not behind the 256 KiB the client was owed.
        frame_size = len(event("big", "00000:" + "x" * 8000))
        assert isinstance(slow.conn, Closing) and slow.conn.held_at_close is not None
        assert slow.conn.held_at_close <= TRANSPORT_HIGH_WATER + frame_size

        # When the client reads: a run of the events from the first, then the
        # reason, then the close; every other event was dropped, and counted.
        await start_reading(slow)
        assert slow.client is not None
        code, frames = await slow.client.read_close()
        assert code == 4100
        *events, error = [frame.json() for frame in frames]
        assert error == {
            "event": "pusher:error",
            "data": {
                "message": "Write buffer limit exceeded; reconnect with back-off",
                "code": 4100,
            },
        }
        received = [e for e in events if e.get("event") == "big"]
        assert [e["data"][:5] for e in received] == [f"{n:05d}" for n in range(len(received))]
        dropped = published - len(received)
        assert dropped > 0
        assert node.metrics.frames_discarded[APP_ID] == dropped
        assert node.metrics.bytes_discarded[APP_ID] == dropped * frame_size
        await close_all(slow)

    run(main())


# --- a close never waits forever for a peer that does not read --------------------------------


def test_a_cut_peer_that_never_reads_is_aborted_after_the_close_grace(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(websocket, "CLOSE_GRACE_SECONDS", 0.05)

    async def main() -> None:
        node, log = make_node(max_write_buffer_kb=256), []
        slow = await wire(node, log, "slow", reading=False, buffer=4096)
        await subscribe(slow)
        await publish_one_per_iteration(
            node, lambda: node.metrics.refusal_count("slow_consumer") == 1
        )
        # Its buffers stay full: only the abort ends the transport.
        await until(lambda: slow.conn.state is ConnectionState.CLOSED)
        assert slow.conn.transport.is_closing()
        await close_all(slow)

    run(main())


#: What a peer that does not read may send that makes the server close on its own.
CLOSING_FRAMES = {
    # The fast path's 1007 (not through the sans-I/O protocol).
    "invalid_utf8": build_frame(OP_TEXT, b'{"event":"\xff"}'),
    # The sans-I/O protocol's failure (1002: a reserved bit set) and its close handshake.
    "protocol_error": build_frame(OP_TEXT, b"{}", rsv=0b100),
    "close_handshake": build_frame(OP_CLOSE, (1000).to_bytes(2, "big")),
}


@pytest.mark.parametrize("sent", sorted(CLOSING_FRAMES))
def test_a_peer_that_makes_the_server_close_while_not_reading_is_aborted_after_the_grace(
    run: Run, monkeypatch: pytest.MonkeyPatch, sent: str
) -> None:
    monkeypatch.setattr(websocket, "CLOSE_GRACE_SECONDS", 0.05)

    async def main() -> None:
        node, log = make_node(max_write_buffer_kb=1024), []
        slow = await wire(node, log, "slow", reading=False, buffer=4096)
        await subscribe(slow)
        # Behind: its transport is paused and frames are held.
        await publish_one_per_iteration(node, lambda: slow.conn.held_bytes > 0)
        held = slow.conn.held_bytes
        slow.peer.send(CLOSING_FRAMES[sent])  # a few bytes: the socket takes them at once
        await until(lambda: slow.conn.state is not ConnectionState.OPEN)
        assert slow.conn not in node.ctx.connections
        # What was held is dropped and counted, and the transport does not wait for
        # a reader that never comes.
        assert node.metrics.bytes_discarded[APP_ID] == held
        await until(lambda: slow.conn.state is ConnectionState.CLOSED)
        await close_all(slow)

    run(main())
