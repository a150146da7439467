"""The listener's protocol: HTTP/1.1 and the WebSocket upgrade on one port.

It carries bytes; what a request gets is decided elsewhere, as data. A blocked
peer is dropped at accept. The head is bounded (431), the whole request must
arrive within ``handshake_timeout``, and a kept-alive connection may idle
:data:`KEEPALIVE_SECONDS`. Once a head is complete the client address is
resolved (the one ``forwarded_header``, only from a trusted proxy): one a trusted
proxy names that is blocked gets 403 ``ip_blocked``; a ``Content-Length`` past
``max_request_body_kb`` 413 before the body is read. A plain request then goes to
the node's route table (:mod:`bastion.api.routes`); an upgrade passes the ordered
gates of :mod:`bastion.server.upgrade`, ``websockets`` validates the handshake and
writes the 101, and the transport is handed to a WebSocket connection holding one
of its address's slots until its TCP ends (no permessage-deflate). Answers go out
in request order, each after the fan-out its request queued, and a ``HEAD``'s
without a body (:mod:`bastion.server.answers`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import cast

import httptools

from bastion.api.http import HttpRequest, Refusal, error_response
from bastion.protocol.handshake import Failed, check_handshake
from bastion.protocol.refusals import Reason
from bastion.security.proxies import FORWARDING_HEADERS, ClientAddress, ip_text
from bastion.server.answers import AnswerQueue
from bastion.server.context import ServerContext
from bastion.server.upgrade import (
    AFTER_101,
    BEFORE_101,
    AdmittedConnection,
    Slot,
    close_after_101,
    max_frame_size,
    read_upgrade,
)

__all__ = ["HttpConnection"]

log = logging.getLogger("bastion.http")
logging.getLogger("websockets").setLevel(logging.WARNING)

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 64
#: Idle seconds allowed between keep-alive requests.
KEEPALIVE_SECONDS = 60.0
_DIGITS = re.compile(r"[0-9]{1,18}")


class HttpConnection(asyncio.Protocol):
    """Parses HTTP requests on one TCP connection until it upgrades or closes."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        #: The TCP peer's address.
        self.peer_ip: str | None = None
        #: The current request's client address: the peer until the head is complete,
        #: then the address a trusted proxy names, if any.
        self.ip: str | None = None
        #: The address operator endpoints decide on (ClientAddress.operator_ip).
        self.operator_ip: str | None = None
        #: Whether the current request is a HEAD (answered without a body).
        self.head_request = False
        #: The admission slot this connection holds, until it is handed to the WebSocket.
        self.slot: Slot | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.head = bytearray()
        self.head_done = False
        self.url = b""
        #: The current request's headers, names in lower case.
        self.headers: list[tuple[str, str]] = []
        #: Whether the current request carries a forwarding header (a proxy's say).
        self.forwarded = False
        self.body = bytearray()
        self.body_limit = ctx.settings.server.max_request_body_kb * 1024
        self.refused = False
        #: The slot of ``ctx.deadlines`` this connection waits in (None: none).
        self.waiting_in: int | None = None
        #: When the connection times out (loop time; infinite: it does not). The
        #: slot is moved lazily: a kept-alive request only moves this, and the
        #: slot, when it comes early, is joined again for what is left.
        self.deadline = math.inf
        #: This connection's answers, in request order (made at the first one: a
        #: connection that becomes a WebSocket never needs it).
        self._answers: AnswerQueue | None = None

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the handshake deadline."""
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        # Normalised (an IPv4-mapped IPv6 peer is its IPv4 address), so every limit
        # and block sees one spelling of an address.
        self.peer_ip = self.ip = ip_text(peer[0]) if isinstance(peer, tuple) and peer[0] else None
        blocklist = self.ctx.blocklist
        if blocklist is not None and self.peer_ip and blocklist.check(self.peer_ip, time.time()):
            # No answer at all: a blocked host gets nothing to parse or time.
            self.refused = True
            self.transport.abort()
            return
        self._arm(self.ctx.settings.server.handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadline; give back an admission slot the WebSocket never took over."""
        self._disarm()
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        self._release_parser()

    def _release_parser(self) -> None:
        """Drop the parser: it holds this protocol's callbacks, a cycle otherwise.

        Called once nothing more is parsed (the connection is gone, or is a
        WebSocket now), so the pair is freed at once instead of waiting for the
        cycle collector.
        """
        self.__dict__.pop("parser", None)  # (None: released already)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; bound the request head; hand off upgrades."""
        if self.refused:
            return
        if not self.head_done:
            self.head += data
            if len(self.head) > MAX_HEAD_BYTES and b"\r\n\r\n" not in self.head[:MAX_HEAD_BYTES]:
                self._refuse(Refusal(Reason.HTTP_HEADERS_TOO_LARGE))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            try:
                self._upgrade(data[offset:])
            except Exception:
                log.exception("internal error during the WebSocket upgrade")
                self.refused = True
                self.ctx.refusals.record(Reason.HTTP_INTERNAL_ERROR, ip=self.ip)
                if self.transport is not None:
                    self.transport.abort()
        except httptools.HttpParserError:
            self._refuse(Refusal(Reason.HTTP_BAD_REQUEST))

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        """A new request: reset per-request state."""
        self.ip = self.operator_ip = self.peer_ip
        self.head_request = False
        self.url = b""
        self.headers = []
        self.forwarded = False
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        """Collect the request target."""
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect one header (its name in lower case), bounding the count."""
        headers = self.headers
        if len(headers) >= MAX_HEADERS:
            self._refuse(Refusal(Reason.HTTP_HEADERS_TOO_LARGE))
            raise httptools.HttpParserError("too many headers")
        key = name.decode("latin-1").lower()
        headers.append((key, value.decode("latin-1")))
        if key in FORWARDING_HEADERS:
            self.forwarded = True

    def on_headers_complete(self) -> None:
        """The head is complete: name the client, check the body size.

        The handshake deadline holds until the body ends.
        """
        self.head_done = True
        self.head_request = self.parser.get_method() == b"HEAD"
        # Per request: a trusted proxy may send many clients' requests on one connection.
        client = self._client()
        self.ip = client.ip
        self.operator_ip = client.operator_ip
        blocklist, ip = self.ctx.blocklist, self.ip
        if blocklist is not None and ip and ip != self.peer_ip and blocklist.check(ip, time.time()):
            # The blocklist has counted and audited it: no second record here.
            self._refuse(Refusal(Reason.IP_BLOCKED), record=False)
            raise httptools.HttpParserError("blocked")
        lengths = [value for key, value in self.headers if key == "content-length"]
        length = lengths[0] if lengths else None
        if length is not None and _DIGITS.fullmatch(length) and int(length) > self.body_limit:
            self._refuse(Refusal(Reason.HTTP_BODY_TOO_LARGE))
            raise httptools.HttpParserError("body too large")

    def on_body(self, body: bytes) -> None:
        """Collect the body, bounded."""
        self.body += body
        if len(self.body) > self.body_limit:
            self._refuse(Refusal(Reason.HTTP_BODY_TOO_LARGE))
            raise httptools.HttpParserError("body too large")

    def on_message_complete(self) -> None:
        """Answer a plain HTTP request (upgrades continue in :meth:`_upgrade`)."""
        if self.parser.should_upgrade() or self.refused:
            return
        self.deadline = math.inf
        started, path = time.perf_counter(), ""
        try:
            door = self.ctx.door
            assert door is not None, "the node sets its route table before it listens"
            request = self._request()
            path = request.path
            response = door.answer(request)
        except Exception:
            # A defect of ours: the caller gets a generic 500, the trace stays in our log.
            log.exception("internal error handling an HTTP request")
            self.ctx.refusals.record(Reason.HTTP_INTERNAL_ERROR, ip=self.ip)
            response = error_response(Reason.HTTP_INTERNAL_ERROR)
        keep_alive = self.parser.should_keep_alive() and not self.ctx.draining
        self.answers.put(response, keep_alive, self.head_request, self.ip, (path, started))
        if keep_alive:
            self.head = bytearray()
            self.head_done = False
            self._arm(KEEPALIVE_SECONDS)

    @property
    def answers(self) -> AnswerQueue:
        """This connection's answers, in request order."""
        answers = self._answers
        if answers is None:
            assert self.transport is not None, "answers are written once connected"
            answers = self._answers = AnswerQueue(self.ctx, self.transport)
        return answers

    # --- the request ---------------------------------------------------------------------

    def _client(self) -> ClientAddress:
        """Who sent the current request (per trusted-proxy settings, which a reload changes)."""
        proxies = self.ctx.proxies
        if self.forwarded:
            return proxies.resolve(self.peer_ip, self.headers)
        # Without any forwarding header, the answer is the peer's own, whatever the request.
        return proxies.direct(self.peer_ip)

    def _request(self) -> HttpRequest:
        url = httptools.parse_url(self.url)
        method, path = self.parser.get_method().decode("latin-1"), url.path.decode("latin-1")
        query = url.query.decode("latin-1") if url.query else ""
        body, ip, operator_ip = bytes(self.body), self.ip, self.operator_ip
        now = self.ctx.wall_clock()
        return HttpRequest(method, path, query, self.headers, body, ip, operator_ip, now)

    # --- refusals and timers ------------------------------------------------------------

    def _refuse(self, refusal: Refusal, *, record: bool = True) -> None:
        """Record ``refusal`` (unless already counted), answer it and close."""
        if self.refused:
            return
        self.refused = True
        if record:
            self.ctx.refusals.record(refusal.reason, app_id=refusal.app_id, ip=self.ip)
        self.answers.write(refusal.response(), keep_alive=False, head=self.head_request)

    def _arm(self, seconds: float) -> None:
        self.deadline = self.ctx.loop.time() + seconds
        if self.waiting_in is None:
            self.waiting_in = self.ctx.deadlines.add(self.deadline, self)

    def _disarm(self) -> None:
        if self.waiting_in is not None:
            self.ctx.deadlines.discard(self.waiting_in, self)
            self.waiting_in = None

    def expire(self) -> None:
        """The deadline's slot came: cut the connection if its deadline has passed."""
        self.waiting_in = None
        if self.deadline == math.inf:
            return
        if self.ctx.loop.time() < self.deadline:
            self.waiting_in = self.ctx.deadlines.add(self.deadline, self)
            return
        if self.transport is not None and not self.transport.is_closing():
            if self.head:
                # A client that dribbles its request (head or body) is cut, not waited for.
                self.ctx.refusals.record(Reason.HTTP_BAD_REQUEST, ip=self.ip, detail="timeout")
            self.transport.close()

    # --- WebSocket upgrade ---------------------------------------------------------------

    def _upgrade(self, rest: bytes) -> None:
        transport = self.transport
        assert transport is not None
        ctx = self.ctx
        method = self.parser.get_method().decode("latin-1")
        upgrade = read_upgrade(ctx, self.url, method, self.headers, self.ip, ctx.wall_clock())
        for gate in BEFORE_101:
            refusal = gate(upgrade, ctx)
            if refusal is not None:
                self._refuse(refusal)
                return
        # Admitted: held by this protocol until the WebSocket takes it over;
        # connection_lost gives it back if the upgrade is refused after this point.
        self.slot = Slot(ctx.admission, self.ip or "")
        answer = check_handshake(self.headers)
        if isinstance(answer, Failed):
            transport.write(answer.response)
            self.refused = True
            ctx.refusals.record(Reason.WEBSOCKET_PROTOCOL, ip=self.ip, detail=answer.reason)
            transport.close()
            return
        # The 101 goes out with what follows it, in one write.
        for after in AFTER_101:
            reason = after(upgrade, ctx)
            if reason is not None:
                self.refused = True
                rule = ctx.refusals.record(reason, app_id=upgrade.app_id, ip=self.ip)
                close_after_101(transport, rule, answer.response)
                return
        assert upgrade.app is not None and self.slot is not None  # AFTER_101 checked the app
        self._disarm()
        token = upgrade.params.get("token") or None
        connection = AdmittedConnection(
            ctx,
            transport,
            upgrade.app,
            self.ip,
            max_size=max_frame_size(upgrade.app),
            query_token=token,
        )
        connection.slot, self.slot = self.slot, None
        transport.set_protocol(connection)
        self._release_parser()
        connection.start(answer.response)
        if rest:
            connection.data_received(rest)
