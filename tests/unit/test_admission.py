"""Admission (concurrent cap, new-connection bucket) and the failed-authentication budget."""

from __future__ import annotations

import pytest

from bastion.protocol.refusals import Reason
from bastion.security.admission import (
    AUTH_FAILURE_REASONS,
    CONNECTION_CAP_RETRY_SECONDS,
    EXEMPT_REMEMBERED,
    WEBSOCKET_AUTH_FAILURE_REASONS,
    Admission,
    AuthFailureBudget,
    ConnectionCounter,
    Denial,
)
from bastion.security.limits import MemoryRateLimiter


def make(cap: int = 2, rate: float = 1.0, burst: int = 3) -> Admission:
    return Admission(
        max_connections_per_ip=cap, new_connections=MemoryRateLimiter(rate=rate, burst=burst)
    )


def test_counter_caps_and_frees() -> None:
    counter = ConnectionCounter(2)
    assert counter.acquire("a") and counter.acquire("a")
    assert not counter.acquire("a")
    assert counter.count("a") == 2 and counter.full("a")
    assert counter.acquire("b")
    counter.release("a")
    assert counter.acquire("a")


def test_counter_forgets_addresses_without_connections() -> None:
    counter = ConnectionCounter(3)
    counter.acquire("a")
    counter.acquire("b")
    counter.release("a")
    counter.release("b")
    assert len(counter) == 0
    counter.release("never")  # ignored, never negative
    assert counter.count("never") == 0 and len(counter) == 0


def test_counter_rejects_a_zero_limit() -> None:
    with pytest.raises(ValueError):
        ConnectionCounter(0)


def test_admits_until_the_concurrent_cap_then_refuses_without_spending() -> None:
    admission = make(cap=2, rate=1, burst=10)
    assert admission.admit("a", 0.0) is None
    assert admission.admit("a", 0.0) is None
    assert admission.admit("a", 0.0) == Denial(
        Reason.HTTP_IP_CONNECTIONS, CONNECTION_CAP_RETRY_SECONDS
    )
    assert admission.connections.count("a") == 2
    # The refusal spent no new-connection token: 8 of 10 are left.
    assert admission.new_connections.available("a", 0.0) == pytest.approx(8)
    admission.release("a")
    assert admission.admit("a", 0.0) is None
    assert admission.admit("b", 0.0) is None  # another address is not affected


def test_new_connection_bucket_refuses_with_its_retry_after() -> None:
    admission = make(cap=100, rate=0.5, burst=3)
    for _ in range(3):
        assert admission.admit("a", 0.0) is None
        admission.release("a")
    denial = admission.admit("a", 0.0)
    assert denial is not None
    assert denial.reason is Reason.HTTP_CONNECTION_RATE
    assert denial.retry_after == pytest.approx(2.0)
    assert admission.connections.count("a") == 0  # a denial holds nothing
    assert admission.admit("a", 2.0) is None


def budget(
    failures: int = 2, exempt: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
) -> AuthFailureBudget:
    return AuthFailureBudget(MemoryRateLimiter(rate=0.5, burst=failures), exempt)


def test_spent_budget_refuses_attempts_not_connections() -> None:
    admission, auth = make(cap=100, rate=100, burst=100), budget(failures=2)
    assert not auth.spend("a", 0.0)
    assert auth.refusal("a", 0.0) is None  # one failure left: still verified
    assert not auth.spend("a", 0.0)
    assert auth.refusal("a", 0.0) == Denial(Reason.AUTH_FAILURE_LIMIT, pytest.approx(2.0))
    # A failure on top of the spent budget says so (a WebSocket is then closed).
    assert auth.spend("a", 0.0)
    # Connecting is not an authentication attempt: the budget plays no part in it.
    assert admission.admit("a", 0.0) is None
    assert auth.refusal("b", 0.0) is None  # another address is not affected
    assert auth.refusal("a", 4.0) is None  # refilled one token


def test_never_block_addresses_neither_spend_nor_are_refused() -> None:
    auth = budget(failures=1, exempt=("127.0.0.1/32", "10.0.0.0/8", "::1/128"))
    for ip in ("127.0.0.1", "10.1.2.3", "::1", "::ffff:127.0.0.1"):
        for _ in range(5):
            assert not auth.spend(ip, 0.0)
        assert auth.refusal(ip, 0.0) is None
        assert auth.limiter.available(ip, 0.0) == 1  # nothing was taken
    # Everyone else is counted, and an address-less request is never exempt.
    auth.spend("192.0.2.1", 0.0)
    assert auth.refusal("192.0.2.1", 0.0) is not None
    assert not auth.is_exempt(None) and not auth.is_exempt("not-an-ip")


def test_auth_failure_reasons_cover_guesses_not_client_bugs() -> None:
    assert WEBSOCKET_AUTH_FAILURE_REASONS <= AUTH_FAILURE_REASONS
    assert Reason.SUBSCRIBE_AUTH_MISSING not in AUTH_FAILURE_REASONS
    assert Reason.AUTH_FAILURE_LIMIT not in AUTH_FAILURE_REASONS  # no feedback loop
    slugs = {reason.value.slug for reason in AUTH_FAILURE_REASONS}
    assert slugs == {
        "auth_missing",
        "auth_version",
        "auth_key",
        "auth_timestamp",
        "body_md5",
        "auth_signature",
        "replayed_request",
        "subscribe_auth_invalid",
        "signin_invalid",
        "signin_token_invalid",
        "admin_unauthorized",
    }


def test_exemption_is_remembered_per_address_and_bounded() -> None:
    auth = budget(exempt=("10.0.0.0/8", "::1/128"))
    # The same answers however often asked, and past the bound of remembered ones.
    addresses = [f"10.0.{i // 256}.{i % 256}" for i in range(EXEMPT_REMEMBERED + 10)]
    for _ in range(2):
        assert all(auth.is_exempt(ip) for ip in addresses)
        assert not auth.is_exempt("192.0.2.1")
        assert auth.is_exempt("::1") and auth.is_exempt("::ffff:10.1.2.3")
        assert not auth.is_exempt("not an address") and not auth.is_exempt(None)
        assert not auth.is_exempt("")
