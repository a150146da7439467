"""The front door's gates, one at a time: a request in, ``None`` or a refusal out.

Real parts throughout: in-memory buckets, the failed-authentication budget and a
refusal path over real metrics (gates never record; the test checks that too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from pydantic import SecretStr

from bastion.api.gates import (
    MATCHED,
    AddressBucket,
    AllowedHost,
    AllowedPeers,
    AuthBudget,
    BearerToken,
    Either,
    Match,
    Methods,
)
from bastion.api.http import HttpRequest, Refusal
from bastion.config import AppSettings
from bastion.core.hub import AppState
from bastion.metrics import Metrics
from bastion.protocol.refusals import Reason
from bastion.security.admission import AuthFailureBudget
from bastion.security.hosts import HostPolicy
from bastion.security.limits import MemoryRateLimiter
from bastion.server.refusals import RefusalPath

TOKEN = "gate-token-0123456789abcdefghijklmnop"
CHALLENGE = (("WWW-Authenticate", 'Bearer realm="test"'),)


@dataclass
class Limits:
    """What the gates read of a node: its per-address buckets and refusal path."""

    rest_requests: MemoryRateLimiter = field(
        default_factory=lambda: MemoryRateLimiter(rate=1.0, burst=2)
    )
    auth_budget: AuthFailureBudget = field(
        default_factory=lambda: AuthFailureBudget(MemoryRateLimiter(rate=0.5, burst=1))
    )
    refusals: RefusalPath = field(default_factory=lambda: RefusalPath(Metrics()))


def request(
    *headers: tuple[str, str],
    method: str = "GET",
    ip: str | None = "192.0.2.1",
    operator_ip: str | None = "127.0.0.1",
    now: float = 100.0,
) -> HttpRequest:
    named = tuple((name.lower(), value) for name, value in headers)  # as the listener does
    return HttpRequest(method, "/x", "", named, b"", ip, operator_ip, now)


def test_address_bucket_spends_every_request_then_refuses_with_the_wait() -> None:
    limits = Limits()
    gate = AddressBucket(limits)
    assert gate(request(), MATCHED) is None
    assert gate(request(), MATCHED) is None
    refusal = gate(request(), MATCHED)
    assert refusal == Refusal(Reason.HTTP_IP_RATE, retry_after=pytest.approx(1.0))
    # Per address; the refusal is counted against the matched app.
    assert gate(request(ip="192.0.2.2"), MATCHED) is None
    assert limits.rest_requests.available("192.0.2.2", 100.0) == pytest.approx(1.0)
    assert limits.refusals.metrics.refusals == {}  # the door records, not the gate


def test_bucket_and_budget_refusals_name_the_matched_app() -> None:
    limits = Limits(rest_requests=MemoryRateLimiter(rate=1.0, burst=1))
    app = AppState(AppSettings(id="42", key="key-42", secret=SecretStr("s")))
    bucket, budget = AddressBucket(limits), AuthBudget(limits)
    assert bucket(request(), Match(app)) is None
    assert bucket(request(), Match(app)) == Refusal(
        Reason.HTTP_IP_RATE, retry_after=pytest.approx(1.0), app_id="42"
    )
    limits.auth_budget.spend("192.0.2.1", 100.0)
    refusal = budget(request(), Match(app))
    assert refusal is not None and refusal.app_id == "42"
    assert budget(request(), MATCHED) == Refusal(
        Reason.AUTH_FAILURE_LIMIT, retry_after=pytest.approx(2.0)
    )


def test_auth_budget_refuses_once_spent_and_spends_nothing_itself() -> None:
    limits = Limits()
    gate = AuthBudget(limits)
    for _ in range(3):
        assert gate(request(), MATCHED) is None  # asking spends nothing
    limits.auth_budget.spend("192.0.2.1", 100.0)
    refusal = gate(request(), MATCHED)
    assert refusal == Refusal(Reason.AUTH_FAILURE_LIMIT, retry_after=pytest.approx(2.0))
    response = refusal.response()
    assert (response.status, response.headers) == (429, (("Retry-After", "2"),))
    assert gate(request(ip="192.0.2.9"), MATCHED) is None


@pytest.mark.parametrize(
    ("values", "allowed"),
    [
        ([f"Bearer {TOKEN}"], True),
        ([f"bearer  {TOKEN} "], True),
        ([f"Bearer {TOKEN}x"], False),
        ([f"Bearer {TOKEN[:-1]}"], False),
        ([], False),
        ([f"Basic {TOKEN}"], False),
        ([TOKEN], False),
        ([f"Bearer {TOKEN}", f"Bearer {TOKEN}"], False),  # ambiguous
        (["Bearer é"], False),
    ],
)
def test_bearer_token(values: list[str], allowed: bool) -> None:
    gate = BearerToken(SecretStr(TOKEN), Reason.ADMIN_UNAUTHORIZED, CHALLENGE)
    assert gate.valid(values) is allowed
    headers = tuple(("Authorization", value) for value in values)
    refusal = gate(request(*headers), MATCHED)
    if allowed:
        assert refusal is None
    else:
        assert refusal == Refusal(Reason.ADMIN_UNAUTHORIZED, headers=CHALLENGE)


def test_bearer_token_without_a_token_accepts_nothing() -> None:
    gate = BearerToken(None, Reason.METRICS_FORBIDDEN)
    assert not gate.configured
    assert not gate.valid(["Bearer "])
    assert gate(request(("authorization", "Bearer ")), MATCHED) == Refusal(Reason.METRICS_FORBIDDEN)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("not an address", False),
        ("", False),
        (None, False),
    ],
)
def test_allowed_peers_decide_on_the_operator_address(address: str | None, allowed: bool) -> None:
    gate = AllowedPeers(["127.0.0.1/32", "::1/128", "10.0.0.0/8"], Reason.METRICS_FORBIDDEN)
    for _ in range(2):  # the remembered answer is the same answer
        assert gate.allows(address) is allowed
        refusal = gate(request(ip="203.0.113.9", operator_ip=address), MATCHED)
        assert (refusal is None) is allowed
    assert gate(request(ip="127.0.0.1", operator_ip=None), MATCHED) is not None


def test_allowed_peers_stay_right_past_the_bound_of_remembered_addresses() -> None:
    gate = AllowedPeers(["10.0.0.0/8"], Reason.ADMIN_UNAUTHORIZED)
    addresses = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(5000)]
    assert all(gate.allows(address) for address in addresses)
    assert not any(gate.allows(f"11.0.{i // 256}.{i % 256}") for i in range(5000))


@pytest.mark.parametrize(
    ("hosts", "allowed"),
    [
        ([], True),  # not a browser
        (["127.0.0.1:6001"], True),
        (["localhost"], True),
        (["ops.example"], True),
        (["evil.example"], False),  # DNS rebinding
        (["127.0.0.1", "127.0.0.1"], False),  # ambiguous
    ],
)
def test_allowed_host(hosts: list[str], allowed: bool) -> None:
    gate = AllowedHost(HostPolicy("0.0.0.0", ["ops.example"]))
    refusal = gate(request(*(("Host", host) for host in hosts)), MATCHED)
    assert refusal == (None if allowed else Refusal(Reason.HOST_NOT_ALLOWED))


def test_methods_refuse_with_allow() -> None:
    gate = Methods("GET", "HEAD")
    assert gate(request(method="GET"), MATCHED) is None
    assert gate(request(method="HEAD"), MATCHED) is None
    refusal = gate(request(method="POST"), MATCHED)
    assert refusal == Refusal(Reason.HTTP_METHOD, headers=(("Allow", "GET, HEAD"),))
    assert refusal.response().status == 405


def test_either_passes_on_one_chain_and_answers_with_the_first_refusal() -> None:
    peers = AllowedPeers(["127.0.0.1/32"], Reason.METRICS_FORBIDDEN)
    host = AllowedHost(HostPolicy("127.0.0.1"))
    token = BearerToken(SecretStr(TOKEN), Reason.METRICS_FORBIDDEN)
    gate = Either((peers, host), (token,))
    assert gate.name == "(allowed peers + allowed host) or (bearer token)"
    bearer = ("Authorization", f"Bearer {TOKEN}")
    evil = ("Host", "evil.example")
    assert gate(request(), MATCHED) is None  # by address
    assert gate(request(evil, bearer), MATCHED) is None  # the token needs no Host
    assert gate(request(operator_ip="192.0.2.7"), MATCHED) == Refusal(Reason.METRICS_FORBIDDEN)
    # An allowed address with a foreign Host: the first chain's refusal names the Host.
    assert gate(request(evil), MATCHED) == Refusal(Reason.HOST_NOT_ALLOWED)
