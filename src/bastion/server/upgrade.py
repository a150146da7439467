"""The WebSocket upgrade's gates: every check an upgrade passes, in order, as data.

Before the ``101`` (:data:`BEFORE_101`), each gate answers ``None`` or a
:class:`~bastion.api.http.Refusal`; the listener (:mod:`bastion.server.http`)
records the first refusal on the refusal path, answers it over HTTP and closes,
so a refused client never gets an open socket:

=================  ========================================================  =====================
gate               refuses                                                   answer
=================  ========================================================  =====================
app_path           a path that is not ``/app/{key}``                         404 path_not_found
opening_get        another method (RFC 6455 4.1: the handshake is a GET)     405 method_not_allowed
websocket_version  ``Sec-WebSocket-Version`` other than 13 (RFC 6455 4.4)    426 + the version
origin             a foreign Origin for an app with ``allowed_origins``      403 origin_refused
query_token        ``?token=`` unless the app's ``jwt.allow_query_token``    400 query_token_refused
token_budget       ``?token=`` from an address whose auth budget is spent    429 auth_failure_limit
admission          the address's concurrent cap, then its new-connection     429 ip_connection_limit
                   bucket (an admitted upgrade holds one slot: :class:`Slot`)    / connection_rate
=================  ========================================================  =====================

Every 429 carries ``Retry-After``. A plain upgrade is not an authentication
attempt: only one carrying a token meets the budget. The handshake itself
(headers, key) is then checked by :func:`bastion.protocol.handshake.check_handshake`,
whose answer is written: the ``101``, or 426 / 400 recorded as ``websocket_protocol``.
After it (:data:`AFTER_101`), a refusal is a Pusher close with its code: an
unknown app key (4001), an unsupported ``protocol`` (4007), a draining node (4100),
then the hub's own admission (connection caps, 4004 / 4100).

The blocklist answers before any of these: a blocked TCP peer is dropped at
accept, and an address a trusted proxy names that is blocked gets 403
``ip_blocked`` once the request head is complete (for every request).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, Protocol
from urllib.parse import parse_qsl, unquote

import httptools

from bastion.api.cors import origin_policy
from bastion.api.http import HttpRequest, Refusal
from bastion.core.hub import AppState
from bastion.protocol import messages as msg
from bastion.protocol.refusals import Reason, Rule
from bastion.security.admission import Admission, AuthFailureBudget
from bastion.server.context import ServerContext, close_frame, frame_text
from bastion.server.websocket import WebSocketConnection

__all__ = [
    "AFTER_101",
    "BEFORE_101",
    "AdmittedConnection",
    "Slot",
    "Upgrade",
    "UpgradeLimits",
    "close_after_101",
    "max_frame_size",
    "read_upgrade",
]

#: The ``protocol`` query values a Pusher client may ask for.
_SUPPORTED_PROTOCOLS = frozenset({"5", "6", "7"})
_VERSION_13 = (("Sec-WebSocket-Version", "13"),)
_APP = "/app/"


class Upgrade(NamedTuple):
    """An upgrade request as its gates read it (immutable; made for every upgrade).

    Attributes:
        request: the request (method, headers, client address, ``now``).
        key: the app key of ``/app/{key}``; ``None`` for any other path.
        app: the app with that key, if any.
        params: the query's parameters (the last of a repeated one).
    """

    request: HttpRequest
    key: str | None
    app: AppState | None
    params: Mapping[str, str]

    @property
    def app_id(self) -> str | None:
        """The app's id, if the key names one."""
        return self.app.id if self.app is not None else None


def read_upgrade(
    ctx: ServerContext,
    url: bytes,
    method: str,
    headers: Sequence[tuple[str, str]],
    ip: str | None,
    now: float,
) -> Upgrade:
    """The upgrade request for ``url`` (the request target as received)."""
    if len(url) <= _REMEMBERED_LENGTH and b"token" not in url:
        path, key, params = _remembered_target(url)
    else:
        path, key, params = _target(url)
    return Upgrade(
        HttpRequest(method=method, path=path, headers=headers, ip=ip, now=now),
        key,
        ctx.hub.apps_by_key.get(key) if key is not None else None,
        params,
    )


_NO_QUERY: Mapping[str, str] = MappingProxyType({})


def _target(url: bytes) -> tuple[str, str | None, Mapping[str, str]]:
    """The path as received, the app key it names (if it is ``/app/{key}``), the query."""
    parsed = httptools.parse_url(url)
    path = parsed.path.decode("latin-1")
    target = unquote(path)
    key: str | None = target[len(_APP) :] if target.startswith(_APP) else None
    if not key or "/" in key:
        key = None
    query = parsed.query.decode("latin-1") if parsed.query else ""
    return path, key, MappingProxyType(dict(parse_qsl(query))) if query else _NO_QUERY


#: pusher-js sends one target per app and library version
#: ("/app/KEY?protocol=7&client=js&version=…"), so the parsed form of short ones is
#: remembered (boundedly, and read-only since shared); one carrying a token is
#: never kept. (A malformed one raises, and is not remembered either.)
_remembered_target = functools.lru_cache(maxsize=256)(_target)
_REMEMBERED_LENGTH = 160


class UpgradeLimits(Protocol):
    """The per-address limits the gates ask (a :class:`~bastion.server.context.ServerContext`)."""

    @property
    def auth_budget(self) -> AuthFailureBudget:
        """``security.auth_failures_per_ip`` with the ``never_block`` exemption."""
        ...

    @property
    def admission(self) -> Admission:
        """The per-address concurrent cap and new-connection bucket."""
        ...


