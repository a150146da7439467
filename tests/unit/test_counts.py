"""Pusher's subscription_count throttle (the one throttle, protocol.counts): pure, ``now`` given."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from bastion.protocol.counts import CountThrottle


def test_small_channels_are_never_throttled() -> None:
    t = CountThrottle(threshold=100, interval=5)
    assert [t.push("app", "c", n, 0.0) for n in (1, 2, 100, 99)] == [True] * 4
    assert t.next_due() is None


def test_big_channel_sends_at_most_one_count_per_interval_then_the_latest() -> None:
    t = CountThrottle(threshold=100, interval=5)
    assert t.push("app", "big", 101, 0.0)
    assert not t.push("app", "big", 102, 1.0)
    assert not t.push("app", "big", 103, 2.0)
    assert t.next_due() == 5.0
    assert t.due(4.9) == []
    assert t.due(5.0) == [("app", "big", 103)]  # only the latest
    assert not t.push("app", "big", 104, 6.0)
    assert t.push("app", "big", 105, 10.0)  # 5 s after the last one sent
    assert t.due(100.0) == []


def test_a_count_just_above_the_threshold_waits_for_the_last_small_one() -> None:
    t = CountThrottle(threshold=100, interval=5)
    assert t.push("app", "big", 100, 0.0)
    assert not t.push("app", "big", 101, 1.0)  # two counts within 5 s on a big channel
    assert t.due(5.0) == [("app", "big", 101)]


def test_dropping_to_the_threshold_passes_and_makes_the_held_count_stale() -> None:
    t = CountThrottle(threshold=100, interval=5)
    t.push("app", "big", 101, 0.0)
    assert not t.push("app", "big", 102, 1.0)
    assert t.push("app", "big", 100, 2.0)
    assert t.due(10.0) == []


def test_a_vacated_channel_is_forgotten() -> None:
    t = CountThrottle(threshold=1, interval=5)
    t.push("app", "big", 2, 0.0)
    t.push("app", "big", 3, 1.0)
    t.forget("app", "big")
    assert len(t) == 0 and t.tracked == 0
    assert t.due(10.0) == []


def test_channels_are_throttled_separately() -> None:
    t = CountThrottle(threshold=1, interval=5)
    t.push("app", "a", 2, 0.0)
    t.push("app", "b", 2, 0.0)
    assert not t.push("app", "a", 3, 1.0)
    assert not t.push("app", "b", 3, 1.0)
    assert t.due(5.0) == [("app", "a", 3), ("app", "b", 3)]


@given(st.lists(st.tuples(st.integers(0, 300), st.floats(0, 3, allow_nan=False)), max_size=80))
def test_big_channels_never_send_twice_within_the_interval(
    steps: list[tuple[int, float]],
) -> None:
    t = CountThrottle(threshold=100, interval=5)
    now, sent = 0.0, []
    for count, wait in steps:
        now += wait
        if t.push("app", "c", count, now):
            sent.append((now, count))
        sent.extend((now, c) for _, _, c in t.due(now))
    for (before, _), (after, count) in itertools.pairwise(sent):
        assert count <= 100 or after - before >= 5
