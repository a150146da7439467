"""The loop-lag probe: each sample is how late its timer ran, on a real loop."""

from __future__ import annotations

import asyncio

from support.timeouts import until

from bastion.metrics import LOOP_LAG_BUCKETS, Metrics
from bastion.server.lag import LoopLagProbe


class Clock:
    """A timer the test sets: the probe reads it when it arms and when it samples."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_sample_counts_how_late_its_timer_ran() -> None:
    metrics, clock = Metrics(), Clock()
    probe = LoopLagProbe(asyncio.get_running_loop(), metrics, interval=0.001, clock=clock)
    probe.start()
    try:
        clock.now += 0.001 + 0.03  # whenever it runs, it ran 30 ms late by this clock
        await until(lambda: "" in metrics.loop_lag.by_key)
    finally:
        probe.stop()
    series = metrics.loop_lag.by_key[""]
    assert series[LOOP_LAG_BUCKETS.index(0.05)] >= 1
    assert series[-1] >= 0.03 - 1e-9


async def test_a_timer_that_ran_early_by_the_clock_counts_as_no_lag() -> None:
    metrics, clock = Metrics(), Clock()
    probe = LoopLagProbe(asyncio.get_running_loop(), metrics, interval=0.001, clock=clock)
    probe.start()
    try:
        await until(lambda: "" in metrics.loop_lag.by_key)  # the clock never moved
    finally:
        probe.stop()
    assert metrics.loop_lag.by_key[""][0] >= 1 and metrics.loop_lag.by_key[""][-1] == 0.0


async def test_stop_cancels_the_next_sample() -> None:
    probe = LoopLagProbe(asyncio.get_running_loop(), Metrics(), interval=3600)
    probe.start()
    assert probe.running
    probe.stop()
    assert not probe.running
