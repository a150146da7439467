"""Connection admission and the failed-authentication budget, per address.

:class:`Admission`: may this address open one more WebSocket now? Checked before
the upgrade (so a refused client gets an HTTP 429 and never an open socket), in
this order:

1. the address's concurrent connections, against ``max_connections_per_ip``
   (``ip_connection_limit``): nothing is spent, a slot frees when one closes;
2. its new-connection bucket, ``new_connections_per_ip`` (``connection_rate``):
   every attempt past the cap check spends a token, refused or not later.

An admitted connection holds a slot until :meth:`Admission.release` is called
for it, exactly once, when it ends.

:class:`AuthFailureBudget`: ``auth_failures_per_ip``. Each failed authentication
(:data:`AUTH_FAILURE_REASONS`) spends a token of its address; once the budget is
spent, further *authentication attempts* from the address are refused
(``auth_failure_limit``) before anything is verified: signed REST calls, channel
auth and sign-ins on a WebSocket, tokens (``?token=`` included), admin bearer
tokens. A plain connection or a public subscription is not an authentication
attempt and is never refused by it, so one guessing client behind a NAT does not
lock out its neighbours. Addresses in ``[security.reputation] never_block``
(loopback by default) neither spend nor are refused, as they are never scored.

Pure: addresses and ``now`` in, a decision out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bastion.protocol.refusals import Reason
from bastion.security.limits import RateLimiter
from bastion.security.proxies import parse_ip, parse_networks

__all__ = [
    "AUTH_FAILURE_REASONS",
    "CONNECTION_CAP_RETRY_SECONDS",
    "EXEMPT_REMEMBERED",
    "WEBSOCKET_AUTH_FAILURE_REASONS",
    "Admission",
    "AuthFailureBudget",
    "ConnectionCounter",
    "Denial",
]

#: Distinct addresses an :class:`AuthFailureBudget` remembers the exemption of.
EXEMPT_REMEMBERED = 4096

#: Retry-After for a full per-address cap: no refill time exists, a slot frees
#: whenever one of the address's connections closes. A few seconds spares the node
#: a tight retry loop.
CONNECTION_CAP_RETRY_SECONDS = 5.0

#: Failed authentications on a WebSocket: a guess at a secret, a signature or a
#: token. A missing auth is a client bug, not a guess, and does not count.
WEBSOCKET_AUTH_FAILURE_REASONS = frozenset(
    {Reason.SUBSCRIBE_AUTH_INVALID, Reason.SIGNIN_INVALID, Reason.SIGNIN_TOKEN_INVALID}
)

#: Every refusal that spends a token of the address's ``auth_failures_per_ip``.
AUTH_FAILURE_REASONS = WEBSOCKET_AUTH_FAILURE_REASONS | frozenset(
    {
        Reason.HTTP_AUTH_MISSING,
        Reason.HTTP_AUTH_VERSION,
        Reason.HTTP_AUTH_KEY,
        Reason.HTTP_TIMESTAMP,
        Reason.HTTP_BODY_MD5,
        Reason.HTTP_SIGNATURE,
        Reason.HTTP_REPLAYED,
        Reason.ADMIN_UNAUTHORIZED,
    }
)


@dataclass(frozen=True, slots=True)
class Denial:
    """A refused request: why, and the seconds after which trying again may work."""

    reason: Reason
    retry_after: float


class ConnectionCounter:
    """Concurrent connections per address, capped.

    Memory holds only addresses with an open connection.

    Args:
        limit: the most connections one address may hold (>= 1).
    """

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        """Addresses holding at least one connection."""
        return len(self._counts)

    def count(self, ip: str) -> int:
        """Connections ``ip`` holds now."""
        return self._counts.get(ip, 0)

    def full(self, ip: str) -> bool:
        """Whether ``ip`` holds its limit already."""
        return self._counts.get(ip, 0) >= self.limit

    def acquire(self, ip: str) -> bool:
        """Take a slot for ``ip``; ``False`` (nothing taken) when it holds its limit."""
        count = self._counts.get(ip, 0)
        if count >= self.limit:
            return False
        self._counts[ip] = count + 1
        return True

    def release(self, ip: str) -> None:
        """Give back one slot of ``ip`` (a release without an acquire is ignored)."""
        count = self._counts.get(ip, 0)
        if count <= 1:
            self._counts.pop(ip, None)
        else:
            self._counts[ip] = count - 1


class Admission:
    """Decides whether an address may open one more WebSocket connection.

    Args:
        max_connections_per_ip: concurrent connections one address may hold.
        new_connections: the per-address new-connection buckets.
    """

    __slots__ = ("connections", "new_connections")

    def __init__(self, *, max_connections_per_ip: int, new_connections: RateLimiter) -> None:
        self.connections = ConnectionCounter(max_connections_per_ip)
        self.new_connections = new_connections

    def admit(self, ip: str, now: float) -> Denial | None:
        """Admit one connection from ``ip`` at ``now``.

        Returns:
            ``None`` when admitted: a slot is now held, and :meth:`release` must be
            called once when the connection ends. Otherwise the :class:`Denial`;
            nothing is held.
        """
        if self.connections.full(ip):
            return Denial(Reason.HTTP_IP_CONNECTIONS, CONNECTION_CAP_RETRY_SECONDS)
        wait = self.new_connections.take(ip, now)
        if wait > 0:
            return Denial(Reason.HTTP_CONNECTION_RATE, wait)
        self.connections.acquire(ip)
        return None

    def release(self, ip: str) -> None:
        """An admitted connection of ``ip`` ended."""
        self.connections.release(ip)


class AuthFailureBudget:
    """The failed-authentication budget of each address (``auth_failures_per_ip``).

    Args:
        limiter: the per-address buckets (one token per failed authentication).
        exempt: CIDRs that neither spend nor are refused (``never_block``).
    """

    __slots__ = ("_exempt_seen", "exempt", "limiter")

    def __init__(self, limiter: RateLimiter, exempt: Sequence[str] = ()) -> None:
        self.limiter = limiter
        self.exempt = parse_networks(exempt)
        #: Each address's answer, remembered: asked on every signed REST call, and
        #: parsing an address costs more than the rest of the check.
        self._exempt_seen: dict[str, bool] = {}

    def is_exempt(self, ip: str | None) -> bool:
        """Whether ``ip`` is outside the budget (no address at all is not exempt)."""
        if not ip:
            return False
        exempt = self._exempt_seen.get(ip)
        if exempt is None:
            address = parse_ip(ip)
            exempt = address is not None and any(address in net for net in self.exempt)
            if len(self._exempt_seen) >= EXEMPT_REMEMBERED:
                self._exempt_seen.clear()
            self._exempt_seen[ip] = exempt
        return exempt

    def refusal(self, ip: str | None, now: float) -> Denial | None:
        """Whether an authentication attempt from ``ip`` is refused at ``now``.

        Returns:
            ``None`` when it may be verified; otherwise the ``auth_failure_limit``
            :class:`Denial` with the seconds until one failure's token refills.
            Nothing is spent either way.
        """
        if self.is_exempt(ip):
            return None
        wait = self.limiter.peek(ip or "", now)
        return Denial(Reason.AUTH_FAILURE_LIMIT, wait) if wait > 0 else None

    def spend(self, ip: str | None, now: float) -> bool:
        """A failed authentication from ``ip`` at ``now`` spends one token.

        Returns:
            ``True`` when the budget was already spent (the failure came on top of
            it: a WebSocket that fails then is closed); ``False`` otherwise, and
            always for an exempt address, which spends nothing.
        """
        if ip is None or self.is_exempt(ip):
            return False
        return self.limiter.take(ip, now) > 0
