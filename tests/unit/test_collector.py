"""The collector steward: survivors frozen, cycles made since still freed, pauses timed."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from bastion.metrics import GC_PAUSE_BUCKETS, Metrics
from bastion.server.collector import Collector


class Node:
    """Something to point at (weak references need a class of our own)."""

    def __init__(self) -> None:
        self.other: Node | None = None


class Ticks:
    """A pause timer that advances by a fixed step each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture
def collector(loop: asyncio.AbstractEventLoop) -> Iterator[Collector]:
    steward = Collector(loop, Metrics(), interval=3600, clock=Ticks(0.004))
    try:
        yield steward
    finally:
        steward.stop()
    assert gc.get_freeze_count() == 0


def _cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_start_freezes_what_is_alive_and_a_step_freezes_what_survived(
    collector: Collector,
) -> None:
    kept = [Node() for _ in range(100)]
    collector.start()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    kept += [Node() for _ in range(100)]
    collector.step()
    assert gc.get_freeze_count() >= frozen + 100
    assert collector._timer is not None  # the next step is scheduled


def test_a_frozen_object_is_still_freed_when_its_last_reference_goes(
    collector: Collector,
) -> None:
    kept = [Node() for _ in range(1000)]
    probe = weakref.ref(kept[0])
    collector.start()
    frozen = gc.get_freeze_count()
    del kept
    assert probe() is None
    assert gc.get_freeze_count() <= frozen - 1000


def test_a_cycle_made_between_steps_is_freed_by_the_next_step(collector: Collector) -> None:
    collector.start()
    gc.disable()  # only the step may collect it
    try:
        probe = _cycle()
        assert probe() is not None
        collector.step()
        assert probe() is None
    finally:
        gc.enable()


def test_every_pass_is_timed_by_generation(collector: Collector) -> None:
    collector.start()  # one full pass: generation 2
    gc.collect(0)
    metrics = collector.metrics
    assert sum(metrics.gc_pauses[2]) >= 1
    assert sum(metrics.gc_pauses[0]) >= 1
    # Each pass read the clock twice, 4 ms apart: the 5 ms bucket, 4 ms each.
    index = GC_PAUSE_BUCKETS.index(0.005)
    assert metrics.gc_pauses[0][index] == sum(metrics.gc_pauses[0])
    assert metrics.gc_pause_seconds[0] == pytest.approx(0.004 * sum(metrics.gc_pauses[0]))


def test_stop_hands_everything_back_and_stops_timing(collector: Collector) -> None:
    collector.start()
    assert gc.get_freeze_count() > 0
    collector.stop()
    assert gc.get_freeze_count() == 0
    assert collector._timer is None
    before = sum(sum(counts) for counts in collector.metrics.gc_pauses.values())
    gc.collect()
    assert sum(sum(counts) for counts in collector.metrics.gc_pauses.values()) == before
