"""One upgraded WebSocket connection speaking the Pusher protocol.

Incoming bytes go through the ``websockets`` sans-I/O protocol (masking, RSV
bits, opcodes, control frames, the frame size limit checked from the header
before the payload is read), except on the fast path: while nothing is pending
in that protocol (no partial frame, no fragmented message, the connection open),
complete, masked, unfragmented text frames within the size limit — what pusher-js
sends, one Pusher message each — are unmasked here (websockets' own C routine)
and handled at once; the first frame that is anything else, and everything after
it, goes to the sans-I/O protocol as before, from a frame boundary, so it sees
exactly the bytes it would have parsed itself. A well-formed close frame on that
path is answered here too, as the library answers it (the payload echoed, then the
TCP side ended). That protocol object is made only when a connection first needs
it (a ping, a malformed close, a fragment): an idle connection never holds one.
Text messages are then decoded by :mod:`bastion.protocol.messages` and handed to
the hub. Outgoing messages are
pre-framed bytes written straight to the transport: a broadcast never awaits
a subscriber.

Flow control. The transport's high-water mark is small and fixed
(:data:`~bastion.server.overflow.TRANSPORT_HIGH_WATER`); past it the transport
pauses the connection, which then holds whole frames in an
:class:`~bastion.server.overflow.Overflow` (made at the first pause: a connection
that keeps up has none) and hands them back a slice at a time as the transport
drains. ``max_write_buffer_kb`` bounds the transport's buffer and the overflow
together: a frame that would pass it drops what is held (counted in
``frames_discarded`` / ``bytes_discarded``) and the connection is cut with 4100
``slow_consumer`` (reconnect with back-off) on the next loop iteration, its
``pusher:error`` and close frame written behind at most the small transport
buffer, so a client that reads again gets them. Every close, this one included,
gives the client :data:`CLOSE_GRACE_SECONDS` to read it before the transport is
aborted; a close while the client is behind drops what is held too.

Two budgets per connection make a flood cost the sender, not the node:

* the **message budget** (``max_messages_per_second``): every frame but a close
  (each fragment of a fragmented message, WebSocket pings and pongs included)
  takes a token before anything else looks at it; a frame over the budget is
  dropped unread and answered ``pusher:error`` 4301 ``message_rate``;
* the **refusal budget** (``refusals_per_connection``): every refusal the
  connection survives (a ``pusher:error`` or a subscription error of severity
  warning; ``message_rate`` included) takes a token; when none is left the
  connection is closed with 4100 ``refusal_limit`` instead of being answered.

So a connection that floods gets at most the message burst acted on, then at most
the refusal burst of answers, then a close. Each budget is one float per
connection (:func:`~bastion.security.ratelimit.take_folded`), read against the
app's current settings, so a live reload applies at the next frame.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Sequence

from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import EXTERNAL_CLOSE_CODES, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

try:  # websockets' C routine (always built on the platforms we ship for)
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build without its C extension
    from websockets.utils import apply_mask

from bastion.core.hub import AppState, Session
from bastion.errors import Refused
from bastion.metrics import MESSAGE_BYTES_BUCKETS, MESSAGE_BYTES_INDEX, MESSAGE_BYTES_SUM
from bastion.protocol import messages as msg
from bastion.protocol.names import classify_channel
from bastion.protocol.refusals import Reason
from bastion.security.ratelimit import settle_folded, take_folded
from bastion.server.context import ServerContext, close_frame, frame_text
from bastion.server.overflow import TRANSPORT_HIGH_WATER, Overflow
from bastion.server.state import ConnectionState, check_transition

__all__ = ["WebSocketConnection", "new_socket_id"]

log = logging.getLogger("bastion.websocket")

#: Seconds a closing connection may take to flush before it is aborted.
CLOSE_GRACE_SECONDS = 2.0
#: Close codes a peer may send (RFC 6455 7.4; what the websockets library accepts).
_PEER_CLOSE_CODES = frozenset(int(code) for code in EXTERNAL_CLOSE_CODES)


def _frames(pending: bytes | list[bytes]) -> Sequence[bytes]:
    """The frames of a connection's queued writes (one per ``write``)."""
    return (pending,) if isinstance(pending, bytes) else pending


