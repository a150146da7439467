"""The route table of a real node, fed requests directly: no socket, no parser.

A :class:`~bastion.server.runtime.Node` is built (not started) and its front door
answers :class:`~bastion.api.http.HttpRequest` values; what each answer is, and
what it spent and recorded, shows the order the docs promise: probes and
authorised operators are never limited, refusals on operator paths spend the
address's REST token, app routes spend it first of all.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator

import pytest

from bastion.api.gates import MATCHED, Match
from bastion.api.http import NO_STORE, HttpRequest, HttpResponse
from bastion.api.routes import FrontDoor, Paths, Route
from bastion.config import settings_from_mapping
from bastion.metrics import Metrics
from bastion.protocol.refusals import Reason
from bastion.server.refusals import RefusalPath
from bastion.server.runtime import Node

ADMIN_TOKEN = "routes-admin-token-0123456789abcdefghij"
METRICS_TOKEN = "routes-metrics-token-0123456789abcdefgh"
BURST = 3
STRANGER = "192.0.2.10"
LOOPBACK = "127.0.0.1"
ORIGIN = "https://app.example.com"
ORDER = [
    "health",
    "readiness",
    "metrics",
    "admin",
    "dashboard",
    "addon",
    "preflight",
    "app",
    "fallback",
]


@pytest.fixture
def node() -> Iterator[Node]:
    loop = asyncio.new_event_loop()
    settings = settings_from_mapping(
        {
            "security": {
                "rest_requests_per_ip": {"rate": 0.001, "burst": BURST},
                "auth_failures_per_ip": {"rate": 0.001, "burst": 1},
            },
            "audit": {"enabled": False},
            "metrics": {"token": METRICS_TOKEN},
            "admin": {"token": ADMIN_TOKEN, "allow_from": ["127.0.0.1/32", "10.0.0.0/8"]},
            "apps": [
                {"id": "1", "key": "key-1", "secret": "secret-1", "allowed_origins": [ORIGIN]},
                {"id": "2", "key": "key-2", "secret": "secret-2"},
            ],
        },
        environ={},
    )
    try:
        yield Node(settings, loop)
    finally:
        loop.close()


def answer(
    node: Node,
    method: str,
    path: str,
    *headers: tuple[str, str],
    ip: str = STRANGER,
    operator_ip: str | None = "",
    query: str = "",
) -> HttpResponse:
    door = node.ctx.door
    assert door is not None
    operator = ip if operator_ip == "" else operator_ip
    named = tuple((name.lower(), value) for name, value in headers)  # as the listener does
    request = HttpRequest(method, path, query, named, b"", ip, operator, time.time())
    response = door.answer(request)
    assert isinstance(response, HttpResponse)
    return response


def tokens_left(node: Node, ip: str = STRANGER) -> int:
    # Whole tokens: the bucket refills 0.001 per second while the test runs.
    return math.floor(node.ctx.rest_requests.available(ip, time.time()))


def reason(response: HttpResponse) -> str:
    slug: str = json.loads(response.body)["reason"]
    return slug


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def test_the_table_is_in_the_documented_order(node: Node) -> None:
    door = node.ctx.door
    assert isinstance(door, FrontDoor)
    assert [route.name for route in door.routes] == ORDER


@pytest.mark.parametrize("path", ["/", "/up", "/healthz"])
def test_health_is_answered_for_any_method_without_a_limit(node: Node, path: str) -> None:
    for method in ("GET", "POST", "HEAD") * BURST:
        response = answer(node, method, path)
        assert (response.status, response.body) == (200, b"OK")
    assert tokens_left(node) == BURST


def test_readyz_is_never_rate_limited(node: Node) -> None:
    for _ in range(BURST * 3):
        assert answer(node, "GET", "/readyz", operator_ip=None).status == 200
    assert tokens_left(node) == BURST


def test_a_refused_readyz_spends_the_bucket_then_is_rate_limited(node: Node) -> None:
    for _ in range(BURST):
        response = answer(node, "POST", "/readyz")
        assert (response.status, reason(response)) == (405, "method_not_allowed")
        assert ("Allow", "GET") in response.headers
    response = answer(node, "POST", "/readyz")
    assert (response.status, reason(response)) == (429, "ip_rate_limited")
    assert response.headers == (("Retry-After", "1000"),)
    assert node.metrics.refusal_count("method_not_allowed") == BURST
    assert node.metrics.refusal_count("ip_rate_limited") == 1


def test_admin_refusals_spend_the_bucket(node: Node) -> None:
    challenge = ("WWW-Authenticate", 'Bearer realm="bastion-admin"')
    for _ in range(BURST):
        response = answer(node, "GET", "/api/security/health", bearer(ADMIN_TOKEN))
        assert (response.status, reason(response)) == (401, "admin_unauthorized")
        assert response.headers == (challenge, *NO_STORE)
    response = answer(node, "GET", "/api/security/health", bearer(ADMIN_TOKEN))
    assert (response.status, reason(response)) == (429, "ip_rate_limited")
    assert response.headers == (("Retry-After", "1000"), *NO_STORE)
    assert tokens_left(node) == 0


def test_an_authorised_admin_call_spends_nothing(node: Node) -> None:
    for _ in range(BURST * 3):
        response = answer(node, "GET", "/api/security/health", bearer(ADMIN_TOKEN), ip=LOOPBACK)
        assert response.status == 200
        assert ("Cache-Control", "no-store") in response.headers
    assert tokens_left(node, LOOPBACK) == BURST
    assert node.metrics.refusals == {}


def test_admin_checks_the_host_before_the_token(node: Node) -> None:
    evil = ("Host", "evil.example")
    response = answer(node, "GET", "/api/security/health", evil, bearer("wrong"), ip=LOOPBACK)
    assert (response.status, reason(response)) == (403, "host_not_allowed")
    # The token was never compared: no failed authentication was recorded.
    assert node.metrics.refusal_count("admin_unauthorized") == 0


def test_admin_budget_comes_before_the_token(node: Node) -> None:
    operator = "10.0.0.5"  # inside allow_from, outside never_block
    response = answer(node, "GET", "/api/security/health", bearer("wrong"), ip=operator)
    assert reason(response) == "admin_unauthorized"  # one failure spends the budget
    response = answer(node, "GET", "/api/security/health", bearer(ADMIN_TOKEN), ip=operator)
    assert (response.status, reason(response)) == (429, "auth_failure_limit")
    assert response.headers == (("Retry-After", "1000"), *NO_STORE)


def test_metrics_by_address_and_host_or_by_token(node: Node) -> None:
    evil = ("Host", "evil.example")
    assert answer(node, "GET", "/metrics", ip=LOOPBACK).status == 200
    assert answer(node, "GET", "/metrics", evil, bearer(METRICS_TOKEN), ip=LOOPBACK).status == 200
    assert answer(node, "GET", "/metrics", bearer(METRICS_TOKEN)).status == 200
    assert reason(answer(node, "GET", "/metrics", evil, ip=LOOPBACK)) == "host_not_allowed"
    assert reason(answer(node, "GET", "/metrics")) == "metrics_forbidden"
    # Access first, then the method; allowed scrapes spent nothing.
    assert reason(answer(node, "POST", "/metrics", ip=LOOPBACK)) == "method_not_allowed"
    assert tokens_left(node, LOOPBACK) == BURST - 2
    assert tokens_left(node) == BURST - 1


def test_the_dashboard_is_an_unknown_path_outside_allow_from(node: Node) -> None:
    response = answer(node, "GET", "/dashboard")
    assert (response.status, reason(response)) == (404, "not_found")
    assert tokens_left(node) == BURST - 1  # the fallback's bucket
    page = answer(node, "GET", "/dashboard", ip=LOOPBACK)
    assert page.status == 200 and page.content_type.startswith("text/html")
    refused = answer(node, "DELETE", "/dashboard", ip=LOOPBACK)
    assert (refused.status, reason(refused)) == (405, "method_not_allowed")
    assert refused.headers[0] == ("Allow", "GET, HEAD")
    assert set(page.headers) <= set(refused.headers)  # the page's security headers


def test_preflight_answers_cors_for_restricted_apps_only(node: Node) -> None:
    foreign = answer(node, "OPTIONS", "/apps/1/events", ("Origin", "https://evil.example"))
    assert (foreign.status, reason(foreign)) == (403, "origin_refused")
    assert foreign.headers == (("Vary", "Origin"),)
    allowed = answer(node, "OPTIONS", "/apps/1/events", ("Origin", ORIGIN))
    assert allowed.status == 204
    assert ("Access-Control-Allow-Origin", ORIGIN) in allowed.headers
    assert ("Access-Control-Max-Age", "600") in allowed.headers
    assert answer(node, "OPTIONS", "/apps/2/events", ("Origin", ORIGIN)).headers == ()
    assert node.metrics.refusals == {("origin_refused", "1"): 1}
    assert tokens_left(node) == 0  # each spent a token


def test_app_routes_spend_the_bucket_then_ask_the_budget(node: Node) -> None:
    unsigned = answer(node, "POST", "/apps/1/events", ("Origin", ORIGIN))
    assert (unsigned.status, reason(unsigned)) == (401, "auth_missing")
    assert ("Access-Control-Allow-Origin", ORIGIN) in unsigned.headers  # CORS on answers
    # That failure spent the budget: even an unknown app id's call is an attempt.
    for path in ("/apps/1/events", "/apps/999/events"):
        response = answer(node, "POST", path)
        assert (response.status, reason(response)) == (429, "auth_failure_limit")
    assert node.metrics.refusals[("auth_failure_limit", "1")] == 1
    assert node.metrics.refusals[("auth_failure_limit", "")] == 1
    response = answer(node, "POST", "/apps/1/events")
    assert reason(response) == "ip_rate_limited"  # the bucket, before the budget


def test_a_handler_defect_is_a_500_with_the_route_headers() -> None:
    def broken(request: HttpRequest, match: Match) -> HttpResponse:
        raise RuntimeError("a defect")

    refusals = RefusalPath(Metrics())
    limits = type("Limits", (), {"refusals": refusals})()
    door = FrontDoor([Route("broken", Paths("/x"), (), broken, refusal_headers=NO_STORE)], limits)
    request = HttpRequest("GET", "/x", ip=STRANGER)
    response = door.answer(request)
    assert isinstance(response, HttpResponse)
    assert (response.status, reason(response), response.headers) == (
        500,
        Reason.HTTP_INTERNAL_ERROR.value.slug,
        NO_STORE,
    )
    # No route at all: the 404 of an unknown path.
    missing = door.answer(HttpRequest("GET", "/y", ip=STRANGER))
    assert isinstance(missing, HttpResponse) and missing.status == 404
    assert refusals.metrics.refusal_count("internal_error") == 1
    assert MATCHED.app_id is None
