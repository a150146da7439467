"""Back-off, jitter, Retry-After and the retry / dead-letter decision (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.webhooks.retry import Decision, Outcome, classify, decide, delay, parse_retry_after

attempts = st.integers(min_value=1, max_value=10_000)
seconds = st.floats(min_value=1e-3, max_value=1e5, allow_nan=False, allow_infinity=False)
jitters = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (None, Outcome.RETRY),
        (200, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (301, Outcome.PERMANENT),
        (302, Outcome.PERMANENT),
        (400, Outcome.PERMANENT),
        (401, Outcome.PERMANENT),
        (404, Outcome.PERMANENT),
        (410, Outcome.PERMANENT),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (599, Outcome.RETRY),
        (100, Outcome.PERMANENT),
    ],
)
def test_classify(status: int | None, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_delay_doubles_within_equal_jitter_bounds() -> None:
    assert delay(1, 1.0, 300.0, 0.0) == 0.5
    assert delay(1, 1.0, 300.0, 0.999999) == pytest.approx(1.0, abs=1e-5)
    assert delay(2, 1.0, 300.0, 0.0) == 1.0
    assert delay(3, 1.0, 300.0, 0.0) == 2.0
    assert delay(20, 1.0, 300.0, 0.0) == 150.0
    assert delay(20, 1.0, 300.0, 0.9999) <= 300.0
    assert delay(0, 1.0, 300.0, 0.0) == 0.5  # below 1 counts as the first attempt
    assert delay(10**9, 1.0, 300.0, 0.5) <= 300.0  # no overflow


@settings(max_examples=500, deadline=None)
@given(attempt=attempts, initial=seconds, maximum=seconds, jitter=jitters)
def test_delay_never_negative_never_above_max(
    attempt: int, initial: float, maximum: float, jitter: float
) -> None:
    value = delay(attempt, initial, maximum, jitter)
    assert 0.0 <= value <= maximum


@settings(max_examples=500, deadline=None)
@given(attempt=attempts, initial=seconds, maximum=seconds)
def test_delay_bounds_are_non_decreasing(attempt: int, initial: float, maximum: float) -> None:
    # The smallest and largest possible delays of attempt n+1 are never below those of n,
    # so the expected delay grows (until it reaches the maximum).
    assert delay(attempt + 1, initial, maximum, 0.0) >= delay(attempt, initial, maximum, 0.0)
    high = 1.0 - 1e-9
    assert delay(attempt + 1, initial, maximum, high) >= delay(attempt, initial, maximum, high)


@settings(max_examples=300, deadline=None)
@given(attempt=attempts, initial=seconds, maximum=seconds, jitter=jitters)
def test_delay_is_at_least_half_the_nominal(
    attempt: int, initial: float, maximum: float, jitter: float
) -> None:
    nominal = min(maximum, initial * 2.0 ** min(attempt - 1, 62))
    assert delay(attempt, initial, maximum, jitter) >= nominal / 2 * (1 - 1e-12)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("5", 5.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("-1", None),
        ("nan", None),
        ("inf", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def _decide(**overrides: Any) -> Decision:
    arguments: dict[str, Any] = {
        "status": 503,
        "error": None,
        "retry_after": None,
        "attempt": 1,
        "age_from": 1000.0,
        "now": 1000.0,
        "initial": 1.0,
        "maximum": 300.0,
        "give_up_after": 86_400.0,
        "jitter": 0.0,
    }
    arguments.update(overrides)
    return decide(**arguments)


def test_decide_done_retry_dead() -> None:
    done = _decide(status=200)
    assert (done.action, done.next_attempt_at, done.reason) == ("done", None, None)
    retry = _decide(status=503)
    assert retry.action == "retry" and retry.next_attempt_at == 1000.5
    assert retry.reason == "HTTP 503"
    network = _decide(status=None, error="ConnectError")
    assert network.action == "retry" and network.reason == "ConnectError"
    bad = _decide(status=400)
    assert bad.action == "dead" and "not retried" in bad.reason
    redirect = _decide(status=302)
    assert redirect.action == "dead"


def test_give_up_after_age() -> None:
    young = _decide(now=1000.0 + 86_400.0)
    assert young.action == "retry"
    old = _decide(now=1000.0 + 86_400.5)
    assert old.action == "dead" and "gave up" in old.reason
    # A delivered answer is taken whatever the age.
    assert _decide(status=200, now=1e9).action == "done"


def test_retry_after_is_honoured_and_capped() -> None:
    assert _decide(status=429, retry_after="30").next_attempt_at == 1030.0
    assert _decide(status=429, retry_after="99999").next_attempt_at == 1300.0
    # Never sooner than the back-off.
    assert _decide(status=503, retry_after="0", attempt=3).next_attempt_at == 1002.0
