"""The front door: an ordered table of routes, each a matcher, its gates and a handler.

The listener (:mod:`bastion.server.http`) hands every complete plain HTTP request
to :meth:`FrontDoor.answer`. The first route whose matcher accepts the request
owns it: its gates (:mod:`bastion.api.gates`) run in order, the first refusal is
the answer, and a request every gate lets through goes to the handler. The order
is data, built once per node by :func:`front_door` (and again when a live reload
changes ``[metrics]`` or ``[admin]``)::

    route      matches                           gates                            handler
    ---------  --------------------------------  -------------------------------  ---------------
    health     / /up /healthz                    -                                200 OK
    readiness  /readyz                           method GET                       Ops.readiness
    metrics    /metrics ([metrics] enabled)      (allowed peers + allowed host)   Ops.exposition
                                                 or (bearer token); method GET
    admin      /api/security[/...] (token set)   allowed peers, allowed host,     AdminApi.handle
                                                 auth budget, bearer token
    dashboard  /dashboard pages, to allow_from   allowed host, method GET|HEAD    the page
    addon      /bastion/recovery.js              address bucket, method GET|HEAD  the add-on
    preflight  OPTIONS /apps/{known id}/...      address bucket, cors preflight   204
    app        /apps/{id}/...                    address bucket, auth budget      RestApi, CORS
    fallback   anything else                     address bucket                   RestApi (404)

On the four operator routes (readiness to dashboard) a refusal spends the
address's ``rest_requests_per_ip`` token first (each refusal is logged, so
without the bucket a stranger could flood the log through an unlimited path),
and is 429 ``ip_rate_limited`` instead once the bucket is empty; a request the
gates let through spends nothing, so a probe, an allowed scraper or an
authorised operator is never limited. The admin route's refusals (and an
internal error) carry ``Cache-Control: no-store``, the dashboard's its security
headers.

A route that is off is not in the table: disabled metrics and a disabled admin
API fall through to the fallback's 404 like any unknown path, and so does the
dashboard for an address outside ``[admin] allow_from``. docs/decisions/0015-front-door.md
has the same table, and a test holds the two together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from bastion.api.addon import ADDON_PATH, addon_response
from bastion.api.addon import METHODS as ADDON_METHODS
from bastion.api.admin import ADMIN_PREFIX, AdminApi
from bastion.api.cors import CorsPreflight, preflight, with_cors
from bastion.api.dashboard import METHODS as DASHBOARD_METHODS
from bastion.api.dashboard import SECURITY_HEADERS, dashboard_response, is_dashboard_path
from bastion.api.gates import (
    MATCHED,
    AddressBucket,
    AllowedHost,
    AllowedPeers,
    AuthBudget,
    EdgeLimits,
    Either,
    Gate,
    Match,
    Methods,
)
from bastion.api.http import (
    NO_STORE,
    Answer,
    Headers,
    HttpRequest,
    HttpResponse,
    Refusal,
    error_response,
)
from bastion.api.ops import Ops
from bastion.api.rest import RestApi
from bastion.core.hub import AppState
from bastion.eager import start
from bastion.protocol.refusals import Reason

__all__ = [
    "HEALTH_PATHS",
    "AppDirectory",
    "AppPaths",
    "DashboardPages",
    "FrontDoor",
    "Paths",
    "Prefix",
    "Route",
    "front_door",
]

log = logging.getLogger("bastion.http")

#: Paths answered without any limit: load balancers probe them constantly.
HEALTH_PATHS = frozenset({"/", "/up", "/healthz"})
_READY_PATH = "/readyz"
_METRICS_PATH = "/metrics"
_APPS = "/apps/"
_HEALTHY = HttpResponse(200, b"OK", content_type="text/plain")

#: Accepts a request for a route (what it matched), or passes (``None``).
Matcher = Callable[[HttpRequest], Match | None]
#: Answers a request the route's gates let through.
Handler = Callable[[HttpRequest, Match], Answer]


@dataclass(frozen=True, slots=True)
class Route:
    """One row of the table.

    Attributes:
        name: how docs/decisions/0015-front-door.md names the route.
        matches: whether the route owns a request.
        gates: checked in order; the first refusal is the answer.
        handler: answers a request every gate let through.
        refusal_headers: added after a refusal's own headers, and to an internal
            error's answer.
        refusals_spend_bucket: a refusal spends the address's REST token first.
    """

    name: str
    matches: Matcher
    gates: tuple[Gate, ...]
    handler: Handler
    refusal_headers: Headers = ()
    refusals_spend_bucket: bool = False


class FrontDoor:
    """Answers plain HTTP requests by the first route that matches.

    Args:
        routes: the table, in order; the last should match everything.
        limits: the node's per-address limits and refusal path.
    """

    __slots__ = ("limits", "routes")

    def __init__(self, routes: Sequence[Route], limits: EdgeLimits) -> None:
        self.routes = tuple(routes)
        self.limits = limits

    def answer(self, request: HttpRequest) -> Answer:
        """The answer to ``request``: now, or an awaitable (a cluster-wide query)."""
        for route in self.routes:
            match = route.matches(request)
            if match is None:
                continue
            for gate in route.gates:
                refusal = gate(request, match)
                if refusal is not None:
                    return self.refuse(route, request, refusal)
            try:
                return route.handler(request, match)
            except Exception:
                # A defect of ours: a generic 500, the trace stays in our log.
                log.exception("internal error handling an HTTP request (%s)", route.name)
                self.limits.refusals.record(Reason.HTTP_INTERNAL_ERROR, ip=request.ip)
                return error_response(Reason.HTTP_INTERNAL_ERROR, headers=route.refusal_headers)
        self.limits.refusals.record(Reason.HTTP_NOT_FOUND, ip=request.ip)
        return error_response(Reason.HTTP_NOT_FOUND)

    def refuse(self, route: Route, request: HttpRequest, refusal: Refusal) -> HttpResponse:
        """Record ``refusal`` on the refusal path and answer it, as ``route`` says."""
        limits = self.limits
        if route.refusals_spend_bucket:
            wait = limits.rest_requests.take(request.ip or "", request.now)
            if wait > 0:
                refusal = Refusal(Reason.HTTP_IP_RATE, retry_after=wait)
        limits.refusals.record(refusal.reason, app_id=refusal.app_id, ip=request.ip)
        return refusal.response(route.refusal_headers)


# --- matchers ---------------------------------------------------------------------------


class Paths:
    """Matches exactly these paths."""

    __slots__ = ("paths",)

    def __init__(self, *paths: str) -> None:
        self.paths = frozenset(paths)

    def __call__(self, request: HttpRequest) -> Match | None:
        """``MATCHED`` for one of the paths."""
        return MATCHED if request.path in self.paths else None


class Prefix:
    """Matches ``prefix`` and every path below it."""

    __slots__ = ("below", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.below = prefix + "/"

    def __call__(self, request: HttpRequest) -> Match | None:
        """``MATCHED`` for the prefix itself or a path under it."""
        path = request.path
        return MATCHED if path == self.prefix or path.startswith(self.below) else None


class DashboardPages:
    """Matches the dashboard's page and assets, for an operator address in ``allow_from``."""

    __slots__ = ("peers",)

    def __init__(self, peers: AllowedPeers) -> None:
        self.peers = peers

    def __call__(self, request: HttpRequest) -> Match | None:
        """Anyone else gets the 404 of an unknown path."""
        if is_dashboard_path(request.path) and self.peers.allows(request.operator_ip):
            return MATCHED
        return None


