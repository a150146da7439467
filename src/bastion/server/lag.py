"""Event-loop lag, sampled: how late a timer fires is how long every client waited.

Everything a node does runs on one loop, so a callback that holds it (a long
collection, a large fan-out, a slow disk call made by mistake on the loop)
delays every connection's frames by as much. :class:`LoopLagProbe` arms a timer
every :data:`LAG_SAMPLE_SECONDS` and, when it fires, counts how much later than
asked it ran into ``bastion_event_loop_lag_seconds`` (a histogram). A sample
costs one timer and a clock read: four a second, whatever the traffic.

The lag is measured with :func:`time.perf_counter`, not the loop's clock (uvloop
caches that one per iteration, at a millisecond's resolution); the timer itself
fires at the loop's resolution, so lags under a millisecond read as about zero.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bastion.metrics import Metrics

__all__ = ["LAG_SAMPLE_SECONDS", "LoopLagProbe"]

#: Seconds between two samples.
LAG_SAMPLE_SECONDS = 0.25


class LoopLagProbe:
    """Samples the loop's lag into ``metrics.loop_lag`` until stopped.

    Args:
        loop: the node's loop.
        metrics: the node's counters.
        interval: seconds between samples.
        clock: the timer (``time.perf_counter``).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics,
        *,
        interval: float = LAG_SAMPLE_SECONDS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.loop = loop
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        """Whether a sample is armed."""
        return self._timer is not None

    def start(self) -> None:
        """Arm the first sample."""
        if self._timer is None:
            self._arm()

    def stop(self) -> None:
        """Cancel the next sample."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        self._due = self.clock() + self.interval
        self._timer = self.loop.call_later(self.interval, self._sample)

    def _sample(self) -> None:
        self.metrics.loop_lag.observe("", max(0.0, self.clock() - self._due))
        self._arm()
