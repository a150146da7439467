"""Connections' deadlines in slots of a tick: never early, at most a tick late, few timers."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bastion.server.deadlines import TICK, Deadlines


class Clock:
    """``time`` and ``call_at`` on a time moved by hand; timers fire in order."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> None:
        self.timers.append((when, lambda: callback(*args)))

    def advance(self, seconds: float) -> None:
        until = self.now + seconds
        while due := [timer for timer in self.timers if timer[0] <= until]:
            timer = min(due, key=lambda t: t[0])
            self.timers.remove(timer)
            self.now = max(self.now, timer[0])
            timer[1]()
        self.now = until


class Owner:
    def __init__(self, clock: Clock, log: list[tuple[str, float]], name: str) -> None:
        self.clock, self.log, self.name = clock, log, name

    def expire(self) -> None:
        self.log.append((self.name, self.clock.now))


@pytest.fixture
def clock() -> Iterator[Clock]:
    yield Clock()


def _deadlines(clock: Clock) -> Deadlines:
    return Deadlines(clock)  # type: ignore[arg-type]


def test_a_deadline_fires_never_early_and_at_most_a_tick_late(clock: Clock) -> None:
    deadlines, log = _deadlines(clock), list[tuple[str, float]]()
    for offset in (0.001, 0.3, 1.0, 2.049, 7.5):
        deadlines.add(clock.now + offset, Owner(clock, log, str(offset)))
    start = clock.now
    clock.advance(10)
    assert len(log) == 5
    for name, fired_at in log:
        due = start + float(name)
        assert due <= fired_at <= due + TICK + 1e-9, (name, fired_at - due)
    assert len(deadlines) == 0


def test_deadlines_in_one_tick_share_one_timer(clock: Clock) -> None:
    deadlines, log = _deadlines(clock), list[tuple[str, float]]()
    base = (int(clock.now / TICK) + 10) * TICK
    for index in range(100):
        deadlines.add(base + 0.0001 + index * (TICK / 200), Owner(clock, log, str(index)))
    assert len(clock.timers) == 1
    clock.advance(1)
    assert len(log) == 100


def test_a_discarded_deadline_never_fires(clock: Clock) -> None:
    deadlines, log = _deadlines(clock), list[tuple[str, float]]()
    kept, dropped = Owner(clock, log, "kept"), Owner(clock, log, "dropped")
    deadlines.add(clock.now + 1, kept)
    slot = deadlines.add(clock.now + 1, dropped)
    deadlines.discard(slot, dropped)
    assert len(deadlines) == 1
    clock.advance(2)
    assert [name for name, _ in log] == ["kept"]
    deadlines.discard(slot, kept)  # after it fired: nothing to do, no error


def test_one_failing_owner_does_not_spare_the_others(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    deadlines, log = _deadlines(clock), list[tuple[str, float]]()

    class Broken:
        def expire(self) -> None:
            raise RuntimeError("defect")

    deadlines.add(clock.now + 1, Broken())
    deadlines.add(clock.now + 1, Owner(clock, log, "other"))
    clock.advance(2)
    assert [name for name, _ in log] == ["other"]
    assert "internal error at a connection's deadline" in caplog.text


def test_an_owner_may_wait_again_from_its_expiry(clock: Clock) -> None:
    deadlines, fired = _deadlines(clock), list[float]()

    class Again:
        def __init__(self) -> None:
            self.times = 3

        def expire(self) -> None:
            fired.append(clock.now)
            self.times -= 1
            if self.times:
                deadlines.add(clock.now + 1, self)

    deadlines.add(clock.now + 1, Again())
    clock.advance(10)
    assert len(fired) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(fired)]
    assert all(1 <= gap <= 1 + TICK + 1e-9 for gap in gaps)


async def test_on_a_real_loop_a_deadline_fires() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    done = loop.create_future()

    class Owner:
        def expire(self) -> None:
            done.set_result(loop.time())

    due = loop.time() + 0.01
    deadlines.add(due, Owner())
    fired_at = await asyncio.wait_for(done, timeout=5)
    assert fired_at >= due