class AppDirectory(Protocol):
    """Where the apps are found by id (the node's :class:`~bastion.core.hub.Hub`)."""

    @property
    def apps_by_id(self) -> Mapping[str, AppState]:
        """The apps now (a live reload changes them)."""
        ...


class AppPaths:
    """Matches ``/apps/{id}/...``, naming the app when it exists.

    Args:
        apps: the node's apps, read at each request.
        method: only this method, and only for an app that exists (the preflight).
    """

    __slots__ = ("apps", "method")

    def __init__(self, apps: AppDirectory, method: str | None = None) -> None:
        self.apps = apps
        self.method = method

    def __call__(self, request: HttpRequest) -> Match | None:
        """The app the path names (``None`` inside when no such app)."""
        if self.method is not None and request.method != self.method:
            return None
        path = request.path
        if not path.startswith(_APPS):
            return None
        end = path.find("/", len(_APPS))
        if end <= len(_APPS):
            return None
        app = self.apps.apps_by_id.get(path[len(_APPS) : end])
        if app is None:
            return None if self.method is not None else MATCHED
        return Match(app)


def _anything(request: HttpRequest) -> Match | None:
    return MATCHED


# --- the table ----------------------------------------------------------------------------


class _RestHandler:
    """The Pusher REST API, run eagerly (on one node the answer is ready at once)."""

    __slots__ = ("rest",)

    def __init__(self, rest: RestApi) -> None:
        self.rest = rest

    def __call__(self, request: HttpRequest, match: Match) -> Answer:
        return with_cors(start(self.rest.handle(request, now=request.now)), request, match.app)


