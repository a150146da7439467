"""Reconnects told from new arrivals (bastion.security.reconnects), on a clock we pass."""

from __future__ import annotations

import pytest

from bastion.security.reconnects import Reconnects


def test_an_arrival_from_the_same_address_and_app_soon_after_a_close_is_a_reconnect() -> None:
    seen = Reconnects(window_seconds=30)
    seen.closed("app", "203.0.113.7", None, now=100.0)
    assert seen.arrived("app", "203.0.113.7", opened_at=101.5)


def test_another_app_another_address_or_a_late_arrival_is_not() -> None:
    seen = Reconnects(window_seconds=30)
    seen.closed("app", "203.0.113.7", None, now=100.0)
    assert not seen.arrived("other-app", "203.0.113.7", opened_at=101.0)
    assert not seen.arrived("app", "203.0.113.8", opened_at=101.0)
    assert not seen.arrived("app", "203.0.113.7", opened_at=130.5)


def test_a_connection_that_opened_before_the_close_is_not_its_reconnect() -> None:
    seen = Reconnects(window_seconds=30)
    seen.closed("app", "203.0.113.7", None, now=100.0)
    assert not seen.arrived("app", "203.0.113.7", opened_at=99.0)


def test_each_close_answers_for_one_reconnect() -> None:
    seen = Reconnects(window_seconds=30)
    seen.closed("app", "203.0.113.7", None, now=100.0)
    assert seen.arrived("app", "203.0.113.7", opened_at=101.0)
    assert not seen.arrived("app", "203.0.113.7", opened_at=101.0)  # a second tab: new


def test_a_signed_in_user_is_matched_by_the_time_its_connection_opened() -> None:
    seen = Reconnects(window_seconds=30)
    seen.closed("app", "203.0.113.7", "alice", now=100.0)
    # From another address (a phone leaving Wi-Fi): the address rule does not match...
    assert not seen.arrived("app", "198.51.100.1", opened_at=102.0)
    # ...its sign-in, a minute later, does: it opened 2 s after the close.
    assert seen.signed_in("app", "alice", opened_at=102.0)
    assert not seen.signed_in("app", "bob", opened_at=102.0)


def test_no_address_and_no_user_remember_nothing() -> None:
    seen = Reconnects(window_seconds=30)
    seen.closed("app", None, None, now=100.0)
    assert seen.remembered() == (0, 0)
    assert not seen.arrived("app", None, opened_at=100.5)


def test_memory_is_bounded_oldest_first() -> None:
    seen = Reconnects(window_seconds=30, max_entries=3)
    for index in range(5):
        seen.closed("app", f"10.0.0.{index}", f"user-{index}", now=100.0 + index)
    assert seen.remembered() == (3, 3)
    assert not seen.arrived("app", "10.0.0.0", 105.0)
    assert not seen.arrived("app", "10.0.0.1", 105.0)
    assert seen.arrived("app", "10.0.0.4", 105.0)
    assert not seen.signed_in("app", "user-1", 105.0)
    assert seen.signed_in("app", "user-2", 105.0)


def test_a_close_older_than_the_window_is_never_matched() -> None:
    seen = Reconnects(window_seconds=10)
    seen.closed("app", "10.0.0.1", None, now=0.0)
    seen.closed("app", "10.0.0.2", None, now=50.0)
    assert not seen.arrived("app", "10.0.0.1", 50.5)
    assert seen.arrived("app", "10.0.0.2", 50.5)


def test_an_address_that_closes_again_is_remembered_at_its_last_close() -> None:
    seen = Reconnects(window_seconds=10, max_entries=2)
    seen.closed("app", "a", None, now=0.0)
    seen.closed("app", "b", None, now=1.0)
    seen.closed("app", "a", None, now=2.0)  # moves to the end: "b" is now the oldest
    seen.closed("app", "c", None, now=3.0)
    assert not seen.arrived("app", "b", 3.5)
    assert seen.arrived("app", "a", 3.5)


@pytest.mark.parametrize(("window", "entries"), [(0, 1), (-1, 1), (1, 0)])
def test_bad_bounds_are_refused(window: float, entries: int) -> None:
    with pytest.raises(ValueError):
        Reconnects(window, entries)