class _Entropy:
    """The system's random bytes (``os.urandom``), read a few KiB at a time.

    A socket id needs nine bytes; reading them one connection at a time was a
    ``getrandom`` system call per connection. The bytes are used once each and
    dropped; a forked child starts with none (``os.register_at_fork``), so two
    processes never hand out the same ones.
    """

    __slots__ = ("_buffer", "_position")

    #: Bytes read at once.
    CHUNK = 4096

    def __init__(self) -> None:
        self._buffer = b""
        self._position = 0

    def reset(self) -> None:
        """Drop what is left (the bytes a forked parent also holds)."""
        self._buffer, self._position = b"", 0

    def below(self, bound: int, size: int) -> int:
        """A uniform integer in ``[0, bound)`` from ``size`` bytes (``bound < 256**size``)."""
        limit = _whole_multiples(bound, size)
        while True:
            position = self._position
            if position + size > len(self._buffer):
                self._buffer, position = os.urandom(self.CHUNK), 0
            self._position = position + size
            value = int.from_bytes(self._buffer[position : position + size], "big")
            if value < limit:
                return value % bound


@functools.cache
def _whole_multiples(bound: int, size: int) -> int:
    """The last whole multiple of ``bound`` that ``size`` random bytes reach.

    A draw at or past it is drawn again, as the modulo would favour low values.
    """
    multiples: int = 256**size // bound
    return multiples * bound


_ENTROPY = _Entropy()
os.register_at_fork(after_in_child=_ENTROPY.reset)


def new_socket_id(taken: set[str]) -> str:
    """A fresh, unpredictable ``digits.digits`` socket id not in ``taken``."""
    while True:
        # One draw of 72 random bits for both halves (each uniform below 10**10).
        high, low = divmod(_ENTROPY.below(10**20, 9), 10**10)
        socket_id = f"{high}.{low}"
        if socket_id not in taken:
            return socket_id


