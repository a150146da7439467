"""TokenBucket: rate, burst, Retry-After, and behaviour under a misbehaving clock.

Also the same bucket folded into one float (``take_folded``), which must take the
same decisions.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.security.ratelimit import _SLACK_SECONDS as SLACK_SECONDS
from bastion.security.ratelimit import TokenBucket, available_folded, settle_folded, take_folded


def test_starts_full_and_grants_the_burst() -> None:
    bucket = TokenBucket(rate=10, burst=10, now=0.0)
    assert [bucket.take(0.0) for _ in range(10)] == [0.0] * 10
    assert bucket.take(0.0) > 0


def test_refused_take_reports_retry_after_and_takes_nothing() -> None:
    bucket = TokenBucket(rate=10, burst=10, now=0.0)
    for _ in range(10):
        bucket.take(0.0)
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.0) == pytest.approx(0.1)  # the refusal did not dig a hole
    assert bucket.available(0.0) == pytest.approx(0.0)


def test_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=10, now=0.0)
    for _ in range(10):
        bucket.take(0.0)
    assert bucket.available(0.25) == pytest.approx(2.5)
    assert bucket.take(0.25) == 0.0
    assert bucket.take(0.25) == 0.0
    assert bucket.take(0.25) > 0


def test_never_refills_beyond_the_burst() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert bucket.available(1_000.0) == 3
    for _ in range(3):
        assert bucket.take(1_000.0) == 0.0
    assert bucket.take(1_000.0) > 0


def test_cost_larger_than_one() -> None:
    bucket = TokenBucket(rate=2, burst=5, now=0.0)
    assert bucket.take(0.0, cost=4) == 0.0
    assert bucket.take(0.0, cost=4) == pytest.approx(1.5)
    assert bucket.take(1.5, cost=4) == 0.0


def test_cost_above_the_burst_is_never_granted() -> None:
    bucket = TokenBucket(rate=1, burst=2, now=0.0)
    assert bucket.take(10_000.0, cost=3) > 0


def test_available_does_not_consume() -> None:
    bucket = TokenBucket(rate=1, burst=2, now=0.0)
    assert bucket.available(0.0) == 2
    assert bucket.available(0.0) == 2
    assert bucket.take(0.0) == 0.0
    assert bucket.available(0.0) == 1


def test_fractional_rate() -> None:
    bucket = TokenBucket(rate=0.5, burst=1, now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(2.0)
    assert bucket.take(1.9) > 0
    assert bucket.take(2.0) == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (1, 0.5), (1, -1)])
def test_invalid_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, burst=burst, now=0.0)


def test_clock_going_backwards_grants_nothing_extra() -> None:
    bucket = TokenBucket(rate=10, burst=10, now=100.0)
    for _ in range(10):
        assert bucket.take(100.0) == 0.0
    assert bucket.take(50.0) > 0  # back in time: no refill
    assert bucket.take(99.0) > 0
    assert bucket.available(100.0) == pytest.approx(0.0)
    assert bucket.take(100.15) == 0.0  # forward again from the latest time seen
    assert bucket.take(100.15) > 0


def test_a_bucket_created_in_the_future_does_not_refill_until_then() -> None:
    bucket = TokenBucket(rate=1, burst=1, now=10.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(5.0) > 0
    assert bucket.take(10.5) > 0
    assert bucket.take(11.0) == 0.0


# --- properties -----------------------------------------------------------------------

#: Highest rate the properties draw, tokens per second.
MAX_RATE = 1_000
#: Upper bound on what one grant may exceed the exact budget by: the bucket's float
#: slack is a time (SLACK_SECONDS), so in tokens it grows with the rate.
GRANT_SLACK = MAX_RATE * SLACK_SECONDS + 1e-9

rates = st.floats(min_value=0.01, max_value=MAX_RATE, allow_nan=False)
bursts = st.floats(min_value=1, max_value=1_000, allow_nan=False)
steps = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=5, allow_nan=False),  # time advance
        st.floats(min_value=0.1, max_value=5, allow_nan=False),  # cost
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, start=st.floats(0, 1e6), steps=steps)
def test_grants_never_exceed_burst_plus_rate_times_elapsed(
    rate: float, burst: float, start: float, steps: list[tuple[float, float]]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst, now=start)
    now, granted, grants = start, 0.0, 0
    for advance, cost in steps:
        now += advance
        if bucket.take(now, cost) == 0.0:
            granted += cost
            grants += 1
        budget = burst + rate * (now - start)
        # The bucket forgives up to GRANT_SLACK tokens per grant so that float
        # rounding of large clock readings never refuses a token that is due.
        assert granted <= budget * (1 + 1e-9) + grants * GRANT_SLACK


@settings(max_examples=300, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    times=st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), max_size=60),
)
def test_time_going_backwards_never_grants_extra(
    rate: float, burst: float, times: list[float]
) -> None:
    # Whatever order the clock reports, grants are bounded by the latest time seen.
    bucket = TokenBucket(rate=rate, burst=burst, now=0.0)
    latest, granted = 0.0, 0
    for now in times:
        latest = max(latest, now)
        if bucket.take(now) == 0.0:
            granted += 1
        assert granted <= (burst + rate * latest) * (1 + 1e-9) + granted * GRANT_SLACK


@settings(max_examples=300, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    start=st.floats(0, 1e6),  # up to ~12 days of monotonic uptime
    partial=st.floats(min_value=0, max_value=0.99),
    cost=st.floats(min_value=0.1, max_value=1),
)
def test_waiting_retry_after_then_taking_succeeds(
    rate: float, burst: float, start: float, partial: float, cost: float
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst, now=start)
    now = start
    first_retry = bucket.take(now, cost)
    while first_retry == 0.0:  # drain it
        first_retry = bucket.take(now, cost)
    assert first_retry > 0
    now += partial * first_retry  # part of the way to the next grant
    retry_after = bucket.take(now, cost)
    if retry_after == 0.0:
        # Only the float slack may grant it early: it is a time (SLACK_SECONDS, plus
        # 1e-9 of a token), so the wait left must have been within it.
        assert (1 - partial) * first_retry <= SLACK_SECONDS + 1e-9 / rate + 1e-12
        return
    assert math.isfinite(retry_after)
    assert retry_after <= cost / rate * (1 + 1e-9)
    assert bucket.take(now + retry_after, cost) == 0.0


def test_one_token_is_back_after_exactly_one_interval() -> None:
    bucket = TokenBucket(rate=10, burst=10, now=100.0)
    for _ in range(10):
        assert bucket.take(100.0) == 0.0
    assert bucket.take(100.1) == 0.0


@pytest.mark.parametrize("origin", [8e6, 1e7, 1e8])
def test_one_token_is_back_after_one_interval_on_a_long_running_clock(origin: float) -> None:
    bucket = TokenBucket(rate=10, burst=10, now=origin)
    for _ in range(10):
        assert bucket.take(origin) == 0.0
    assert bucket.take(origin + 0.1) == 0.0


def test_waiting_exactly_retry_after_succeeds() -> None:
    bucket = TokenBucket(rate=1, burst=1, now=2.0)
    while bucket.take(2.0, 0.1) == 0.0:
        pass
    retry_after = bucket.take(2.0, 0.1)
    assert retry_after > 0
    assert bucket.take(2.0 + retry_after, 0.1) == 0.0


@pytest.mark.parametrize("rate", [10.0, 1000.0, 50_000.0])
@pytest.mark.parametrize("origin", [1e7, 1e8])
def test_waiting_exactly_retry_after_succeeds_at_high_rates_on_long_clocks(
    rate: float, origin: float
) -> None:
    bucket = TokenBucket(rate=rate, burst=rate, now=origin)
    while bucket.take(origin) == 0.0:
        pass
    retry_after = bucket.take(origin)
    assert retry_after > 0
    assert bucket.take(origin + retry_after) == 0.0


# --- the folded bucket (one float per holder) -------------------------------------------


def test_folded_starts_full_grants_the_burst_and_refuses_without_digging() -> None:
    full_at: float = 0.0  # a fresh bucket
    for _ in range(5):
        taken = take_folded(full_at, 100.0, 10, 5)
        assert taken is not None
        full_at = taken
    assert take_folded(full_at, 100.0, 10, 5) is None
    assert take_folded(full_at, 100.0, 10, 5) is None  # a refusal takes nothing
    assert available_folded(full_at, 100.0, 10, 5) == pytest.approx(0.0)
    assert available_folded(full_at, 100.25, 10, 5) == pytest.approx(2.5)
    assert take_folded(full_at, 100.1, 10, 5) is not None  # one interval later


def test_folded_never_refills_beyond_the_burst() -> None:
    assert available_folded(0.0, 1e6, 50, 100) == 100
    full_at = take_folded(0.0, 1e6, 50, 100)
    assert full_at == pytest.approx(1e6 + 0.02)


GRID = 64  # time steps of 1/64 s: exact in binary, so both forms see the same instants


@settings(max_examples=300, deadline=None)
@given(
    rate=st.sampled_from([0.2, 0.5, 1, 2, 4, 5, 10, 20, 50, 100]),
    burst=st.integers(min_value=1, max_value=120),
    start=st.sampled_from([0.0, 1_000.0, 1e6]),
    advances=st.lists(st.integers(min_value=0, max_value=3 * GRID), max_size=200),
)
def test_folded_takes_the_decisions_of_a_token_bucket(
    rate: float, burst: int, start: float, advances: list[int]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst, now=start)
    full_at: float = 0.0
    now = start
    for advance in advances:
        now += advance / GRID
        granted = bucket.take(now) == 0.0
        taken = take_folded(full_at, now, rate, burst)
        assert granted == (taken is not None), (now, bucket.available(now))
        if taken is not None:
            full_at = taken
        assert available_folded(full_at, now, rate, burst) == pytest.approx(
            bucket.available(now), abs=1e-6
        )


def test_a_bucket_drained_at_a_low_rate_refills_at_a_raised_one_once_settled() -> None:
    # Drained at one token every 1,000 s (burst 6): full again in about 6,000 s.
    full_at = 0.0
    for _ in range(6):
        taken = take_folded(full_at, 10.0, 0.001, 6)
        assert taken is not None
        full_at = taken
    assert take_folded(full_at, 10.0, 0.001, 6) is None
    # The rate is raised to 50 a second: what the refusal keeps is an empty bucket at
    # the new settings, so a token is back 1/50 s later, not thousands of seconds.
    settled = settle_folded(full_at, 10.0, 50, 6)
    assert available_folded(settled, 10.0, 50, 6) == pytest.approx(0.0)
    assert take_folded(settled, 10.0 + 1 / 50, 50, 6) is not None
    # Without settling, the debt keeps refusing long after that.
    assert take_folded(full_at, 10.0 + 10, 50, 6) is None


@given(
    full_at=st.floats(0, 1e6),
    now=st.floats(0, 1e6),
    rate=st.floats(0.001, 1e4),
    burst=st.floats(1, 1e4),
)
def test_settling_never_grants_a_token_and_never_leaves_a_debt(
    full_at: float, now: float, rate: float, burst: float
) -> None:
    # What a take could use is unchanged, unless it was below zero: then it is zero.
    before = available_folded(full_at, now, rate, burst)
    after = available_folded(settle_folded(full_at, now, rate, burst), now, rate, burst)
    assert after == pytest.approx(max(before, 0.0), abs=1e-6 * burst)
