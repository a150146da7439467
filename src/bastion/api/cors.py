"""CORS on the app REST routes, from each app's ``allowed_origins``.

An app with the list answers its REST routes (``/apps/{id}/...``) with
``Access-Control-Allow-Origin`` for an allowed origin (and ``Vary: Origin``
always), and ``OPTIONS`` preflights with 204, or 403 ``origin_refused`` for a
foreign origin (:class:`CorsPreflight`, a gate). An app without the list gets no
CORS headers at all, and its preflights an empty 204. The same policy refuses a
foreign Origin's WebSocket handshake (:mod:`bastion.server.upgrade`).

Each app's :class:`~bastion.security.origins.OriginPolicy` is built once
(:func:`origin_policy`) and rebuilt only when the app's settings object changes
(a live reload).
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable
from dataclasses import replace
from typing import ClassVar

from bastion.api.gates import Match
from bastion.api.http import Answer, Headers, HttpRequest, HttpResponse, Refusal
from bastion.config import AppSettings
from bastion.core.hub import AppState
from bastion.protocol.refusals import Reason
from bastion.security.origins import OriginPolicy

__all__ = [
    "PREFLIGHT_HEADERS",
    "CorsPreflight",
    "cors_headers",
    "origin_policy",
    "preflight",
    "with_cors",
]

PREFLIGHT_HEADERS: Headers = (
    ("Access-Control-Allow-Methods", "GET, POST"),
    ("Access-Control-Allow-Headers", "Content-Type"),
    ("Access-Control-Max-Age", "600"),
)
_VARY: Headers = (("Vary", "Origin"),)

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


def cors_headers(policy: OriginPolicy, origin: str | None) -> Headers:
    """CORS headers for a restricted app's answer: the origin only if allowed."""
    if origin is not None and policy.allows_cors(origin):
        return (("Access-Control-Allow-Origin", origin), *_VARY)
    # The answer still depends on Origin, for any cache in between.
    return _VARY


def with_cors(answer: Answer, request: HttpRequest, app: AppState | None) -> Answer:
    """``answer`` with the app's CORS headers (none when the app sets no list)."""
    if app is None:
        return answer
    policy = origin_policy(app)
    if not policy.restricted:
        return answer
    cors = cors_headers(policy, request.origin())
    if isinstance(answer, HttpResponse):
        return replace(answer, headers=answer.headers + cors)
    return _later(answer, cors)


async def _later(pending: Awaitable[HttpResponse], cors: Headers) -> HttpResponse:
    answered = await pending
    return replace(answered, headers=answered.headers + cors)


class CorsPreflight:
    """Refuses the preflight of a foreign origin for an app with ``allowed_origins``."""

    __slots__ = ()
    name: ClassVar[str] = "cors preflight"

    def __call__(self, request: HttpRequest, match: Match) -> Refusal | None:
        """403 ``origin_refused`` (with ``Vary: Origin``) for an origin not on the list."""
        app = match.app
        if app is None:
            return None
        policy = origin_policy(app)
        origin = request.origin()
        if not policy.restricted or origin is None or policy.allows_cors(origin):
            return None
        return Refusal(Reason.HTTP_ORIGIN_REFUSED, headers=_VARY, app_id=app.id)


def preflight(request: HttpRequest, match: Match) -> HttpResponse:
    """Answer a CORS preflight that :class:`CorsPreflight` let through (204)."""
    app = match.app
    policy = origin_policy(app) if app is not None else None
    if policy is None or not policy.restricted:
        return HttpResponse(204, b"")
    origin = request.origin()
    if origin is None:
        # Not a CORS preflight (browsers always send Origin): nothing to allow.
        return HttpResponse(204, b"", headers=_VARY)
    return HttpResponse(204, b"", headers=cors_headers(policy, origin) + PREFLIGHT_HEADERS)
