"""What every connection of a node shares: settings, hub, refusal path, registry.

It also holds the node's per-address limits, built once from ``[security]``:
the trusted proxies that name a request's client, the WebSocket admission
(concurrent cap and new-connection bucket per address), the per-address REST
bucket, and the per-address failed-authentication budget, each asked of the
node's :class:`~bastion.security.limits.LimiterFactory` (per node by default,
cluster-wide over Redis with the redis adapter). The budget is spent
by a refusal-path listener, so every door that fails an authentication (REST
signatures, channel auth, sign-ins, tokens, admin tokens) spends it in one place;
each door asks :attr:`ServerContext.auth_budget` before it verifies an attempt.
Addresses in ``[security.reputation] never_block`` are outside the budget.

The context knows the open WebSocket connections only as :class:`Connection`,
what the node's shared parts ask of one, so that the connection's module
(:mod:`bastion.server.websocket`) can depend on this one and not the reverse.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from bastion.config import RateSettings, Settings
from bastion.core.hub import AppState, Hub, Session
from bastion.errors import Refused
from bastion.metrics import Metrics
from bastion.protocol.refusals import Reason
from bastion.security.admission import (
    AUTH_FAILURE_REASONS,
    WEBSOCKET_AUTH_FAILURE_REASONS,
    Admission,
    AuthFailureBudget,
)
from bastion.security.limits import (
    DEFAULT_MAX_KEYS,
    LimiterFactory,
    RateLimiter,
    memory_limiters,
)
from bastion.security.proxies import TrustedProxies
from bastion.security.reconnects import Reconnects
from bastion.server.deadlines import Deadlines
from bastion.server.refusals import RefusalPath, RefusalRecord

if TYPE_CHECKING:
    from bastion.api.http import HttpRequest, HttpResponse
    from bastion.api.ops import Ops
    from bastion.api.rest import RestApi

__all__ = [
    "BlockList",
    "Connection",
    "Door",
    "Outbox",
    "ServerContext",
    "close_frame",
    "frame_text",
]


class Connection(Protocol):
    """An open WebSocket connection (:class:`~bastion.server.websocket.WebSocketConnection`)."""

    @property
    def app(self) -> AppState:
        """The app it connected to."""
        ...

    @property
    def ip(self) -> str | None:
        """The client's address."""
        ...

    @property
    def session(self) -> Session:
        """Its session in the hub (``socket_id``, user, channels)."""
        ...

    def flush_pending(self) -> None:
        """Write what this loop iteration queued for it (the :class:`Outbox`)."""
        ...

    def refuse(self, refused: Refused) -> None:
        """Answer a refusal as the protocol says (an error or a close)."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Close it with ``code``."""
        ...

    def check_liveness(self, now: float, activity_timeout: float, pong_timeout: float) -> None:
        """Ping it when idle, close it when a ping went unanswered."""
        ...


