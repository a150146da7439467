"""The listener's protocol: HTTP/1.1 (REST, health) and the WebSocket upgrade.

Every accepted TCP connection starts here. ``httptools`` parses requests; the
request head is bounded in size and header count (431 past them) and must
arrive within ``handshake_timeout``. A request for ``/app/{key}`` with an
``Upgrade: websocket`` header is handed to the ``websockets`` sans-I/O
protocol, which validates the handshake (426 for an unsupported
``Sec-WebSocket-Version``) and writes the 101 response; the transport then
switches to a :class:`~bastion.server.websocket.WebSocketConnection`.
Permessage-deflate is never negotiated.

An app with ``allowed_origins`` refuses a handshake from a foreign Origin with
403 before the upgrade, and its REST routes (``/apps/{id}/...``) answer CORS:
``Access-Control-Allow-Origin`` for an allowed origin, and ``OPTIONS``
preflights (204, or 403 for a foreign origin). An app without the list gets no
CORS headers at all. Each app's :class:`OriginPolicy` is built once.

Addresses and per-address limits (``[security]``): a TCP peer on the blocklist
is dropped at accept, before any byte is parsed. Each request's client address
is resolved once its head is complete (the one ``forwarded_header``, and only
from a trusted proxy) and is the address every limit, refusal and audit row
uses; an address a trusted proxy names that is blocked gets 403 ``ip_blocked``.
Plain HTTP requests (health checks aside) spend the address's
``rest_requests_per_ip`` token before anything is routed or verified (429
``ip_rate_limited``). An authentication attempt from an address whose
failed-authentication budget is spent (:class:`~bastion.security.admission.AuthFailureBudget`;
``never_block`` addresses are outside it) gets 429 ``auth_failure_limit`` before
anything is verified: a signed REST call (``/apps/{id}/...``), an upgrade carrying
``?token=``, an admin call. An upgrade must pass, before the 101: the query-token
rule (400 ``query_token_refused`` unless the app's ``jwt.allow_query_token``),
the budget when it carries a token, then the admission (429
``ip_connection_limit`` or ``connection_rate``). Every 429 carries
``Retry-After``. An admitted upgrade holds one of its address's
``max_connections_per_ip`` slots until its TCP connection is lost, whichever
protocol owns it by then.

Operator endpoints decide on the request's operator address
(:attr:`~bastion.security.proxies.ClientAddress.operator_ip`: the TCP peer, or the
client a trusted proxy named; none for a request that says it was forwarded by
nobody we trust) and, when they let a caller in by that address, require a
``Host`` header naming this server (:class:`~bastion.security.hosts.HostPolicy`,
403 ``host_not_allowed``): a page whose DNS name is re-pointed at loopback gets
nothing from a browser on this host.

``GET /readyz`` and ``GET /metrics`` (when ``[metrics] enabled``) are answered by
:class:`~bastion.api.ops.Ops` before any app route and without the REST bucket.
A refused scrape (403 ``metrics_forbidden`` or ``host_not_allowed``) or another
method (405) spends the bucket.

``/api/security/*`` is the security admin API (:mod:`bastion.api.admin`), routed
before the app routes and the bucket once ``[admin] token`` is set (unset, the
paths fall through to the app routes' 404). A call from an address outside
``[admin] allow_from`` or without the bearer token is refused 401
``admin_unauthorized`` (a failed authentication) and spends the bucket; one
with a foreign ``Host`` is refused 403 ``host_not_allowed`` before its token is
compared; an authorised call spends nothing. ``/dashboard``
(:mod:`bastion.api.dashboard`) is served on the same terms without the token (the
page is a login form): to an address in ``allow_from`` once the token is set (the
unknown path's 404 otherwise), with a ``Host`` naming this server.

A ``HEAD`` request is answered with the headers a ``GET`` would get
(``Content-Length`` included) and no body, so a kept-alive connection stays in
step.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Awaitable
from dataclasses import replace
from typing import cast
from urllib.parse import parse_qsl, unquote

import httptools
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest
from websockets.protocol import State
from websockets.server import ServerProtocol

from bastion.api.admin import ADMIN_PREFIX, AdminApi, AdminNodeView
from bastion.api.dashboard import METHODS as DASHBOARD_METHODS
from bastion.api.dashboard import dashboard_response, is_dashboard_path, with_security_headers
from bastion.api.http import (
    HttpRequest,
    HttpResponse,
    error_response,
    rate_limited_response,
)
from bastion.api.ops import Ops
from bastion.config import AppSettings
from bastion.core.hub import AppState
from bastion.eager import start
from bastion.protocol import messages as msg
from bastion.protocol.refusals import Reason
from bastion.security.admission import Admission
from bastion.security.origins import OriginPolicy
from bastion.security.proxies import parse_ip
from bastion.server.context import ServerContext, frame_text
from bastion.server.websocket import WebSocketConnection

__all__ = ["HttpConnection"]

log = logging.getLogger("bastion.http")

#: A request's answer: now, or later (a REST query waiting for the cluster state).
Answer = HttpResponse | Awaitable[HttpResponse]
logging.getLogger("websockets").setLevel(logging.WARNING)

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 64
#: Idle seconds allowed between keep-alive requests.
KEEPALIVE_SECONDS = 60.0
_DIGITS = re.compile(r"[0-9]{1,18}")
_SUPPORTED_PROTOCOLS = frozenset({"5", "6", "7"})
#: Paths answered without any limit: load balancers probe them constantly.
_HEALTH_PATHS = frozenset({"/", "/up", "/healthz"})
#: Readiness (always) and the Prometheus exposition (``[metrics] enabled``): exempt from
#: the per-address bucket unless refused (bastion.api.ops).
_READY_PATH = "/readyz"
_METRICS_PATH = "/metrics"
_APP_PATH = re.compile(r"^/apps/(?P<app_id>[^/]+)/")
_PREFLIGHT_HEADERS = (
    ("Access-Control-Allow-Methods", "GET, POST"),
    ("Access-Control-Allow-Headers", "Content-Type"),
    ("Access-Control-Max-Age", "600"),
)

#: Each node's admin API, built on first use (keyed by the node's Ops).
_ADMINS: weakref.WeakKeyDictionary[Ops, AdminApi] = weakref.WeakKeyDictionary()
#: RFC 6750: a 401 names the scheme it wants.
_ADMIN_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="bastion-admin"'),)


def admin_api(ops: Ops) -> AdminApi:
    """The admin API of the node behind ``ops`` (cached per node)."""
    admin = _ADMINS.get(ops)
    if admin is None:
        admin = _ADMINS[ops] = AdminApi(cast(AdminNodeView, ops.node), ops)
    return admin


#: Each app's policy, built on first use; rebuilt only if the app's settings object changes.
_POLICIES: weakref.WeakKeyDictionary[AppState, tuple[AppSettings, OriginPolicy]] = (
    weakref.WeakKeyDictionary()
)


def origin_policy(app: AppState) -> OriginPolicy:
    """The app's origin policy (cached per app)."""
    settings = app.settings
    cached = _POLICIES.get(app)
    if cached is not None and cached[0] is settings:
        return cached[1]
    policy = OriginPolicy.build(settings.allowed_origins, settings.reject_missing_origin)
    _POLICIES[app] = (settings, policy)
    return policy


