"""Vacated/occupied smoothing: pure, with ``now`` passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.core import events as ev
from bastion.webhooks.smoothing import Smoother

OCC = ev.ChannelOccupied("app", "c1")
VAC = ev.ChannelVacated("app", "c1")
ADD = ev.MemberAdded("app", "presence-r", "u1")
REM = ev.MemberRemoved("app", "presence-r", "u1")


def test_vacate_and_reoccupy_within_the_delay_sends_nothing() -> None:
    s = Smoother(3)
    assert s.push(OCC, 0.0) == [OCC]
    assert s.push(VAC, 1.0) == []
    assert s.push(OCC, 3.9) == []  # returned 2.9 s later: neither is sent
    assert s.due(100.0) == []
    assert s.next_due() is None


def test_vacated_is_sent_after_the_delay_then_occupied_normally() -> None:
    s = Smoother(3)
    assert s.push(VAC, 1.0) == []
    assert s.next_due() == 4.0
    assert s.due(3.99) == []
    assert s.due(4.0) == [VAC]
    assert s.push(OCC, 5.0) == [OCC]


def test_occupied_after_the_delay_but_before_the_timer_follows_its_vacated() -> None:
    # The timer has not run yet (a busy loop), the occupied arrives: vacated goes first.
    s = Smoother(3)
    s.push(VAC, 1.0)
    assert s.push(OCC, 4.5) == [VAC, OCC]


def test_member_removed_and_added_of_one_user_cancel() -> None:
    s = Smoother(3)
    assert s.push(REM, 0.0) == []
    assert s.push(ADD, 2.0) == []
    assert len(s) == 0


def test_member_of_another_user_or_channel_does_not_cancel() -> None:
    s = Smoother(3)
    s.push(REM, 0.0)
    other_user = ev.MemberAdded("app", "presence-r", "u2")
    other_channel = ev.MemberAdded("app", "presence-s", "u1")
    other_app = ev.MemberAdded("app2", "presence-r", "u1")
    assert s.push(other_user, 1.0) == [other_user]
    assert s.push(other_channel, 1.0) == [other_channel]
    assert s.push(other_app, 1.0) == [other_app]
    assert s.due(3.0) == [REM]


def test_channel_occupied_does_not_cancel_a_member_removed() -> None:
    s = Smoother(3)
    s.push(ev.MemberRemoved("app", "c1", "u1"), 0.0)
    assert s.push(OCC, 1.0) == [OCC]
    assert len(s) == 1


def test_held_events_leave_in_the_order_they_were_held() -> None:
    s = Smoother(1)
    rem = ev.MemberRemoved("app", "presence-r", "u1")
    vac = ev.ChannelVacated("app", "presence-r")
    other = ev.ChannelVacated("app", "c2")
    s.push(rem, 0.0)
    s.push(vac, 0.0)
    s.push(other, 0.5)
    assert s.due(1.0) == [rem, vac]
    assert s.due(2.0) == [other]


def test_other_events_pass_at_once_after_due_ones() -> None:
    s = Smoother(1)
    s.push(VAC, 0.0)
    count = ev.SubscriptionCountChanged("app", "c2", 3)
    assert s.push(count, 0.5) == [count]
    assert s.push(count, 2.0) == [VAC, count]


def test_delay_zero_is_no_smoothing() -> None:
    s = Smoother(0)
    assert s.push(VAC, 0.0) == [VAC]
    assert s.push(OCC, 0.0) == [OCC]
    assert s.next_due() is None


def test_flush_releases_everything_held_in_order() -> None:
    s = Smoother(3)
    s.push(REM, 0.0)
    s.push(VAC, 1.0)
    assert s.flush() == [REM, VAC]
    assert len(s) == 0


def test_memory_is_bounded_by_releasing_the_oldest_early() -> None:
    s = Smoother(3, max_held=2)
    a, b, c = (ev.ChannelVacated("app", name) for name in "abc")
    assert s.push(a, 0.0) == []
    assert s.push(b, 0.0) == []
    assert s.push(c, 0.0) == [a]  # sent early, not lost
    assert len(s) == 2


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        Smoother(-1)
    with pytest.raises(ValueError):
        Smoother(1, max_held=0)


# --- property: whatever happens, each channel's sent sequence is consistent --------------

# One step: (channel index, join?, seconds since the previous step, run the timer?).
_step = st.tuples(
    st.integers(0, 2),
    st.booleans(),
    st.floats(0, 2, allow_nan=False),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(_step, max_size=60),
    delay=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    presence=st.booleans(),
    max_held=st.sampled_from([1, 2, 1000]),
)
def test_sent_sequence_alternates_and_ends_as_the_channel_is(
    steps: list[tuple[int, bool, float, bool]], delay: float, presence: bool, max_held: int
) -> None:
    """Subscribers come and go; per channel (or user) the sent events alternate
    up/down, start with up, and end in the real final state."""
    smoother = Smoother(delay, max_held=max_held)
    counts = [0, 0, 0]
    sent: list[ev.HubEvent] = []
    now = 0.0

    def up(i: int) -> ev.HubEvent:
        if presence:
            return ev.MemberAdded("app", "presence-r", f"u{i}")
        return ev.ChannelOccupied("app", f"c{i}")

    def down(i: int) -> ev.HubEvent:
        if presence:
            return ev.MemberRemoved("app", "presence-r", f"u{i}")
        return ev.ChannelVacated("app", f"c{i}")

    for index, join, elapsed, tick in steps:
        now += elapsed
        if tick:
            sent += smoother.due(now)
        if join:
            counts[index] += 1
            if counts[index] == 1:
                sent += smoother.push(up(index), now)
        elif counts[index] > 0:
            counts[index] -= 1
            if counts[index] == 0:
                sent += smoother.push(down(index), now)
    sent += smoother.due(now + delay)
    assert len(smoother) == 0

    for index in range(3):
        mine = [e for e in sent if e in (up(index), down(index))]
        expected_kinds = [up(index), down(index)] * len(mine)
        assert mine == expected_kinds[: len(mine)], mine
        assert (bool(mine) and mine[-1] == up(index)) == (counts[index] > 0)