#: A check before the 101.
UpgradeGate = Callable[[Upgrade, UpgradeLimits], Refusal | None]
#: A check after the 101: the reason to close with, or ``None``.
AfterGate = Callable[[Upgrade, ServerContext], Reason | None]


def app_path(upgrade: Upgrade, limits: UpgradeLimits) -> Refusal | None:
    """``/app/{key}``, the key non-empty and without ``/``."""
    return Refusal(Reason.PATH_NOT_FOUND) if upgrade.key is None else None


def opening_get(upgrade: Upgrade, limits: UpgradeLimits) -> Refusal | None:
    """RFC 6455 4.1: the opening handshake is a GET."""
    return Refusal(Reason.HTTP_METHOD) if upgrade.request.method != "GET" else None


def websocket_version(upgrade: Upgrade, limits: UpgradeLimits) -> Refusal | None:
    """RFC 6455 4.4: another version is answered 426, naming the one we speak."""
    versions = upgrade.request.values("sec-websocket-version")
    if versions and versions[0].strip() != "13":
        return Refusal(Reason.HTTP_WEBSOCKET_VERSION, headers=_VERSION_13)
    return None


def origin(upgrade: Upgrade, limits: UpgradeLimits) -> Refusal | None:
    """The app's ``allowed_origins``: a foreign page never gets an open socket."""
    app = upgrade.app
    if app is None or app.settings.allowed_origins is None:  # (no list: any origin)
        return None
    if not origin_policy(app).allows(upgrade.request.origin()):
        return Refusal(Reason.HTTP_ORIGIN_REFUSED, app_id=app.id)
    return None


def query_token(upgrade: Upgrade, limits: UpgradeLimits) -> Refusal | None:
    """A token in the URL only for an app that allows it (never logged: the URL holds it)."""
    app = upgrade.app
    # A blank ``token=`` is dropped by parse_qsl: it carries nothing to refuse.
    if app is None or "token" not in upgrade.params:
        return None
    jwt = app.settings.jwt
    if jwt is None or not jwt.allow_query_token:
        return Refusal(Reason.HTTP_QUERY_TOKEN, app_id=app.id)
    return None


def token_budget(upgrade: Upgrade, limits: UpgradeLimits) -> Refusal | None:
    """A token is an authentication attempt: not verified once the budget is spent."""
    if upgrade.app is None or "token" not in upgrade.params:
        return None
    request = upgrade.request
    denial = limits.auth_budget.refusal(request.ip, request.now)
    if denial is None:
        return None
    return Refusal(denial.reason, retry_after=denial.retry_after, app_id=upgrade.app_id)


def admission(upgrade: Upgrade, limits: UpgradeLimits) -> Refusal | None:
    """The address's cap and bucket; admitted, it holds a slot (see :class:`Slot`)."""
    request = upgrade.request
    denial = limits.admission.admit(request.ip or "", request.now)
    if denial is None:
        return None
    return Refusal(denial.reason, retry_after=denial.retry_after, app_id=upgrade.app_id)


BEFORE_101: tuple[UpgradeGate, ...] = (
    app_path,
    opening_get,
    websocket_version,
    origin,
    query_token,
    token_budget,
    admission,
)


def known_app(upgrade: Upgrade, ctx: ServerContext) -> Reason | None:
    """The key names an app (4001 ``unknown_app``)."""
    return Reason.UNKNOWN_APP if upgrade.app is None else None


def protocol_version(upgrade: Upgrade, ctx: ServerContext) -> Reason | None:
    """Pusher protocol 5 to 7 (4007 ``unsupported_protocol``)."""
    supported = upgrade.params.get("protocol", "7") in _SUPPORTED_PROTOCOLS
    return None if supported else Reason.UNSUPPORTED_PROTOCOL


def serving(upgrade: Upgrade, ctx: ServerContext) -> Reason | None:
    """Not draining (4100 ``over_capacity``: reconnect elsewhere)."""
    return Reason.OVER_CAPACITY if ctx.draining else None


def hub_admission(upgrade: Upgrade, ctx: ServerContext) -> Reason | None:
    """The app's and the node's connection caps (the hub counts an admitted one)."""
    assert upgrade.app is not None  # known_app ran first
    return ctx.hub.admit(upgrade.app)


AFTER_101: tuple[AfterGate, ...] = (known_app, protocol_version, serving, hub_admission)


def max_frame_size(app: AppState | None) -> int:
    """The largest frame a connection to ``app`` may send."""
    if app is None:
        return 4096
    settings = app.settings
    # Room for the envelope, auth strings and a sign-in watchlist.
    body = max(settings.max_event_payload_bytes, settings.max_presence_member_bytes, 16384)
    return body + 4096


class Slot:
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


class AdmittedConnection(WebSocketConnection):
    """A WebSocket connection that gives its address's slot back when its TCP ends.

    ``connection_lost`` is the one call the transport always makes, exactly once,
    to whichever protocol owns it then: a clean close, a timeout, an abort or the
    peer vanishing all end there.
    """

    __slots__ = ("slot",)

    slot: Slot

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection, then release its slot (even if forgetting failed)."""
        try:
            super().connection_lost(exc)
        finally:
            self.slot.release()


def close_after_101(transport: asyncio.Transport, rule: Rule, response: bytes) -> None:
    """Refuse an upgraded connection: the ``101`` (``response``), ``pusher:error``, the close."""
    code = rule.close_code or 4000
    error = frame_text(msg.error(rule.message, code))
    transport.write(response + error + close_frame(code, rule.message))
    transport.close()