class Door(Protocol):
    """The plain HTTP side of the listener: the route table (:mod:`bastion.api.routes`)."""

    def answer(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        """The answer to ``request``: now, or later."""
        ...


class BlockList(Protocol):
    """Blocked addresses, asked at accept and once a trusted proxy names the client."""

    def check(self, ip: str, now: float) -> bool:
        """Whether ``ip`` is blocked at wall-clock ``now``.

        A ``True`` answer has already been counted (and, throttled, logged and
        audited) as an ``ip_blocked`` refusal: the caller only drops the request.
        """
        ...


def close_frame(code: int, reason: str) -> bytes:
    """A server close frame (RFC 6455 §5.5.1): the code, then the reason (≤ 123 bytes)."""
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    body = code.to_bytes(2, "big") + text
    return bytes((0x88, len(body))) + body


def frame_text(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame carrying UTF-8 ``payload``.

    RFC 6455 §5.2: FIN and the text opcode, then the length in 7 bits, or 126 and
    16 bits, or 127 and 64 bits. Built by hand: it runs for every frame a node
    writes, and the generic frame object costs several times more.
    """
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65_536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


class Outbox:
    """Joins what one loop iteration writes to a connection into one ``send()``.

    A loopback ``send()`` costs several microseconds of kernel time, which is the
    fan-out ceiling (docs/decisions/0003-coalesced-writes.md). Every write to a
    connection is queued on the connection and the outbox flushes each dirty
    connection once, at the end of the iteration, so events that arrive together
    (bursts, concurrent REST calls, batches) cost one syscall per subscriber, and
    per-connection order is kept because every write takes the same path.
    """

    __slots__ = ("_after", "_dirty", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Connection] = []
        self._after: list[Callable[[], None]] = []
        self._scheduled = False

    @property
    def busy(self) -> bool:
        """Whether writes are queued for this iteration."""
        return bool(self._dirty)

    def mark(self, connection: Connection) -> None:
        """``connection`` has queued bytes; flush it at the end of this iteration."""
        self._dirty.append(connection)
        if not self._scheduled:  # (_schedule, inline: once per subscriber in a fan-out)
            self._scheduled = True
            self._loop.call_soon(self._settle)

    def after_flush(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the queued writes are written (REST answers)."""
        self._after.append(callback)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._settle)

    def _settle(self) -> None:
        # Let the loop poll once more (zero timeout: callbacks are ready) before
        # flushing, so requests that arrived meanwhile join this flush.
        self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued byte now, then run the after-flush callbacks."""
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush_pending()
        after, self._after = self._after, []
        for callback in after:
            callback()


@dataclass(eq=False)
class ServerContext:
    """Shared state of one node's listener."""

    settings: Settings
    hub: Hub
    refusals: RefusalPath
    metrics: Metrics
    loop: asyncio.AbstractEventLoop
    rest: RestApi
    outbox: Outbox
    connections: set[Connection] = field(default_factory=set)
    socket_ids: set[str] = field(default_factory=set)
    draining: bool = False
    #: Set by the node when IP reputation / blocks are in use.
    blocklist: BlockList | None = None
    #: ``/metrics`` and ``/readyz``, set by the node (they read more than this context).
    ops: Ops | None = None
    #: Answers plain HTTP requests: the route table, set by the node.
    door: Door | None = None
    #: Builds the per-address limiters (cluster-wide ones with the redis adapter).
    limiters: LimiterFactory = memory_limiters
    #: Recent closes by address and by user: which arrivals are reconnects.
    reconnects: Reconnects = field(default_factory=Reconnects)
    #: Unix seconds, read once per HTTP request or upgrade (``HttpRequest.now``:
    #: the REST signature window, the secrets active then). ``Node(wall_clock=)``.
    wall_clock: Callable[[], float] = time.time
    #: Whose forwarding headers name the client (``security.trusted_proxies``).
    proxies: TrustedProxies = field(init=False)
    #: WebSocket admission per client address (concurrent cap, new-connection bucket).
    admission: Admission = field(init=False)
    #: HTTP requests per client address (``security.rest_requests_per_ip``).
    rest_requests: RateLimiter = field(init=False)
    #: Failed authentications per client address (``security.auth_failures_per_ip``).
    auth_failures: RateLimiter = field(init=False)
    #: The same buckets with the ``never_block`` exemption: what every door asks.
    auth_budget: AuthFailureBudget = field(init=False)
    #: Every connection's handshake, keep-alive and close-grace deadline.
    deadlines: Deadlines = field(init=False)
    #: Socket ids with an ``auth_failure_limit`` close already scheduled.
    _lockouts: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        security = self.settings.security
        self.deadlines = Deadlines(self.loop)
        self.proxies = TrustedProxies(security.trusted_proxies, security.forwarded_header)
        self.auth_failures = self._limiter("auth_fail_ip", security.auth_failures_per_ip)
        self.auth_budget = AuthFailureBudget(self.auth_failures, security.reputation.never_block)
        self.rest_requests = self._limiter("rest_ip", security.rest_requests_per_ip)
        self.admission = Admission(
            max_connections_per_ip=security.max_connections_per_ip,
            new_connections=self._limiter("new_conn_ip", security.new_connections_per_ip),
        )
        self.refusals.listeners.append(self._spend_auth_failure)

    def _limiter(self, name: str, settings: RateSettings) -> RateLimiter:
        """A per-address limiter (its callers pass ``time.time()`` as ``now``)."""
        return self.limiters(name, settings.rate, settings.burst, DEFAULT_MAX_KEYS, time.time)

    def _spend_auth_failure(self, record: RefusalRecord) -> None:
        """Refusal listener: a failed authentication spends a token of its address."""
        if record.reason not in AUTH_FAILURE_REASONS or record.ip is None:
            return
        already_spent = self.auth_budget.spend(record.ip, time.time())
        socket_id = record.socket_id
        if (
            already_spent
            and socket_id is not None
            and record.reason in WEBSOCKET_AUTH_FAILURE_REASONS
            and socket_id not in self._lockouts
        ):
            # The budget was already spent: this connection goes. Not from here: the
            # listener runs inside the connection's own refusal, mid-message.
            self._lockouts.add(socket_id)
            self.loop.call_soon(self._lock_out, socket_id)

    def _lock_out(self, socket_id: str) -> None:
        self._lockouts.discard(socket_id)
        for connection in self.connections:
            if connection.session.socket_id == socket_id:
                connection.refuse(Refused(Reason.AUTH_FAILURE_LIMIT))
                return

    def apply_settings(self, settings: Settings) -> None:
        """Live reload (:mod:`bastion.server.reload`): take ``settings`` from now on.

        The per-address limiters whose ``[security]`` settings changed are rebuilt
        (their buckets start full); the concurrent connections each address holds
        are kept, under the new cap.
        """
        old, new = self.settings.security, settings.security
        if (old.trusted_proxies, old.forwarded_header) != (
            new.trusted_proxies,
            new.forwarded_header,
        ):
            self.proxies = TrustedProxies(new.trusted_proxies, new.forwarded_header)
        if old.auth_failures_per_ip != new.auth_failures_per_ip:
            self.auth_failures = self._limiter("auth_fail_ip", new.auth_failures_per_ip)
        if self.auth_budget.limiter is not self.auth_failures or (
            old.reputation.never_block != new.reputation.never_block
        ):
            self.auth_budget = AuthFailureBudget(self.auth_failures, new.reputation.never_block)
        if old.rest_requests_per_ip != new.rest_requests_per_ip:
            self.rest_requests = self._limiter("rest_ip", new.rest_requests_per_ip)
        if old.new_connections_per_ip != new.new_connections_per_ip:
            self.admission.new_connections = self._limiter(
                "new_conn_ip", new.new_connections_per_ip
            )
        self.admission.connections.limit = new.max_connections_per_ip
        self.settings = settings