class _Slot:
    """An admitted connection's hold on one of its address's slots, released once."""

    __slots__ = ("admission", "ip")

    def __init__(self, admission: Admission, ip: str) -> None:
        self.admission: Admission | None = admission
        self.ip = ip

    def release(self) -> None:
        """Give the slot back (later calls do nothing)."""
        admission, self.admission = self.admission, None
        if admission is not None:
            admission.release(self.ip)


class _AdmittedConnection(WebSocketConnection):
    """A WebSocket connection that gives its address's slot back when its TCP ends.

    ``connection_lost`` is the one call the transport always makes, exactly once,
    to whichever protocol owns it then: a clean close, a timeout, an abort or the
    peer vanishing all end there.
    """

    __slots__ = ("slot",)

    slot: _Slot

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection, then release its slot (even if forgetting failed)."""
        try:
            super().connection_lost(exc)
        finally:
            self.slot.release()


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
        self.slot: _Slot | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.head = bytearray()
        self.head_done = False
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.body_limit = ctx.settings.server.max_request_body_kb * 1024
        self.refused = False
        self.timer: asyncio.TimerHandle | None = None
        #: Answers not written yet, in request order; a cluster-wide query's is a task.
        #: Each with its keep-alive and whether it answers a HEAD.
        self.answers: list[tuple[HttpResponse | asyncio.Task[HttpResponse], bool, bool]] = []

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the handshake timer."""
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        address = parse_ip(peer[0]) if isinstance(peer, tuple) and peer[0] else None
        # Normalised (an IPv4-mapped IPv6 peer is its IPv4 address), so every limit
        # and block sees one spelling of an address.
        self.peer_ip = self.ip = str(address) if address is not None else None
        blocklist = self.ctx.blocklist
        if (
            blocklist is not None
            and self.peer_ip is not None
            and blocklist.check(self.peer_ip, time.time())
        ):
            # No answer at all: a blocked host gets nothing to parse or time.
            self.refused = True
            self.transport.abort()
            return
        self._arm(self.ctx.settings.server.handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the timer; give back an admission slot the WebSocket never took over."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    def data_received(self, data: bytes) -> None:
        """Feed the parser; bound the request head; hand off upgrades."""
        if self.refused:
            return
        if not self.head_done:
            self.head += data
            if len(self.head) > MAX_HEAD_BYTES and b"\r\n\r\n" not in self.head[:MAX_HEAD_BYTES]:
                self._refuse(Reason.HTTP_HEADERS_TOO_LARGE)
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
            self._refuse(Reason.HTTP_BAD_REQUEST)

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        """A new request: reset per-request state."""
        self.ip = self.operator_ip = self.peer_ip
        self.head_request = False
        self.url = b""
        self.headers = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        """Collect the request target."""
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect one header, bounding the count."""
        if len(self.headers) >= MAX_HEADERS:
            self._refuse(Reason.HTTP_HEADERS_TOO_LARGE)
            raise httptools.HttpParserError("too many headers")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        """The head is complete: name the client, check the body size.

        The handshake timer keeps running until the body ends.
        """
        self.head_done = True
        self.head_request = self.parser.get_method() == b"HEAD"
        # Per request: a trusted proxy may send many clients' requests on one connection.
        client = self.ctx.proxies.resolve(self.peer_ip, self.headers)
        self.ip = client.ip
        self.operator_ip = client.operator_ip
        blocklist = self.ctx.blocklist
        if (
            blocklist is not None
            and self.ip is not None
            and self.ip != self.peer_ip
            and blocklist.check(self.ip, time.time())
        ):
            # The blocklist has counted and audited it: no second record here.
            self._refuse(Reason.IP_BLOCKED, record=False)
            raise httptools.HttpParserError("blocked")
        length = self._header("content-length")
        if length is not None and _DIGITS.fullmatch(length) and int(length) > self.body_limit:
            self._refuse(Reason.HTTP_BODY_TOO_LARGE)
            raise httptools.HttpParserError("body too large")

    def on_body(self, body: bytes) -> None:
        """Collect the body, bounded."""
        self.body += body
        if len(self.body) > self.body_limit:
            self._refuse(Reason.HTTP_BODY_TOO_LARGE)
            raise httptools.HttpParserError("body too large")

    def on_message_complete(self) -> None:
        """Answer a plain HTTP request (upgrades continue in :meth:`_upgrade`)."""
        if self.parser.should_upgrade() or self.refused:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            response = self._handle_http()
        except Exception:
            # A defect of ours: the caller gets a generic 500, the trace stays in our log.
            log.exception("internal error handling an HTTP request")
            self.ctx.refusals.record(Reason.HTTP_INTERNAL_ERROR, ip=self.ip)
            response = error_response(Reason.HTTP_INTERNAL_ERROR)
        keep_alive = self.parser.should_keep_alive() and not self.ctx.draining
        head = self.head_request
        outbox = self.ctx.outbox
        if not isinstance(response, HttpResponse):
            # A cluster-wide query: answered when it completes, still in order.
            task = asyncio.ensure_future(self._finish(response))
            self.answers.append((task, keep_alive, head))
            task.add_done_callback(self._answer_ready)
        elif self.answers or outbox.busy:
            # Answer once the deliveries this request queued are written: a publisher
            # cannot outrun the fan-out, and pipelined answers keep their order.
            self.answers.append((response, keep_alive, head))
            if len(self.answers) == 1:
                outbox.after_flush(self._write_answers)
        else:
            self._answer(response, keep_alive, head)
        if keep_alive:
            self.head = bytearray()
            self.head_done = False
            self._arm(KEEPALIVE_SECONDS)

    def _write_answers(self) -> None:
        """Write the answers that are ready, in order, up to the first pending one."""
        while self.answers:
            response, keep_alive, head = self.answers[0]
            if isinstance(response, asyncio.Task):
                if not response.done():
                    return
                response = response.result()
            del self.answers[0]
            self._answer(response, keep_alive, head)

    def _answer_ready(self, task: asyncio.Task[HttpResponse]) -> None:
        if self.ctx.outbox.busy:
            self.ctx.outbox.after_flush(self._write_answers)
        else:
            self._write_answers()

    async def _finish(self, pending: Awaitable[HttpResponse]) -> HttpResponse:
        try:
            return await pending
        except Exception:
            log.exception("internal error handling an HTTP request")
            self.ctx.refusals.record(Reason.HTTP_INTERNAL_ERROR, ip=self.ip)
            return error_response(Reason.HTTP_INTERNAL_ERROR)

    def _answer(self, response: HttpResponse, keep_alive: bool, head: bool = False) -> None:
        self._write_response(response, keep_alive, head=head)
        if not keep_alive and self.transport is not None:
            self.transport.close()

    # --- plain HTTP ----------------------------------------------------------------------

    def _header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def _values(self, name: str) -> list[str]:
        """Every value of the header ``name`` (lower case), in order."""
        return [value for key, value in self.headers if key.lower() == name]

    def _origin(self) -> str | None:
        """The Origin header; several of them count as one malformed value."""
        values = [value for key, value in self.headers if key.lower() == "origin"]
        if not values:
            return None
        return values[0] if len(values) == 1 else ""

    def _handle_http(self) -> Answer:
        url = httptools.parse_url(self.url)
        path = url.path.decode("latin-1")
        query = url.query.decode("latin-1") if url.query else ""
        method = self.parser.get_method().decode("latin-1")
        if path in _HEALTH_PATHS:
            return HttpResponse(200, b"OK", content_type="text/plain")
        ctx = self.ctx
        ops = ctx.ops
        if ops is not None and (path == _READY_PATH or (path == _METRICS_PATH and ops.enabled)):
            # Before the app routes and the per-address bucket: a probe or an allowed
            # scraper is never limited. Disabled metrics fall through to the 404.
            return self._ops(ops, path, method)
        if ops is not None and (path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")):
            admin = admin_api(ops)
            if admin.enabled:
                # Disabled: fall through to the app routes' 404, like any unknown path.
                return self._admin(admin, path, query, method)
        if (
            ops is not None
            and is_dashboard_path(path)
            and admin_api(ops).peer_allowed(self.operator_ip)
        ):
            # The operator page (bastion.api.dashboard). Off, or for any other address,
            # it falls through to the app routes' 404 like any unknown path.
            if not admin_api(ops).hosts.allows(self._values("host")):
                # DNS rebinding: the page must not load under another site's name.
                return with_security_headers(self._refuse_ops(Reason.HOST_NOT_ALLOWED))
            if method in DASHBOARD_METHODS:
                return dashboard_response(method, path)
            refused = self._refuse_ops(Reason.HTTP_METHOD, headers=(("Allow", "GET, HEAD"),))
            return with_security_headers(refused)
        route = _APP_PATH.match(path)
        app = ctx.hub.apps_by_id.get(route["app_id"]) if route is not None else None
        app_id = app.id if app is not None else None
        ip = self.ip or ""
        now = time.time()
        # Before any HMAC work, so a flood costs a dict lookup each.
        wait = ctx.rest_requests.take(ip, now)
        if wait > 0:
            ctx.refusals.record(Reason.HTTP_IP_RATE, app_id=app_id, ip=self.ip)
            return rate_limited_response(Reason.HTTP_IP_RATE, wait)
        policy = origin_policy(app) if app is not None else None
        if policy is not None and method == "OPTIONS":
            assert app is not None
            return self._preflight(app, policy)
        denial = ctx.auth_budget.refusal(self.ip, now) if route is not None else None
        if denial is not None:
            # Every /apps/{id}/ call is signed: an authentication attempt. Even a correct
            # signature waits: the budget stops guessing, not mistakes.
            ctx.refusals.record(denial.reason, app_id=app_id, ip=self.ip)
            return rate_limited_response(denial.reason, denial.retry_after)
        request = HttpRequest(
            method=method, path=path, query=query, body=bytes(self.body), ip=self.ip, now=now
        )
        # Eagerly: on one node the answer is ready in this call; a cluster query
        # continues as a task.
        response = start(ctx.rest.handle(request, now=now))
        if policy is None or not policy.restricted:
            return response
        cors = self._cors(policy)
        if isinstance(response, HttpResponse):
            return replace(response, headers=response.headers + cors)

        async def with_cors(pending: Awaitable[HttpResponse]) -> HttpResponse:
            answered = await pending
            return replace(answered, headers=answered.headers + cors)

        return with_cors(response)

    def _ops(self, ops: Ops, path: str, method: str) -> HttpResponse:
        """Answer ``/readyz`` or ``/metrics`` (see :mod:`bastion.api.ops`)."""
        if path == _METRICS_PATH:
            authorization = self._values("authorization")
            address = self.operator_ip
            host_ok = ops.hosts.allows(self._values("host"))
            if not ops.may_scrape(address, authorization, host_ok=host_ok):
                allowed = ops.address_allowed(address)
                reason = Reason.HOST_NOT_ALLOWED if allowed else Reason.METRICS_FORBIDDEN
                return self._refuse_ops(reason)
        if method != "GET":
            return self._refuse_ops(Reason.HTTP_METHOD, headers=(("Allow", "GET"),))
        return ops.exposition() if path == _METRICS_PATH else ops.readiness()

    def _admin(self, admin: AdminApi, path: str, query: str, method: str) -> HttpResponse:
        """Answer ``/api/security/*`` (see :mod:`bastion.api.admin`)."""
        address = self.operator_ip
        # Checked before the path and the method: a stranger learns nothing about the
        # routes. The address first, then the Host (a DNS-rebinding page never gets to
        # try a token, even from loopback where no budget applies), then the budget.
        refused: HttpResponse | None = None
        if not admin.peer_allowed(address):
            refused = self._refuse_ops(Reason.ADMIN_UNAUTHORIZED, headers=_ADMIN_CHALLENGE)
        elif not admin.hosts.allows(self._values("host")):
            refused = self._refuse_ops(Reason.HOST_NOT_ALLOWED)
        else:
            denial = self.ctx.auth_budget.refusal(self.ip, time.time())
            if denial is not None:
                refused = self._refuse_ops(denial.reason, retry_after=denial.retry_after)
            elif not admin.authorized(address, self._values("authorization")):
                refused = self._refuse_ops(Reason.ADMIN_UNAUTHORIZED, headers=_ADMIN_CHALLENGE)
        if refused is not None:
            # Every refusal (and a 429) alike: an admin answer is never cached.
            return replace(refused, headers=(*refused.headers, ("Cache-Control", "no-store")))
        try:
            return admin.handle(method, path, query, bytes(self.body))
        except Exception:
            # As for any request (the trace stays in our log), with the admin headers.
            log.exception("internal error handling an admin request")
            self.ctx.refusals.record(Reason.HTTP_INTERNAL_ERROR, ip=self.ip)
            return error_response(
                Reason.HTTP_INTERNAL_ERROR, headers=(("Cache-Control", "no-store"),)
            )

    def _refuse_ops(
        self,
        reason: Reason,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        retry_after: float | None = None,
    ) -> HttpResponse:
        """Refuse an operations request, spending the address's REST token first.

        Only refused requests spend it: each refusal is logged, so without the bucket
        a stranger could flood the log through an unlimited path. With
        ``retry_after`` the answer is a 429 carrying it.
        """
        ip = self.ip or ""
        wait = self.ctx.rest_requests.take(ip, time.time())
        if wait > 0:
            self.ctx.refusals.record(Reason.HTTP_IP_RATE, ip=self.ip)
            return rate_limited_response(Reason.HTTP_IP_RATE, wait)
        self.ctx.refusals.record(reason, ip=self.ip)
        if retry_after is not None:
            return rate_limited_response(reason, retry_after)
        return error_response(reason, headers=headers)

    def _cors(self, policy: OriginPolicy) -> tuple[tuple[str, str], ...]:
        """CORS headers for a restricted app's response: the origin only if allowed."""
        origin = self._origin()
        if origin is not None and policy.allows_cors(origin):
            return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
        # The answer still depends on Origin, for any cache in between.
        return (("Vary", "Origin"),)

    def _preflight(self, app: AppState, policy: OriginPolicy) -> HttpResponse:
        """Answer a CORS preflight for one of ``app``'s REST routes."""
        if not policy.restricted:
            return HttpResponse(204, b"")
        origin = self._origin()
        if origin is None:
            # Not a CORS preflight (browsers always send Origin): nothing to allow.
            return HttpResponse(204, b"", headers=(("Vary", "Origin"),))
        if not policy.allows_cors(origin):
            self.ctx.refusals.record(Reason.HTTP_ORIGIN_REFUSED, app_id=app.id, ip=self.ip)
            response = error_response(Reason.HTTP_ORIGIN_REFUSED)
            return replace(response, headers=(("Vary", "Origin"),))
        return HttpResponse(204, b"", headers=self._cors(policy) + _PREFLIGHT_HEADERS)

    def _write_response(
        self, response: HttpResponse, keep_alive: bool, *, head: bool = False
    ) -> None:
        """Write one answer; for a ``HEAD`` (``head``) the headers only.

        RFC 9110 9.3.2: a HEAD answer carries the GET answer's headers, its
        ``Content-Length`` included, and never a body: body bytes would be read as
        the start of the next answer on a kept-alive connection.
        """
        if self.transport is None or self.transport.is_closing():
            return
        headers = [f"HTTP/1.1 {response.status} {response.phrase}"]
        if response.status != 204:  # RFC 9110 8.6: no Content-Length on a 204
            headers += [
                f"Content-Type: {response.content_type}",
                f"Content-Length: {len(response.body)}",
            ]
        headers += [
            "Connection: keep-alive" if keep_alive else "Connection: close",
            *(f"{name}: {value}" for name, value in response.headers),
        ]
        body = b"" if head else response.body
        self.transport.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body)

    def _refuse(
        self,
        reason: Reason,
        *,
        app_id: str | None = None,
        retry_after: float | None = None,
        record: bool = True,
    ) -> None:
        """Answer ``reason`` (with ``Retry-After`` when given) and close."""
        if self.refused:
            return
        self.refused = True
        if record:
            self.ctx.refusals.record(reason, app_id=app_id, ip=self.ip)
        response = (
            error_response(reason)
            if retry_after is None
            else rate_limited_response(reason, retry_after)
        )
        self._write_response(response, keep_alive=False, head=self.head_request)
        if self.transport is not None:
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.ctx.loop.call_later(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
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
        url = httptools.parse_url(self.url)
        path = unquote(url.path.decode("latin-1"))
        params = dict(parse_qsl(url.query.decode("latin-1") if url.query else ""))
        key = path[len("/app/") :] if path.startswith("/app/") else None
        if key is None or not key or "/" in key:
            self._refuse(Reason.PATH_NOT_FOUND)
            return
        if self.parser.get_method() != b"GET":
            # RFC 6455 4.1: the opening handshake is a GET.
            self._refuse(Reason.HTTP_METHOD)
            return
        version = self._header("sec-websocket-version")
        if version is not None and version.strip() != "13":
            # RFC 6455 4.4: answer 426 and name the version we speak.
            self.refused = True
            self.ctx.refusals.record(Reason.HTTP_WEBSOCKET_VERSION, ip=self.ip)
            body = error_response(Reason.HTTP_WEBSOCKET_VERSION).body
            self._write_response(
                HttpResponse(426, body, headers=(("Sec-WebSocket-Version", "13"),)),
                keep_alive=False,
            )
            transport.close()
            return
        app = ctx.hub.apps_by_key.get(key)
        if app is not None and not origin_policy(app).allows(self._origin()):
            # Before the upgrade: a foreign page never gets an open socket.
            self.refused = True
            ctx.refusals.record(Reason.HTTP_ORIGIN_REFUSED, app_id=app.id, ip=self.ip)
            self._write_response(error_response(Reason.HTTP_ORIGIN_REFUSED), keep_alive=False)
            transport.close()
            return
        # A blank ``token=`` is dropped by parse_qsl: it carries nothing to refuse.
        token = params.get("token")
        if token is not None and app is not None:
            jwt = app.settings.jwt
            if jwt is None or not jwt.allow_query_token:
                # Before the upgrade, and never logged: the URL holds the token.
                self._refuse(Reason.HTTP_QUERY_TOKEN, app_id=app.id)
                return
            # A token is an authentication attempt: not verified once the budget is spent.
            # A plain upgrade is not one, whatever the budget.
            denial = ctx.auth_budget.refusal(self.ip, time.time())
            if denial is not None:
                self._refuse(denial.reason, app_id=app.id, retry_after=denial.retry_after)
                return
        ip = self.ip or ""
        denial = ctx.admission.admit(ip, time.time())
        if denial is not None:
            self._refuse(
                denial.reason,
                app_id=app.id if app is not None else None,
                retry_after=denial.retry_after,
            )
            return
        # Held by this protocol until the WebSocket takes it over; connection_lost
        # gives it back if the upgrade is refused after this point.
        self.slot = _Slot(ctx.admission, ip)
        handshake = ServerProtocol()
        request = WsRequest(self.url.decode("latin-1"), Headers(self.headers))
        response = handshake.accept(request)
        handshake.send_response(response)
        for chunk in handshake.data_to_send():
            if chunk:
                transport.write(chunk)
        if response.status_code != 101:
            self.refused = True
            ctx.refusals.record(Reason.WEBSOCKET_PROTOCOL, ip=self.ip, detail="bad handshake")
            transport.close()
            return

        # The handshake is done: frames get a protocol object that starts OPEN.
        proto = ServerProtocol(state=State.OPEN, max_size=self._max_frame_size(key))
        reason: Reason | None
        if app is None:
            reason = Reason.UNKNOWN_APP
        elif params.get("protocol", "7") not in _SUPPORTED_PROTOCOLS:
            reason = Reason.UNSUPPORTED_PROTOCOL
        elif ctx.draining:
            reason = Reason.OVER_CAPACITY
        else:
            reason = ctx.hub.admit(app)
        if reason is not None:
            self._close_after_upgrade(proto, reason, app.id if app is not None else None)
            return

        assert app is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        connection = _AdmittedConnection(
            ctx, transport, proto, app, self.ip, query_token=token or None
        )
        slot, self.slot = self.slot, None
        assert slot is not None
        connection.slot = slot
        transport.set_protocol(connection)
        connection.start()
        if rest:
            connection.data_received(rest)

    def _max_frame_size(self, key: str) -> int:
        app = self.ctx.hub.apps_by_key.get(key)
        if app is None:
            return 4096
        settings = app.settings
        # Room for the envelope, auth strings and a sign-in watchlist.
        body = max(settings.max_event_payload_bytes, settings.max_presence_member_bytes, 16384)
        return body + 4096

    def _close_after_upgrade(
        self, proto: ServerProtocol, reason: Reason, app_id: str | None
    ) -> None:
        transport = self.transport
        assert transport is not None
        self.refused = True
        rule = self.ctx.refusals.record(reason, app_id=app_id, ip=self.ip)
        code = rule.close_code or 4000
        transport.write(frame_text(msg.error(rule.message, code)))
        proto.send_close(code, rule.message)
        for chunk in proto.data_to_send():
            if chunk:
                transport.write(chunk)
        transport.close()