def front_door(
    limits: EdgeLimits,
    apps: AppDirectory,
    rest: RestApi,
    ops: Ops | None = None,
    admin: AdminApi | None = None,
) -> FrontDoor:
    """The node's route table (see the module docstring for the order).

    Args:
        limits: the node's per-address limits and refusal path (its context).
        apps: the node's apps (its hub).
        rest: the Pusher REST API.
        ops: ``/readyz`` and ``/metrics`` (none: both fall through to 404).
        admin: the admin API and the dashboard (none, or no token: 404).
    """
    bucket = AddressBucket(limits)
    budget = AuthBudget(limits)
    get = Methods("GET")
    rest_handler = _RestHandler(rest)
    routes = [Route("health", Paths(*HEALTH_PATHS), (), lambda request, match: _HEALTHY)]
    if ops is not None:
        routes.append(
            Route(
                "readiness",
                Paths(_READY_PATH),
                (get,),
                lambda request, match: ops.readiness(),
                refusals_spend_bucket=True,
            )
        )
        if ops.enabled:
            scrape = Either((ops.peers, AllowedHost(ops.hosts)), (ops.token,))
            routes.append(
                Route(
                    "metrics",
                    Paths(_METRICS_PATH),
                    (scrape, get),
                    lambda request, match: ops.exposition(),
                    refusals_spend_bucket=True,
                )
            )
    if admin is not None and admin.enabled:
        host = AllowedHost(admin.hosts)
        routes += [
            # The address first, then the Host (a DNS-rebinding page never gets to try
            # a token, even from loopback where no budget applies), then the budget:
            # a stranger learns nothing about the routes.
            Route(
                "admin",
                Prefix(ADMIN_PREFIX),
                (admin.peers, host, budget, admin.token),
                lambda request, match: admin.handle(
                    request.method, request.path, request.query, request.body
                ),
                refusal_headers=NO_STORE,
                refusals_spend_bucket=True,
            ),
            # The page is a login form: no token, but the address and the Host.
            Route(
                "dashboard",
                DashboardPages(admin.peers),
                (host, Methods(*sorted(DASHBOARD_METHODS))),
                lambda request, match: dashboard_response(request.method, request.path),
                refusal_headers=SECURITY_HEADERS,
                refusals_spend_bucket=True,
            ),
        ]
    routes += [
        # Public and static: the pusher-js recovery add-on.
        Route(
            "addon",
            Paths(ADDON_PATH),
            (bucket, Methods(*sorted(ADDON_METHODS))),
            lambda request, match: addon_response(),
        ),
        Route("preflight", AppPaths(apps, "OPTIONS"), (bucket, CorsPreflight()), preflight),
        # Every /apps/{id}/ call is signed: an authentication attempt.
        Route("app", AppPaths(apps), (bucket, budget), rest_handler),
        Route("fallback", _anything, (bucket,), rest_handler),
    ]
    return FrontDoor(routes, limits)
