"""Gates: the small checks a route is composed of, each with one job.

A gate is called with the request and what its route matched, and answers
``None`` to let the request through or a :class:`~bastion.api.http.Refusal` to
stop it there. It never writes an answer or records anything itself: the front
door (:class:`bastion.api.routes.FrontDoor`) records the refusal once on the
refusal path and writes its answer, so every refusal keeps one slug, one status
and one set of headers wherever it is used. Gates are built once per node (per
live reload of ``[metrics]`` or ``[admin]``), never per request, and read the
node's current limits through :class:`EdgeLimits` at call time, so a reload that
rebuilds a bucket is seen at the next request.

The gates:

* :class:`AddressBucket`: spends a token of the client address's
  ``rest_requests_per_ip`` (429 ``ip_rate_limited``).
* :class:`AuthBudget`: the address's failed-authentication budget
  (:class:`~bastion.security.admission.AuthFailureBudget`), asked before an
  authentication attempt is verified (429 ``auth_failure_limit``).
* :class:`BearerToken`: exactly one ``Authorization: Bearer <token>`` header with
  the configured token, compared in constant time; used by ``/metrics`` and the
  admin API alike.
* :class:`AllowedPeers`: the operator address is inside an ``allow_from`` list.
* :class:`AllowedHost`: the ``Host`` header names this server
  (:class:`~bastion.security.hosts.HostPolicy`, the DNS-rebinding guard; 403
  ``host_not_allowed``).
* :class:`Methods`: the method is one of a set (405 with ``Allow``).
* :class:`Either`: two chains of gates, the request passes when one does.

Cheap by design, because the REST routes are hot: a gate is a bound attribute
or two and a dict lookup; an address is parsed at most once per distinct string
(:class:`AllowedPeers` remembers its answers, bounded).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from pydantic import SecretStr

from bastion.api.http import Headers, HttpRequest, Refusal
from bastion.protocol.refusals import Reason
from bastion.security.admission import AuthFailureBudget
from bastion.security.limits import RateLimiter
from bastion.security.proxies import parse_ip, parse_networks
from bastion.server.refusals import RefusalPath

if TYPE_CHECKING:
    from bastion.core.hub import AppState
    from bastion.security.hosts import HostPolicy

__all__ = [
    "MATCHED",
    "AddressBucket",
    "AllowedHost",
    "AllowedPeers",
    "AuthBudget",
    "BearerToken",
    "EdgeLimits",
    "Either",
    "Gate",
    "Match",
    "Methods",
]

#: Distinct addresses an :class:`AllowedPeers` remembers its answer for.
_REMEMBERED = 4096


class EdgeLimits(Protocol):
    """The node's per-address limits and refusal path (its server context).

    Read at each call: a live reload replaces the limiters.
    """

    @property
    def rest_requests(self) -> RateLimiter:
        """``security.rest_requests_per_ip``."""
        ...

    @property
    def auth_budget(self) -> AuthFailureBudget:
        """``security.auth_failures_per_ip`` with the ``never_block`` exemption."""
        ...

    @property
    def refusals(self) -> RefusalPath:
        """The one refusal path."""
        ...


@dataclass(frozen=True, slots=True)
class Match:
    """What a route matched: the app its path names, if any (refusals count against it)."""

    app: AppState | None = None

    @property
    def app_id(self) -> str | None:
        """The matched app's id."""
        return self.app.id if self.app is not None else None


#: A match that names no app.
MATCHED = Match()


class Gate(Protocol):
    """One check of a route."""

    @property
    def name(self) -> str:
        """A short name, as docs/decisions/0015-front-door.md lists the gates."""
        ...

    def __call__(self, request: HttpRequest, match: Match) -> Refusal | None:
        """``None``: go on; otherwise why the request is refused."""
        ...


class AddressBucket:
    """Spends a token of the client address's ``rest_requests_per_ip`` bucket.

    Placed first on the app routes, before any HMAC work, so a flood costs a dict
    lookup per request.
    """

    __slots__ = ("limits",)
    name: ClassVar[str] = "address bucket"

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits

    def __call__(self, request: HttpRequest, match: Match) -> Refusal | None:
        """Refuse with ``ip_rate_limited`` once the address's bucket is empty."""
        wait = self.limits.rest_requests.take(request.ip or "", request.now)
        if wait > 0:
            return Refusal(Reason.HTTP_IP_RATE, retry_after=wait, app_id=match.app_id)
        return None


class AuthBudget:
    """Refuses an authentication attempt from an address whose budget is spent.

    Even a correct credential waits: the budget stops guessing, not mistakes.
    Nothing is spent here; failed authentications spend it on the refusal path.
    """

    __slots__ = ("limits",)
    name: ClassVar[str] = "auth budget"

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits

    def __call__(self, request: HttpRequest, match: Match) -> Refusal | None:
        """Refuse with ``auth_failure_limit`` (and its ``Retry-After``) while spent."""
        denial = self.limits.auth_budget.refusal(request.ip, request.now)
        if denial is None:
            return None
        return Refusal(denial.reason, retry_after=denial.retry_after, app_id=match.app_id)


