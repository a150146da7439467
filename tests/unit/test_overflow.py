"""The :class:`Overflow`: frames held while a transport is paused, bounded by bytes.

Held here: it never holds more than its limit, and a frame that does not fit is
not held (the connection then spills it); frames come out whole, oldest first,
in slices of at most the budget (one frame at least); a spill drops everything
held, says how many frames and bytes that was, and holds nothing from then on.
"""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from bastion.server.overflow import TRANSPORT_HIGH_WATER, Overflow


def frame(size: int, fill: bytes = b"x") -> bytes:
    return fill * size


def test_holds_up_to_the_limit_and_refuses_the_frame_that_would_pass_it() -> None:
    overflow = Overflow(limit=100)
    assert overflow.paused and not overflow.spilled
    assert overflow.hold(frame(60))
    assert overflow.hold(frame(40))  # exactly the limit is within it
    assert (len(overflow), overflow.size) == (2, 100)
    assert not overflow.hold(frame(1))
    # The refused frame is not held, and nothing else changed.
    assert (len(overflow), overflow.size) == (2, 100)
    assert not overflow.spilled


def test_a_frame_larger_than_the_limit_is_refused_on_an_empty_overflow() -> None:
    overflow = Overflow(limit=10)
    assert not overflow.hold(frame(11))
    assert (len(overflow), overflow.size) == (0, 0)
    assert not Overflow(limit=0).hold(b"\x81\x00")  # no room at all: not even a tiny frame


def test_take_gives_whole_frames_oldest_first_within_the_budget() -> None:
    overflow = Overflow(limit=1000)
    for fill in (b"a", b"b", b"c", b"d"):
        assert overflow.hold(frame(30, fill))
    assert overflow.take(65) == frame(30, b"a") + frame(30, b"b")  # a third would pass 65
    assert overflow.size == 60
    assert overflow.take(60) == frame(30, b"c") + frame(30, b"d")  # exactly the budget
    assert (len(overflow), overflow.size) == (0, 0)
    assert overflow.take(60) is None


def test_take_gives_one_frame_larger_than_the_budget_whole() -> None:
    overflow = Overflow(limit=1000)
    assert overflow.hold(frame(500, b"a"))
    assert overflow.hold(frame(10, b"b"))
    assert overflow.take(100) == frame(500, b"a")  # never split: the wire needs whole frames
    assert overflow.take(100) == frame(10, b"b")


def test_room_freed_by_take_can_be_held_again() -> None:
    overflow = Overflow(limit=100)
    assert overflow.hold(frame(100, b"a"))
    assert not overflow.hold(frame(50, b"b"))
    assert overflow.take(TRANSPORT_HIGH_WATER) == frame(100, b"a")
    assert overflow.hold(frame(50, b"b"))
    assert overflow.size == 50


def test_spill_drops_everything_counts_it_and_holds_nothing_after() -> None:
    overflow = Overflow(limit=100)
    assert overflow.hold(frame(30))
    assert overflow.hold(frame(20))
    assert overflow.spill() == (2, 50)
    assert overflow.spilled
    assert (len(overflow), overflow.size) == (0, 0)
    assert overflow.take(100) is None
    assert not overflow.hold(frame(1))  # room enough, but a spilled overflow holds nothing
    assert overflow.spill() == (0, 0)  # counted once


@given(
    limit=st.integers(min_value=0, max_value=400),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("hold"), st.integers(min_value=1, max_value=120)),
            st.tuples(st.just("take"), st.integers(min_value=1, max_value=300)),
        ),
        max_size=40,
    ),
)
def test_frames_come_out_whole_in_order_within_the_budget_and_never_past_the_limit(
    limit: int, steps: list[tuple[str, int]]
) -> None:
    overflow = Overflow(limit)
    waiting: deque[bytes] = deque()  # frames accepted and not yet taken, oldest first
    for number, (action, value) in enumerate(steps):
        if action == "hold":
            # Each frame is distinct bytes, so order and wholeness show in the output.
            one = number.to_bytes(2, "big") * (value // 2 + 1)
            if overflow.hold(one):
                waiting.append(one)
            else:
                assert overflow.size + len(one) > limit
        else:
            taken = overflow.take(value)
            if taken is None:
                assert not waiting
                continue
            # A run of whole frames from the oldest: one at least, more while they fit.
            run = [waiting.popleft()]
            while waiting and len(b"".join(run)) + len(waiting[0]) <= value:
                run.append(waiting.popleft())
            assert taken == b"".join(run)
            assert len(run) == 1 or len(taken) <= value
        assert 0 <= overflow.size <= limit
        assert (len(overflow), overflow.size) == (len(waiting), sum(map(len, waiting)))
