"""MemoryRateLimiter: per-key buckets, exact Retry-After, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.security.limits import MemoryRateLimiter, RateLimiter, retry_after_seconds


def test_is_a_rate_limiter() -> None:
    limiter: RateLimiter = MemoryRateLimiter(rate=1, burst=2)
    assert limiter.take("a", 0.0) == 0.0


def test_each_key_has_its_own_burst() -> None:
    limiter = MemoryRateLimiter(rate=0.5, burst=3)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0] * 3
    assert limiter.take("a", 0.0) == pytest.approx(2.0)
    assert [limiter.take("b", 0.0) for _ in range(3)] == [0.0] * 3


def test_refused_take_takes_nothing_and_refills() -> None:
    limiter = MemoryRateLimiter(rate=2, burst=1)
    assert limiter.take("a", 10.0) == 0.0
    assert limiter.take("a", 10.0) == pytest.approx(0.5)
    assert limiter.take("a", 10.25) == pytest.approx(0.25)
    assert limiter.take("a", 10.5) == 0.0


def test_peek_answers_like_take_without_taking_or_storing() -> None:
    limiter = MemoryRateLimiter(rate=1, burst=2)
    assert limiter.peek("new", 0.0) == 0.0
    assert len(limiter) == 0
    limiter.take("a", 0.0)
    limiter.take("a", 0.0)
    assert limiter.peek("a", 0.0) == pytest.approx(1.0)
    assert limiter.peek("a", 0.4) == pytest.approx(0.6)
    assert limiter.peek("a", 1.0) == 0.0
    assert limiter.available("a", 1.0) == pytest.approx(1.0)
    assert limiter.available("never", 1.0) == 2.0


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        MemoryRateLimiter(rate=0, burst=1)
    with pytest.raises(ValueError):
        MemoryRateLimiter(rate=1, burst=0)
    with pytest.raises(ValueError):
        MemoryRateLimiter(rate=1, burst=1, max_keys=0)


def test_full_buckets_are_evicted_before_busy_ones() -> None:
    limiter = MemoryRateLimiter(rate=1, burst=2, max_keys=2)
    limiter.take("idle", 0.0)  # full again by t=1
    limiter.take("busy", 5.0)
    limiter.take("busy", 5.0)  # empty
    limiter.take("new", 5.0)
    assert len(limiter) == 2
    # "busy" kept its debt: "idle" (full, carrying no state) made the room.
    assert limiter.take("busy", 5.0) > 0


def test_least_recently_used_goes_when_none_is_full() -> None:
    limiter = MemoryRateLimiter(rate=0.001, burst=1, max_keys=2)
    limiter.take("a", 0.0)
    limiter.take("b", 0.0)
    limiter.take("a", 0.0)  # refused, but a is now the most recently used
    limiter.take("c", 0.0)
    assert len(limiter) == 2
    assert limiter.take("a", 0.0) > 0  # kept
    assert limiter.take("b", 0.0) == 0.0  # forgotten: starts afresh


@pytest.mark.parametrize(
    ("wait", "seconds"),
    [(0.0, 1), (0.001, 1), (1.0, 1), (1.2, 2), (4.999, 5), (300.0, 300), (float("inf"), 1)],
)
def test_retry_after_header_is_whole_seconds_rounded_up(wait: float, seconds: int) -> None:
    assert retry_after_seconds(wait) == seconds


# --- properties ------------------------------------------------------------------------

_rates = st.floats(min_value=0.01, max_value=100, allow_nan=False)
_bursts = st.integers(min_value=1, max_value=20)
_steps = st.lists(
    st.tuples(st.sampled_from("abc"), st.floats(min_value=0, max_value=2, allow_nan=False)),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(rate=_rates, burst=_bursts, steps=_steps)
def test_never_more_than_burst_plus_refill_in_any_window(
    rate: float, burst: int, steps: list[tuple[str, float]]
) -> None:
    limiter = MemoryRateLimiter(rate, burst)
    now = 1000.0
    granted: dict[str, list[float]] = {}
    for key, dt in steps:
        now += dt
        if limiter.take(key, now) == 0.0:
            granted.setdefault(key, []).append(now)
    for times in granted.values():
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                allowed = burst + rate * (times[j] - start) + 1e-6
                assert j - i + 1 <= allowed


@settings(max_examples=200, deadline=None)
@given(rate=_rates, burst=_bursts, taken=st.integers(min_value=0, max_value=40))
def test_retry_after_is_exact(rate: float, burst: int, taken: int) -> None:
    limiter = MemoryRateLimiter(rate, burst)
    now = 50.0
    for _ in range(taken):
        limiter.take("k", now)
    wait = limiter.take("k", now)
    if wait == 0.0:
        return
    assert limiter.peek("k", now) == pytest.approx(wait)
    # Just before the promised time it is still refused; at that time it is granted.
    if wait > 1e-3:
        assert limiter.take("k", now + wait * (1 - 1e-3)) > 0
    assert limiter.take("k", now + wait) == 0.0


@settings(max_examples=100, deadline=None)
@given(
    max_keys=st.integers(min_value=1, max_value=10),
    steps=st.lists(
        st.tuples(st.integers(0, 40), st.floats(min_value=0, max_value=3, allow_nan=False)),
        max_size=200,
    ),
)
def test_memory_never_exceeds_max_keys(max_keys: int, steps: list[tuple[int, float]]) -> None:
    limiter = MemoryRateLimiter(rate=1, burst=3, max_keys=max_keys)
    now = 0.0
    for key, dt in steps:
        now += dt
        limiter.take(str(key), now)
        limiter.peek(f"peek-{key}", now)
        assert len(limiter) <= max_keys