class BearerToken:
    """Requires exactly one ``Authorization: Bearer <token>`` carrying the token.

    Args:
        token: the configured token (``None``: nothing is ever accepted).
        reason: the refusal for a missing or wrong token.
        headers: headers of that refusal (a ``WWW-Authenticate`` challenge).
    """

    __slots__ = ("headers", "reason", "token")
    name: ClassVar[str] = "bearer token"

    def __init__(self, token: SecretStr | None, reason: Reason, headers: Headers = ()) -> None:
        # Bytes once: compare_digest refuses non-ASCII str, and a header may carry any.
        self.token = token.get_secret_value().encode("utf-8") if token is not None else None
        self.reason = reason
        self.headers = headers

    @property
    def configured(self) -> bool:
        """Whether a token is set at all."""
        return self.token is not None

    def valid(self, authorization: Sequence[str]) -> bool:
        """Whether these ``Authorization`` values are exactly one bearer of the token.

        More than one header is refused as an ambiguous request.
        """
        token = self.token
        if token is None or len(authorization) != 1:
            return False
        scheme, _, credentials = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode("utf-8"), token)

    def __call__(self, request: HttpRequest, match: Match) -> Refusal | None:
        """Refuse a request without the token."""
        if self.valid(request.values("authorization")):
            return None
        return Refusal(self.reason, headers=self.headers)


class AllowedPeers:
    """Requires the operator address to be inside ``allow_from``.

    Args:
        allow_from: CIDRs (a bare address is one host).
        reason: the refusal for any other address, or none at all.
        headers: headers of that refusal.
    """

    __slots__ = ("_seen", "headers", "networks", "reason")
    name: ClassVar[str] = "allowed peers"

    def __init__(self, allow_from: Iterable[str], reason: Reason, headers: Headers = ()) -> None:
        self.networks = parse_networks(allow_from)
        self.reason = reason
        self.headers = headers
        self._seen: dict[str | None, bool] = {}

    def allows(self, address: str | None) -> bool:
        """Whether ``address`` (``None``: no address) is inside the list."""
        allowed = self._seen.get(address)
        if allowed is None:
            parsed = parse_ip(address) if address else None
            allowed = parsed is not None and any(parsed in net for net in self.networks)
            if len(self._seen) >= _REMEMBERED:
                self._seen.clear()
            self._seen[address] = allowed
        return allowed

    def __call__(self, request: HttpRequest, match: Match) -> Refusal | None:
        """Refuse a request whose operator address is outside the list."""
        if self.allows(request.operator_ip):
            return None
        return Refusal(self.reason, headers=self.headers)


class AllowedHost:
    """Requires a ``Host`` header that names this server (``host_not_allowed``)."""

    __slots__ = ("hosts",)
    name: ClassVar[str] = "allowed host"

    def __init__(self, hosts: HostPolicy) -> None:
        self.hosts = hosts

    def __call__(self, request: HttpRequest, match: Match) -> Refusal | None:
        """Refuse a request for another name (DNS rebinding), or with several Hosts."""
        if self.hosts.allows(request.values("host")):
            return None
        return Refusal(Reason.HOST_NOT_ALLOWED)


class Methods:
    """Requires one of ``methods``; anything else is 405 with ``Allow``."""

    __slots__ = ("allowed", "methods")
    name: ClassVar[str] = "method"

    def __init__(self, *methods: str) -> None:
        self.methods = frozenset(methods)
        self.allowed: Headers = (("Allow", ", ".join(methods)),)

    def __call__(self, request: HttpRequest, match: Match) -> Refusal | None:
        """Refuse another method."""
        if request.method in self.methods:
            return None
        return Refusal(Reason.HTTP_METHOD, headers=self.allowed)


class Either:
    """Passes when either chain of gates passes; refused, with the first chain's refusal.

    Args:
        first: tried first; its refusal is the answer when both refuse.
        second: tried when ``first`` refuses.
    """

    __slots__ = ("first", "second")

    def __init__(self, first: Sequence[Gate], second: Sequence[Gate]) -> None:
        self.first = tuple(first)
        self.second = tuple(second)

    @property
    def name(self) -> str:
        """``(a + b) or (c)``."""
        return " or ".join(
            "(" + " + ".join(gate.name for gate in chain) + ")"
            for chain in (self.first, self.second)
        )

    def __call__(self, request: HttpRequest, match: Match) -> Refusal | None:
        """Run ``first``, then ``second`` if it refused."""
        refusal = _run(self.first, request, match)
        if refusal is None or _run(self.second, request, match) is None:
            return None
        return refusal


def _run(gates: Sequence[Gate], request: HttpRequest, match: Match) -> Refusal | None:
    for gate in gates:
        refusal = gate(request, match)
        if refusal is not None:
            return refusal
    return None
