"""Batching per (app, url): up to N events or T ms, time passed in."""

from __future__ import annotations

import json

import pytest

from bastion.webhooks.batcher import Batch, Batcher


def e(n: int) -> dict[str, object]:
    return {"name": "channel_occupied", "channel": f"c{n}"}


def test_a_batch_closes_when_full_and_the_next_event_opens_a_new_one() -> None:
    b = Batcher(max_events=3, max_ms=1000)
    assert b.add("1", "u", e(1), 0.0, 100) is None
    assert b.add("1", "u", e(2), 0.1, 200) is None
    full = b.add("1", "u", e(3), 0.2, 300)
    assert full == Batch("1", "u", 100, (e(1), e(2), e(3)))
    assert len(b) == 0
    assert b.add("1", "u", e(4), 0.3, 400) is None
    assert b.next_deadline() == pytest.approx(1.3)


def test_a_batch_closes_after_the_window_from_its_first_event() -> None:
    b = Batcher(max_events=50, max_ms=200)
    b.add("1", "u", e(1), 10.0, 1)
    b.add("1", "u", e(2), 10.15, 2)
    assert b.next_deadline() == pytest.approx(10.2)
    assert b.due(10.19) == []
    assert b.due(10.2) == [Batch("1", "u", 1, (e(1), e(2)))]
    assert b.next_deadline() is None


def test_zero_window_is_one_event_per_request() -> None:
    b = Batcher(max_events=50, max_ms=0)
    assert b.add("1", "u", e(1), 0.0, 7) == Batch("1", "u", 7, (e(1),))
    assert b.add("1", "u", e(2), 0.0, 8) == Batch("1", "u", 8, (e(2),))
    assert len(b) == 0


def test_endpoints_and_apps_batch_separately_and_fall_due_in_order() -> None:
    b = Batcher(max_events=10, max_ms=100)
    b.add("1", "a", e(1), 0.0, 1)
    b.add("1", "b", e(2), 0.05, 2)
    b.add("2", "a", e(3), 0.06, 3)
    b.add("1", "a", e(4), 0.07, 4)
    assert b.due(0.1) == [Batch("1", "a", 1, (e(1), e(4)))]
    assert b.due(0.2) == [Batch("1", "b", 2, (e(2),)), Batch("2", "a", 3, (e(3),))]


def test_a_burst_never_holds_more_than_max_events_open() -> None:
    b = Batcher(max_events=5, max_ms=60_000)
    closed = [batch for n in range(23) if (batch := b.add("1", "u", e(n), 0.0, 0)) is not None]
    assert [len(batch.events) for batch in closed] == [5, 5, 5, 5]
    assert [ev for batch in closed for ev in batch.events] == [e(n) for n in range(20)]
    assert b.drain() == [Batch("1", "u", 0, tuple(e(n) for n in range(20, 23)))]


def test_drain_closes_everything() -> None:
    b = Batcher(max_events=10, max_ms=1000)
    b.add("1", "a", e(1), 0.0, 1)
    b.add("1", "b", e(2), 0.0, 1)
    assert [batch.url for batch in b.drain()] == ["a", "b"]
    assert b.drain() == []


def test_body_is_the_pusher_envelope() -> None:
    batch = Batch("1", "u", 42, (e(1), e(2)))
    assert batch.body() == (
        b'{"time_ms":42,"events":[{"name":"channel_occupied","channel":"c1"},'
        b'{"name":"channel_occupied","channel":"c2"}]}'
    )
    assert json.loads(batch.body())["events"] == [e(1), e(2)]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        Batcher(0, 10)
    with pytest.raises(ValueError):
        Batcher(1, -1)
