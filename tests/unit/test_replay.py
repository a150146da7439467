"""ReplayGuard: each signature once per window, bounded memory, fail closed when full."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.security.replay import ReplayGuard, Verdict

WINDOW = 600


def test_first_use_accepted_second_refused() -> None:
    guard = ReplayGuard(window_seconds=WINDOW)
    assert guard.check_and_remember("a", 1000, 1000.0)
    assert not guard.check_and_remember("a", 1000, 1000.5)
    assert guard.check("a", 1000, 1001.0) is Verdict.REPLAYED
    assert guard.check_and_remember("b", 1000, 1001.0)


def test_remembered_until_timestamp_plus_window_then_forgotten() -> None:
    guard = ReplayGuard(window_seconds=WINDOW)
    assert guard.check_and_remember("a", 1000, 990.0)  # timestamp ahead of the clock
    assert not guard.check_and_remember("a", 1000, 1000.0 + WINDOW)  # last valid instant
    assert guard.check_and_remember("other", 2000, 1600.5)
    assert len(guard) == 1  # "a" expired at 1600 and was dropped
    assert "a" not in guard._seen


def test_a_timestamp_already_outside_the_window_is_refused() -> None:
    # Unreachable behind the signature check; refused because it cannot be remembered.
    guard = ReplayGuard(window_seconds=WINDOW)
    assert guard.check("a", 1000, 1000.0 + WINDOW + 1) is Verdict.REPLAYED
    assert len(guard) == 0


def test_full_guard_fails_closed_and_does_not_forget() -> None:
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=2)
    assert guard.check_and_remember("a", 1000, 1000.0)
    assert guard.check_and_remember("b", 1000, 1000.0)
    assert guard.check("c", 1000, 1000.0) is Verdict.FULL
    assert guard.check("a", 1000, 1000.0 + 5) is Verdict.REPLAYED  # still remembered
    # Once the old entries expire, there is room again.
    assert guard.check("c", 2000, 1601.0) is Verdict.ACCEPTED


def test_repeat_grace_accepts_same_second_repeats_only() -> None:
    guard = ReplayGuard(window_seconds=WINDOW, repeat_grace_seconds=2.0)
    assert guard.check_and_remember("a", 1000, 1000.1)
    assert guard.check_and_remember("a", 1000, 1000.9)
    assert guard.check_and_remember("a", 1000, 1002.1)  # grace counts from first acceptance
    assert guard.check("a", 1000, 1002.2) is Verdict.REPLAYED
    assert guard.check("a", 1000, 1500.0) is Verdict.REPLAYED


def test_repeats_inside_the_grace_are_allowed_when_full() -> None:
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=1, repeat_grace_seconds=1.0)
    assert guard.check_and_remember("a", 1000, 1000.0)
    assert guard.check_and_remember("a", 1000, 1000.5)
    assert guard.check("b", 1000, 1000.5) is Verdict.FULL


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        ReplayGuard(max_entries=0)
    with pytest.raises(ValueError):
        ReplayGuard(window_seconds=-1)
    with pytest.raises(ValueError):
        ReplayGuard(repeat_grace_seconds=-1)


def test_expiry_is_amortised_many_entries() -> None:
    guard = ReplayGuard(window_seconds=10, max_entries=100_000)
    for i in range(50_000):
        assert guard.check_and_remember(f"s{i}", i // 100, float(i // 100))
    # Every entry but the last 11 seconds' worth has expired.
    assert len(guard) <= 1_100


_requests = st.lists(
    st.tuples(
        st.sampled_from([f"sig{i}" for i in range(12)]),
        st.floats(0, 50),  # time advance since the previous request
        st.integers(-WINDOW, WINDOW),  # timestamp offset: inside the window, as verified
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(
    requests=_requests,
    max_entries=st.integers(1, 8),
    grace=st.sampled_from([0.0, 0.0, 1.0, 30.0]),
)
def test_matches_a_model(
    requests: list[tuple[str, float, int]], max_entries: int, grace: float
) -> None:
    """Refused iff seen within its window (past the grace) or the guard is full.

    Memory never exceeds the distinct signatures whose expiry is still ahead, nor the cap.
    """
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=max_entries, repeat_grace_seconds=grace)
    model: dict[str, tuple[float, float]] = {}  # signature → (expires_at, first accepted)
    now = 1_000_000.0
    for signature, advance, offset in requests:
        now += advance
        timestamp = int(now) + offset
        if abs(now - timestamp) > WINDOW:
            continue  # the signature check would have refused it
        model = {s: e for s, e in model.items() if e[0] >= now}
        if signature in model:
            expected = Verdict.ACCEPTED if now - model[signature][1] <= grace else Verdict.REPLAYED
        elif len(model) >= max_entries:
            expected = Verdict.FULL
        else:
            expected = Verdict.ACCEPTED
            model[signature] = (timestamp + WINDOW, now)
        assert guard.check(signature, timestamp, now) is expected
        assert len(guard) == len(model) <= max_entries
        assert len(guard._expiries) == len(guard)
