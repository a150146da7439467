"""ReplayGuard: each signature once, bounded memory, forgetting only behind a horizon."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.security.replay import ReplayGuard, Verdict

WINDOW = 600


def sig(n: int) -> str:
    """A 64-hex signature, as the REST check lets through."""
    return hashlib.sha256(n.to_bytes(8, "big")).hexdigest()


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
    assert guard.check("a", 1000, 1600.5) is Verdict.REPLAYED  # and its timestamp is refused


def test_a_timestamp_already_outside_the_window_is_refused() -> None:
    # Unreachable behind the signature check; refused because it cannot be remembered.
    guard = ReplayGuard(window_seconds=WINDOW)
    assert guard.check("a", 1000, 1000.0 + WINDOW + 1) is Verdict.REPLAYED
    assert len(guard) == 0


def test_a_full_guard_evicts_the_oldest_timestamp_and_raises_the_horizon() -> None:
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=2)
    assert guard.check(sig(1), 1000, 1000.0) is Verdict.ACCEPTED
    assert guard.check(sig(2), 1001, 1001.0) is Verdict.ACCEPTED
    assert guard.horizon == float("-inf") and guard.evicted == 0
    # Full: a newer timestamp makes room by forgetting the oldest one.
    assert guard.check(sig(3), 1002, 1002.0) is Verdict.ACCEPTED
    assert (len(guard), guard.horizon, guard.evicted) == (2, 1000, 1)
    # The forgotten signature is still refused, and so is anything as old.
    assert guard.check(sig(1), 1000, 1003.0) is Verdict.REPLAYED
    assert guard.check(sig(4), 1000, 1003.0) is Verdict.REPLAYED
    assert guard.check(sig(5), 999, 1003.0) is Verdict.REPLAYED
    # A newcomer no newer than every remembered signature is refused itself:
    # nothing is forgotten for it and the horizon stays.
    assert guard.check(sig(6), 1001, 1003.0) is Verdict.REPLAYED
    assert (len(guard), guard.horizon, guard.evicted) == (2, 1000, 1)
    assert guard.check(sig(2), 1001, 1003.0) is Verdict.REPLAYED  # still remembered
    # Current requests keep passing, memory stays at the cap.
    for n in range(7, 50):
        assert guard.check(sig(n), 1000 + n, 1000.0 + n) is Verdict.ACCEPTED
        assert len(guard) == 2
    assert guard.horizon == 1047 and guard.evicted == 44


def test_a_clock_stepping_back_never_revives_a_forgotten_signature() -> None:
    guard = ReplayGuard(window_seconds=WINDOW)
    assert guard.check("a", 1000, 1000.0) is Verdict.ACCEPTED
    assert guard.check("b", 1700, 1700.0) is Verdict.ACCEPTED  # "a" expires
    assert len(guard) == 1
    # The wall clock steps back 10 minutes: "a" would verify again, but is refused.
    assert guard.check("a", 1000, 1100.0) is Verdict.REPLAYED
    assert guard.check("b", 1700, 1100.0) is Verdict.REPLAYED


def test_repeat_grace_accepts_same_second_repeats_only() -> None:
    guard = ReplayGuard(window_seconds=WINDOW, repeat_grace_seconds=2.0)
    assert guard.check_and_remember("a", 1000, 1000.1)
    assert guard.check_and_remember("a", 1000, 1000.9)
    assert guard.check_and_remember("a", 1000, 1002.1)  # grace counts from first acceptance
    assert guard.check("a", 1000, 1002.2) is Verdict.REPLAYED
    assert guard.check("a", 1000, 1500.0) is Verdict.REPLAYED


def test_zero_grace_is_strict() -> None:
    guard = ReplayGuard(window_seconds=WINDOW, repeat_grace_seconds=0.0)
    assert guard.check("a", 1000, 1000.0) is Verdict.ACCEPTED
    assert guard.check("a", 1000, 1000.0) is Verdict.REPLAYED


def test_repeats_inside_the_grace_are_allowed_when_full() -> None:
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=1, repeat_grace_seconds=1.0)
    assert guard.check_and_remember("a", 1000, 1000.0)
    assert guard.check_and_remember("a", 1000, 1000.5)
    assert guard.check("b", 1000, 1000.5) is Verdict.REPLAYED  # not newer: refused itself
    assert guard.check("a", 1000, 1000.9) is Verdict.ACCEPTED  # "a" was kept
    assert guard.check("c", 1001, 1001.0) is Verdict.ACCEPTED  # newer: "a" evicted
    assert guard.check("a", 1000, 1001.0) is Verdict.REPLAYED  # even inside its grace


def test_a_hex_signature_is_remembered_by_its_bytes_and_other_text_as_text() -> None:
    guard = ReplayGuard(window_seconds=WINDOW)
    lower = sig(1)
    assert guard.check(lower, 1000, 1000.0) is Verdict.ACCEPTED
    # The same 32 bytes in upper case: the same signature (the REST check only
    # lets lower case through anyway).
    assert guard.check(lower.upper(), 1000, 1001.0) is Verdict.REPLAYED
    # 64 characters that are not 64 hex digits are kept as text: never confused.
    spaced = (" ".join(lower[i : i + 2] for i in range(0, 64, 2)))[:64]
    assert guard.check(spaced, 1000, 1001.0) is Verdict.ACCEPTED
    assert guard.check("g" * 64, 1000, 1001.0) is Verdict.ACCEPTED
    assert guard.check("g" * 64, 1000, 1002.0) is Verdict.REPLAYED
    assert len(guard) == 3


def test_lowering_max_entries_on_a_live_guard_shrinks_it_at_the_next_signature() -> None:
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=10)
    for n in range(10):
        assert guard.check(sig(n), 1000 + n, 1010.0) is Verdict.ACCEPTED
    guard.max_entries = 3  # what a config reload does
    assert guard.check(sig(99), 1020, 1020.0) is Verdict.ACCEPTED
    assert (len(guard), guard.horizon, guard.evicted) == (3, 1007, 8)
    assert guard.check(sig(7), 1007, 1020.0) is Verdict.REPLAYED
    assert guard.check(sig(8), 1008, 1020.0) is Verdict.REPLAYED  # still remembered


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
    assert guard.evicted == 0


def test_a_publisher_at_the_per_address_rate_is_never_refused() -> None:
    """Issue #11: 200 signed calls/s used to fill 100,000 entries in 500 s, then 503.

    Scaled down 100x in memory (1,000 entries, so the horizon trails the clock by
    5 s instead of 500 s), fifteen simulated minutes at 200 distinct calls a second,
    each stamped with the current second as the SDKs do, and each call repeated once
    within the same second (the SDKs' nonce-less retries).
    """
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=1_000, repeat_grace_seconds=2.0)
    for n in range(15 * 60 * 200):
        now = 1_800_000_000 + n / 200
        assert guard.check(sig(n), int(now), now) is Verdict.ACCEPTED, n
        assert guard.check(sig(n), int(now), now + 0.004) is Verdict.ACCEPTED, n
        assert len(guard) <= 1_000
    assert guard.evicted > 0
    assert 1_800_000_900 - 6 <= guard.horizon < 1_800_000_900


def test_a_lagging_signer_is_refused_only_past_max_entries_newer_signatures() -> None:
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=1_000)
    n = 0
    for second in range(200):
        now = 1_800_000_000 + second
        for _ in range(5):  # in sync: 5 calls a second
            n += 1
            assert guard.check(sig(n), now, now) is Verdict.ACCEPTED
        # 150 s behind: 750 newer signatures at most, under the cap of 1,000.
        n += 1
        assert guard.check(sig(n), now - 150, now) is Verdict.ACCEPTED
    # 250 s behind: 1,250 newer signatures, past the cap: refused as a possible replay.
    assert guard.check(sig(n + 1), 1_800_000_199 - 250, 1_800_000_199) is Verdict.REPLAYED


# --- properties ------------------------------------------------------------------------

_requests = st.lists(
    st.tuples(
        st.integers(0, 11),  # which signature
        st.floats(-30, 50),  # clock change since the previous request (it may step back)
        st.integers(-WINDOW, WINDOW),  # timestamp offset: inside the window, as verified
    ),
    max_size=80,
)


@settings(max_examples=500)
@given(
    requests=_requests,
    max_entries=st.integers(1, 8),
    grace=st.sampled_from([0.0, 0.0, 1.0, 30.0]),
)
def test_no_signature_is_accepted_again_outside_the_grace(
    requests: list[tuple[int, float, int]], max_entries: int, grace: float
) -> None:
    """Safety, whatever the evictions; liveness bounded by the cap; memory at the cap.

    * A signature accepted first at clock ``f`` is accepted again only at a clock
      ``c`` with ``c - f <= grace`` (the clock is the latest ``now`` the guard saw).
    * A signature never accepted and inside the window is refused only when at least
      ``max_entries`` accepted signatures carry a timestamp at or after its own.
    * The guard holds at most ``max_entries`` signatures.
    """
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=max_entries, repeat_grace_seconds=grace)
    first_accepted: dict[str, float] = {}
    timestamps: dict[str, int] = {}
    #: A signature covers its timestamp: the same signature always comes with the same one.
    signed_at: dict[int, int] = {}
    now = clock = 1_000_000.0
    for which, change, offset in requests:
        now += change
        timestamp = signed_at.setdefault(which, int(now) + offset)
        if abs(now - timestamp) > WINDOW:
            continue  # the signature check would have refused it
        clock = max(clock, now)
        signature = sig(which) if which % 2 else f"s{which}"
        verdict = guard.check(signature, timestamp, now)
        assert verdict in (Verdict.ACCEPTED, Verdict.REPLAYED)
        if signature in first_accepted:
            if verdict is Verdict.ACCEPTED:
                assert clock - first_accepted[signature] <= grace
        elif verdict is Verdict.ACCEPTED:
            first_accepted[signature] = clock
            timestamps[signature] = timestamp
        elif timestamp + WINDOW >= clock:
            newer = sum(1 for t in timestamps.values() if t >= timestamp)
            assert newer >= max_entries, (signature, timestamp, timestamps)
        assert len(guard) <= max_entries


@settings(max_examples=200)
@given(
    max_entries=st.integers(1, 50),
    seconds=st.integers(1, 40),
    per_second=st.integers(1, 20),
)
def test_in_sync_distinct_calls_pass_while_a_second_fits_the_cap(
    max_entries: int, seconds: int, per_second: int
) -> None:
    """With current timestamps, only a second holding more than the cap is refused."""
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=max_entries, repeat_grace_seconds=2.0)
    n = 0
    for second in range(seconds):
        for k in range(per_second):
            n += 1
            verdict = guard.check(sig(n), 5_000 + second, 5_000 + second + k / per_second)
            expected = Verdict.ACCEPTED if k < max_entries else Verdict.REPLAYED
            assert verdict is expected
        assert len(guard) <= max_entries
