"""Repeated events written once with a count (pure): the aggregator and failure episodes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.security.repeats import Aggregate, EpisodeReport, FailureEpisode, RepeatAggregator

W = 60.0


def test_the_first_event_of_a_key_is_written_and_its_repeats_are_counted() -> None:
    agg: RepeatAggregator[str, int] = RepeatAggregator(W)
    assert agg.offer("a", 1, 0.0) is True
    assert [agg.offer("a", n, float(n)) for n in range(2, 6)] == [False] * 4
    assert agg.offer("b", 1, 3.0) is True  # another key is written at once
    assert agg.due(59.9) == []
    assert agg.pending() == 4
    assert agg.due(60.0) == [Aggregate("a", 5, 4, 2.0, 5.0)]
    assert agg.pending() == 0


def test_a_key_that_keeps_going_is_written_once_per_window() -> None:
    agg: RepeatAggregator[str, int] = RepeatAggregator(W)
    written = 0
    aggregates: list[Aggregate[str, int]] = []
    for step in range(6000):  # 100 events a second for a minute
        now = step / 100
        written += agg.offer("a", step, now)
        aggregates += agg.due(now)
    aggregates += agg.due(1000.0)
    assert written == 1
    assert sum(a.count for a in aggregates) == 5999
    assert len(aggregates) <= 2


def test_a_quiet_window_forgets_the_key_and_the_next_event_is_written_again() -> None:
    agg: RepeatAggregator[str, int] = RepeatAggregator(W)
    assert agg.offer("a", 1, 0.0)
    assert not agg.offer("a", 2, 1.0)
    assert [a.count for a in agg.due(60.0)] == [1]  # reopened: still aggregating
    assert len(agg) == 1
    assert agg.due(120.0) == []  # a quiet window: forgotten
    assert len(agg) == 0
    assert agg.offer("a", 3, 121.0) is True


def test_a_window_found_ended_by_offer_is_closed_there() -> None:
    agg: RepeatAggregator[str, int] = RepeatAggregator(W)
    assert agg.offer("a", 1, 0.0)
    assert not agg.offer("a", 2, 10.0)
    # No due() ran; the next event after the window ends is counted in a new one.
    assert not agg.offer("a", 3, 70.0)
    assert agg.due(70.0) == [Aggregate("a", 2, 1, 10.0, 10.0)]
    assert agg.drain() == [Aggregate("a", 3, 1, 70.0, 70.0)]


def test_a_full_table_writes_the_oldest_window_early_and_loses_no_count() -> None:
    agg: RepeatAggregator[int, int] = RepeatAggregator(W, max_keys=3)
    for key in range(3):
        assert agg.offer(key, 0, 0.0)
        assert not agg.offer(key, 1, 1.0)
    assert agg.offer(3, 0, 2.0)  # evicts key 0 (its count goes out early)
    assert len(agg) == 3
    assert agg.due(2.0) == [Aggregate(0, 1, 1, 1.0, 1.0)]
    assert sorted(a.key for a in agg.drain()) == [1, 2]


def test_drain_hands_over_every_open_count() -> None:
    agg: RepeatAggregator[str, str] = RepeatAggregator(W)
    agg.offer("a", "x", 0.0)
    agg.offer("a", "y", 1.0)
    agg.offer("b", "z", 2.0)
    assert agg.drain() == [Aggregate("a", "y", 1, 1.0, 1.0)]
    assert len(agg) == 0 and agg.pending() == 0


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        RepeatAggregator(0)
    with pytest.raises(ValueError):
        RepeatAggregator(1, max_keys=0)
    with pytest.raises(ValueError):
        FailureEpisode(0)


events = st.lists(
    st.tuples(st.integers(0, 5), st.floats(min_value=0, max_value=30, allow_nan=False)),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(steps=events, window=st.floats(1, 100), max_keys=st.integers(1, 8))
def test_nothing_is_lost_and_writes_are_bounded(
    steps: list[tuple[int, float]], window: float, max_keys: int
) -> None:
    agg: RepeatAggregator[int, int] = RepeatAggregator(window, max_keys=max_keys)
    now, written, counted, aggregates = 0.0, 0, 0, 0
    per_key: dict[int, int] = {}
    for key, advance in steps:
        now += advance
        if agg.offer(key, 0, now):
            written += 1
        per_key[key] = per_key.get(key, 0) + 1
        due = agg.due(now)
        counted += sum(a.count for a in due)
        aggregates += len(due)
    final = agg.drain()
    counted += sum(a.count for a in final)
    aggregates += len(final)
    # Every event is written once or counted once: the counts are exact.
    assert written + counted == len(steps)
    # With room for every key, each key is written at most twice per window it spans.
    if max_keys >= 6:
        windows = math.ceil(now / window) + 1
        assert written + aggregates <= len(per_key) * 2 * windows


# --- failure episodes --------------------------------------------------------------------


def test_a_failure_episode_is_reported_once_then_reminded_then_recovered() -> None:
    episode = FailureEpisode(remind_seconds=600)
    assert episode.success(0.0) is None  # healthy: nothing to say
    assert episode.failure(10.0) == EpisodeReport("failed", 1, 0.0)
    reports = [episode.failure(10.0 + 2 * n) for n in range(1, 301)]  # every 2 s
    assert [r for r in reports if r is not None] == [EpisodeReport("still_failing", 301, 600.0)]
    assert episode.success(620.0) == EpisodeReport("recovered", 301, 610.0)
    assert episode.failures == 0
    assert episode.success(622.0) is None
    assert episode.failure(700.0) == EpisodeReport("failed", 1, 0.0)  # a new episode