class WebSocketConnection(asyncio.Protocol):
    """The asyncio protocol of an upgraded connection."""

    __slots__ = (
        "_fragments",
        "_grace",
        "_max_size",
        "_messages",
        "_overflow",
        "_proto",
        "_query_token",
        "_received",
        "_reconnect",
        "_refusals",
        "_sizes",
        "app",
        "ctx",
        "ip",
        "last_seen",
        "pending",
        "ping_sent_at",
        "session",
        "state",
        "transport",
    )

    def __init__(
        self,
        ctx: ServerContext,
        transport: asyncio.Transport,
        app: AppState,
        ip: str | None,
        *,
        max_size: int | None,
        query_token: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.transport = transport
        #: The largest frame accepted (the app's payload limit, with headroom).
        self._max_size = max_size
        #: The sans-I/O protocol, made when the connection first needs it.
        self._proto: ServerProtocol | None = None
        self.app = app
        self.ip = ip
        self.state = ConnectionState.OPEN
        self.last_seen = ctx.loop.time()
        self.ping_sent_at: float | None = None
        #: The URL's ``?token=`` (apps with ``jwt.allow_query_token`` only), used once
        #: by :meth:`start` and dropped: never logged, never kept.
        self._query_token = query_token
        self._fragments: list[bytes] | None = None
        #: The slot of ``ctx.deadlines`` a closing connection waits in for its abort.
        self._grace: int | None = None
        #: The message budget, as the loop time at which it is full again (0.0: full).
        self._messages = 0.0
        #: The refusal budget, the same way.
        self._refusals = 0.0
        #: Text messages received (the message rate at close), and whether this
        #: connection was counted as a reconnect (once at most).
        self._received = 0
        self._reconnect = False
        #: The app's message-size series, counted into on each message (no lookup).
        self._sizes = ctx.metrics.message_bytes.series(app.id)
        #: Bytes queued this loop iteration (see Outbox): one chunk, or a list.
        self.pending: bytes | list[bytes] | None = None
        #: Frames held while the transport is paused; None while it keeps up.
        self._overflow: Overflow | None = None
        socket_id = new_socket_id(ctx.socket_ids)
        self.session = Session(socket_id, self.write, self.refuse, opened_at=self.last_seen)

    @property
    def proto(self) -> ServerProtocol:
        """The sans-I/O protocol (made now if the connection never needed it)."""
        proto = self._proto
        if proto is None:
            proto = self._proto = ServerProtocol(state=State.OPEN, max_size=self._max_size)
        return proto

    # --- lifecycle -------------------------------------------------------------------

    def start(self, greeting: bytes = b"") -> None:
        """Greet the client and start serving.

        ``greeting`` is the ``101`` response, when it is not written yet: it goes out
        in one write with ``connection_established`` (one system call, one wake-up
        of the client).
        """
        ctx = self.ctx
        high = min(TRANSPORT_HIGH_WATER, self._write_limit())
        self.transport.set_write_buffer_limits(high=high, low=high // 4)
        ctx.connections.add(self)
        ctx.socket_ids.add(self.session.socket_id)
        ctx.metrics.connections_opened[self.app.id] += 1
        if ctx.reconnects.arrived(self.app.id, self.ip, self.last_seen):
            self._reconnected("address")
        established = msg.connection_established(
            self.session.socket_id, ctx.settings.server.activity_timeout
        )
        # Straight to the transport: nothing was queued before it.
        self.transport.write(greeting + frame_text(established))
        token, self._query_token = self._query_token, None
        if token is not None:
            try:
                ctx.hub.signin_token(self.app, self.session, token)
            except Refused as refused:
                self.refuse(refused)
            else:
                self._signed_in()

    def write(self, data: bytes) -> None:
        """Queue pre-framed bytes; they go out with this iteration's other writes."""
        pending = self.pending
        if pending is None:
            self.pending = data
            self.ctx.outbox.mark(self)
        elif isinstance(pending, bytes):
            self.pending = [pending, data]
        else:
            pending.append(data)

    def flush_pending(self) -> None:
        """Write what this iteration queued, as one chunk; hold it while the transport is paused."""
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        if self.state is ConnectionState.CLOSED:
            return
        overflow = self._overflow
        if overflow is None:
            self.transport.write(pending if isinstance(pending, bytes) else b"".join(pending))
        else:
            self._hold(overflow, _frames(pending))

    @property
    def held_bytes(self) -> int:
        """Bytes held for this connection while its transport is paused (0 when none)."""
        overflow = self._overflow
        return 0 if overflow is None else overflow.size

    def _write_limit(self) -> int:
        """``max_write_buffer_kb`` in bytes: the transport's buffer and the overflow together."""
        return self.ctx.settings.server.max_write_buffer_kb * 1024

    def _hold(self, overflow: Overflow, frames: Sequence[bytes]) -> None:
        for index, frame in enumerate(frames):
            if not overflow.hold(frame):
                self._spill(overflow, frames[index:])
                return

    def _spill(self, overflow: Overflow, refused: Sequence[bytes]) -> None:
        """Past the limit: drop what is held and ``refused``; the cut follows."""
        first = not overflow.spilled
        frames, size = overflow.spill()
        self._count_discarded(frames + len(refused), size + sum(map(len, refused)))
        if first:
            # Not now: this runs inside the outbox's flush of every connection.
            self.ctx.loop.call_soon(self._cut_slow_consumer)

    def _count_discarded(self, frames: int, size: int) -> None:
        if frames:
            metrics, app_id = self.ctx.metrics, self.app.id
            metrics.frames_discarded[app_id] += frames
            metrics.bytes_discarded[app_id] += size

    def send(self, text: bytes) -> None:
        """Frame and write one message to this connection only."""
        if self.state is ConnectionState.OPEN:
            self.write(frame_text(text))

    def refuse(self, refused: Refused) -> None:
        """Answer a refusal: record it, then close, or send an error frame.

        A refusal that leaves the connection open spends its refusal budget
        (severity ``warning`` only: a full presence channel or a long watchlist is
        no sign of a broken or hostile client); once the budget is spent the
        answer is the close ``refusal_limit`` (4100).
        """
        if self.state is not ConnectionState.OPEN:
            return
        rule = self.ctx.refusals.record(
            refused.reason,
            app_id=self.app.id,
            ip=self.ip,
            socket_id=self.session.socket_id,
            user_id=self.session.user_id,
            detail=refused.detail,
        )
        if rule.close_code is not None:
            self.close(rule.close_code, refused.detail)
        elif rule.severity == "warning" and not self._spend_refusal():
            self.refuse(Refused(Reason.REFUSAL_LIMIT))
        elif rule.subscription_type is not None and refused.channel is not None:
            self.send(
                msg.subscription_error(
                    refused.channel, rule.subscription_type, refused.detail, rule.http_status or 400
                )
            )
        elif rule.recovery is not None and refused.channel is not None:
            # A refused resume: the subscribe stands, recovery is answered false.
            self.send(
                msg.recovery(refused.channel, recovered=False, position=None, reason=rule.recovery)
            )
        else:
            self.send(msg.error(refused.detail, rule.error_code, refused.channel))

    def _spend_refusal(self) -> bool:
        """Take a token of the refusal budget; False when it is spent."""
        budget = self.app.settings.refusals_per_connection
        now = self.ctx.loop.time()
        full_at = take_folded(self._refusals, now, budget.rate, budget.burst)
        if full_at is None:
            self._refusals = settle_folded(self._refusals, now, budget.rate, budget.burst)
            return False
        self._refusals = full_at
        return True

    def close(self, code: int, reason: str) -> None:
        """Leave every channel now, then send ``pusher:error`` and a close frame."""
        if self.state is not ConnectionState.OPEN:
            return
        # Protocol >= 6 clients read the close code; the frame helps debugging.
        last = frame_text(msg.error(reason, code)) if code >= 4000 else b""
        self.state = check_transition(self.state, ConnectionState.CLOSING)
        self._forget()
        self._closed(code)
        proto = self._proto
        if proto is None or proto.state is State.OPEN:
            last += self._protocol_output() + close_frame(code, reason)
        else:
            # After the peer's close: the sans-I/O protocol has answered it.
            last += self._protocol_output()
        self._end(last)

    def _closed(self, code: int) -> None:
        """Count this connection's end (once): code, life, message rate; remember it."""
        ctx, session, app_id = self.ctx, self.session, self.app.id
        now = ctx.loop.time()
        opened_at = session.opened_at
        seconds = now - opened_at if opened_at is not None and now > opened_at else 0.0
        ctx.metrics.connection_closed(app_id, code, seconds, self._received)
        ctx.reconnects.closed(app_id, self.ip, session.user_id, now)

    def _reconnected(self, match: str) -> None:
        self._reconnect = True
        self.ctx.metrics.reconnects[(self.app.id, match)] += 1

    def _signed_in(self) -> None:
        """A sign-in: a reconnect if the same user's connection closed just before this one."""
        user_id, opened_at = self.session.user_id, self.session.opened_at
        if self._reconnect or user_id is None or opened_at is None:
            return
        if self.ctx.reconnects.signed_in(self.app.id, user_id, opened_at):
            self._reconnected("user")

    def _end(self, last: bytes) -> None:
        """Write ``last`` (the closing frames), close the TCP side, abort it after a grace.

        A client that is behind (frames held) gets none of them: they are dropped
        and counted, so the close waits only behind the transport's small buffer.
        """
        overflow = self._overflow
        if overflow is None:
            self.flush_pending()
        else:
            self._overflow = None
            pending, self.pending = self.pending, None
            frames, size = overflow.spill()
            if pending is not None:
                queued = _frames(pending)
                frames, size = frames + len(queued), size + sum(map(len, queued))
            self._count_discarded(frames, size)
        if last:
            self.transport.write(last)
        transport = self.transport
        waiting = transport.get_write_buffer_size()
        transport.close()
        if waiting:
            # A client that does not read may never drain the buffer: do not wait
            # forever. (With nothing left to send, the socket closes at once.)
            ctx = self.ctx
            self._grace = ctx.deadlines.add(ctx.loop.time() + CLOSE_GRACE_SECONDS, self)

    def expire(self) -> None:
        """The close grace is over: abort a transport that has not drained yet."""
        self._grace = None
        if self.state is not ConnectionState.CLOSED:  # (not once the transport is gone)
            self.transport.abort()

    def _protocol_output(self) -> bytes:
        """What the sans-I/O protocol has to send (pongs, its close), without its EOF."""
        proto = self._proto
        if proto is None:
            return b""
        return b"".join(proto.data_to_send())

    def _forget(self) -> None:
        ctx = self.ctx
        if self in ctx.connections:
            ctx.connections.discard(self)
            ctx.socket_ids.discard(self.session.socket_id)
            ctx.hub.disconnect(self.app, self.session)

    # --- asyncio.Protocol ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Parse frames and act on each complete message."""
        self.last_seen = self.ctx.loop.time()
        self.ping_sent_at = None
        proto = self._proto
        if self._fragments is None and (
            proto is None
            or (
                proto.state is State.OPEN and proto.current_size is None and not proto.reader.buffer
            )
        ):
            data = self._fast_frames(data, self._max_size)
            if not data:
                self._flush()
                return
        proto = self.proto
        proto.receive_data(data)
        for frame in proto.events_received():
            if self.state is not ConnectionState.OPEN:
                break
            if isinstance(frame, Frame):
                self._on_frame(frame)
        if proto.parser_exc is not None and self.state is ConnectionState.OPEN:
            self._on_parser_error(proto.parser_exc)
        self._flush()

    def pause_writing(self) -> None:
        """The transport passed its high-water mark: hold frames from now on.

        They may take what ``max_write_buffer_kb`` leaves beside the transport's
        buffer; a transport that holds it all already is cut at once.
        """
        overflow = self._overflow
        if overflow is not None:
            overflow.paused = True
        elif self.state is ConnectionState.OPEN:
            room = self._write_limit() - self.transport.get_write_buffer_size()
            overflow = self._overflow = Overflow(max(room, 0))
            if room <= 0:
                self._spill(overflow, ())

    def resume_writing(self) -> None:
        """The transport drained to its low-water mark: release held frames, a slice at a time.

        Until it pauses again (the transport calls :meth:`pause_writing` from
        ``write``) or nothing is held; then frames go straight to it again. Each
        slice fills the transport up to its high-water mark (one frame past it at
        most), so it never holds much more than that: a close written later waits
        behind little.
        """
        overflow = self._overflow
        if overflow is None:
            return
        overflow.paused = False
        transport = self.transport
        while not overflow.paused and not transport.is_closing():
            data = overflow.take(TRANSPORT_HIGH_WATER - transport.get_write_buffer_size())
            if data is None:
                if not overflow.spilled:  # (a spilled one stays until the cut)
                    self._overflow = None
                return
            transport.write(data)

    def _cut_slow_consumer(self) -> None:
        self.refuse(Refused(Reason.SLOW_CONSUMER))

    def connection_lost(self, exc: Exception | None) -> None:
        """The transport is gone: forget the connection."""
        if self.state is ConnectionState.OPEN:
            self._closed(1006)
        self.state = ConnectionState.CLOSED
        if self._grace is not None:
            self.ctx.deadlines.discard(self._grace, self)
            self._grace = None
        self.pending = None
        self._overflow = None
        self._forget()
        # No reference cycle outlives the connection (the session's callbacks, the
        # sans-I/O parser's generator): freed at once, never left to the collector.
        self.session.detach()
        self._proto = None

    # --- frames --------------------------------------------------------------------

    def _flush(self) -> None:
        # Queued messages go before what the sans-I/O protocol wrote after them.
        self.flush_pending()
        proto = self._proto
        if proto is None:
            return
        chunks = proto.data_to_send()
        if not chunks:
            return
        if chunks[-1]:
            overflow = self._overflow
            if overflow is None:
                for chunk in chunks:
                    self.transport.write(chunk)
            else:  # behind held frames, within the same bound (pongs to a ping flood)
                self._hold(overflow, chunks)
            return
        # The sans-I/O protocol asks for EOF (its last chunk): after a close handshake,
        # or after it failed the connection (1002/1007/1009). Either way the TCP side ends.
        if self.state is ConnectionState.OPEN:  # the peer closed: its code (1005: none)
            self.state = check_transition(self.state, ConnectionState.CLOSING)
            self._forget()
            received = proto.close_rcvd
            self._closed(received.code if received is not None else 1005)
        if not self.transport.is_closing():
            self._end(b"".join(chunks))

    def _on_parser_error(self, exc: Exception) -> None:
        if isinstance(exc, EOFError):
            return
        if isinstance(exc, PayloadTooBig):
            reason = Reason.FRAME_TOO_LARGE
        elif isinstance(exc, ProtocolError):
            reason = Reason.WEBSOCKET_PROTOCOL
        elif isinstance(exc, UnicodeDecodeError):
            reason = Reason.INVALID_UTF8  # an invalid close reason
        else:
            reason = Reason.INTERNAL_ERROR
        # The sans-I/O protocol has already queued its close frame (1002/1009).
        self._mark_failed(reason)

    def _fast_frames(self, data: bytes, max_size: int | None) -> bytes:
        """Handle the leading complete, masked, final text frames of ``data``.

        Returns what is left from the first frame that is anything else (or is
        not complete yet): the sans-I/O protocol parses it, from that boundary.
        """
        position, end = 0, len(data)
        while self.state is ConnectionState.OPEN and end - position >= 6:
            # FIN + text with no RSV bit, then MASK set (a client's frames must be).
            first = data[position]
            if first != 0x81:
                if first == 0x88 and self._fast_close(data, position, end):
                    return b""
                break
            length = data[position + 1]
            if length < 0x80:
                break
            length &= 0x7F
            head = position + 2
            if length == 126:
                if end - position < 8:
                    break
                length = (data[head] << 8) | data[head + 1]
                head += 2
            elif length == 127:
                break  # 64-bit lengths: far past any Pusher message, the slow path judges
            if max_size is not None and length > max_size:
                break  # the slow path refuses it (1009), as before
            start = head + 4
            stop = start + length
            if stop > end:
                break
            payload = apply_mask(data[start:stop], data[head:start])
            position = stop
            if self._spend_message_budget():
                self._on_text(payload)
        return data[position:] if position else data

    def _fast_close(self, data: bytes, position: int, end: int) -> bool:
        """Answer a well-formed close frame at ``position`` as websockets would; or False.

        The closing handshake of every connection a client ends: echo the peer's
        close payload, then end the TCP side (a server closes first), without
        building a sans-I/O protocol to do it. Anything that protocol would refuse
        (a 1-byte payload, a code a peer may not send, a reason that is not UTF-8),
        or that is not complete, is left to it.
        """
        length = data[position + 1]
        if length < 0x80 or length - 0x80 > 125 or length == 0x81:
            return False
        length -= 0x80
        start = position + 6
        if start + length > end:
            return False
        payload = apply_mask(data[start : start + length], data[position + 2 : start])
        code = 1005  # a close without a code
        if length:
            code = payload[0] << 8 | payload[1]
            if code not in _PEER_CLOSE_CODES and not 3000 <= code < 5000:
                return False
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                return False
        self.state = check_transition(self.state, ConnectionState.CLOSING)
        self._forget()
        self._closed(code)
        self._end(bytes((0x88, length)) + payload)
        return True

    def _spend_message_budget(self) -> bool:
        """Take a token of the message budget; a frame past it is refused unread."""
        # Before anything looks at the frame: one float compared, nothing decoded.
        limits = self.app.tiers[self.session.tier]  # the connection's role's
        rate, burst = limits.message_rate, limits.message_burst
        full_at = take_folded(self._messages, self.last_seen, rate, burst)
        if full_at is None:
            self._messages = settle_folded(self._messages, self.last_seen, rate, burst)
            self._fragments = None  # the rest of a fragmented message goes with it
            self.refuse(Refused(Reason.MESSAGE_RATE))
            return False
        self._messages = full_at
        return True

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is not Opcode.CLOSE and not self._spend_message_budget():
            return
        if opcode is Opcode.TEXT:
            if frame.fin:
                self._on_text(bytes(frame.data))
            else:
                self._fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            if self._fragments is None:
                return  # the sans-I/O protocol has already failed the connection
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), None
                self._on_text(data)
        elif opcode is Opcode.BINARY:
            self.refuse(Refused(Reason.BINARY_FRAME))
        # PING is answered by the sans-I/O protocol (before the budget sees it: a ping
        # over the budget still gets its pong, and its refusal counts); PONG and CLOSE
        # need nothing more.

    def _on_text(self, data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._fail_invalid_utf8()
            return
        self.ctx.metrics.messages_in[self.app.id] += 1
        self._received += 1
        sizes, size = self._sizes, len(data)
        if size <= 1024:
            sizes[MESSAGE_BYTES_INDEX[size]] += 1
        else:
            sizes[bisect_left(MESSAGE_BYTES_BUCKETS, size)] += 1
        sizes[MESSAGE_BYTES_SUM] += size
        try:
            message = msg.decode_client_message(text)
            self._dispatch(message)
        except Refused as refused:
            self.refuse(refused)
        except Exception:
            # A defect of ours, not the client's: keep the trace in our log only.
            log.exception("internal error handling a message socket=%s", self.session.socket_id)
            self.refuse(Refused(Reason.INTERNAL_ERROR))

    def _fail_invalid_utf8(self) -> None:
        self._mark_failed(Reason.INVALID_UTF8)
        self._end(self._protocol_output() + close_frame(1007, "invalid UTF-8"))

    def _mark_failed(self, reason: Reason) -> None:
        """Record a frame-level failure and leave everything; the caller sends the close."""
        self.ctx.refusals.record(
            reason, app_id=self.app.id, ip=self.ip, socket_id=self.session.socket_id
        )
        self.state = check_transition(self.state, ConnectionState.CLOSING)
        self._forget()
        self._closed(reason.value.close_code or 1011)

    def _dispatch(self, message: msg.ClientMessage) -> None:
        hub, app, session = self.ctx.hub, self.app, self.session
        if isinstance(message, msg.ClientEvent):
            hub.client_event(app, session, message)
        elif isinstance(message, msg.Subscribe):
            if message.auth and classify_channel(message.channel).needs_auth:
                self._check_auth_budget(message.channel)
            hub.subscribe(app, session, message)
        elif isinstance(message, msg.Unsubscribe):
            hub.unsubscribe(app, session, message.channel)
        elif isinstance(message, msg.Ping):
            self.send(msg.pong())
        elif isinstance(message, msg.Signin):
            self._check_auth_budget(None)
            hub.signin(app, session, message)
            self._signed_in()
        # Pong: receiving it already counted as activity.

    def _check_auth_budget(self, channel: str | None) -> None:
        """Refuse an authentication attempt, unverified, once the address's budget is spent.

        A channel auth or a sign-in from an address that spent ``auth_failures_per_ip``
        is a failure on top of the budget: ``auth_failure_limit``, close 4100. A public
        subscription, or a grant from a verified sign-in token (no ``auth``), is no
        attempt and never gets here.
        """
        if self.ctx.auth_budget.refusal(self.ip, time.time()) is not None:
            raise Refused(Reason.AUTH_FAILURE_LIMIT, channel=channel)

    # --- heartbeat -----------------------------------------------------------------

    def check_liveness(self, now: float, activity_timeout: float, pong_timeout: float) -> None:
        """Ping a silent client; close with 4201 when a ping went unanswered.

        Also, on the same tick, the session's deadlines: the sign-in deadline and
        the sign-in token's expiry warning and close (``Hub.check_session``).
        """
        if self.state is not ConnectionState.OPEN:
            return
        self.ctx.hub.check_session(self.app, self.session, now)
        if self.state is not ConnectionState.OPEN:
            return
        if self.ping_sent_at is not None:
            if now - self.ping_sent_at >= pong_timeout:
                self.refuse(Refused(Reason.PONG_TIMEOUT))
        elif now - self.last_seen >= activity_timeout:
            self.ping_sent_at = now
            self.send(msg.ping())
