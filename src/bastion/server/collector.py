"""The cycle collector kept to short passes: what survives is frozen, and every pass timed.

CPython's cycle collector stops the whole process while it scans. A full pass
scans every tracked object, and a node holding ten thousand connections holds a
few hundred thousand: on a two-core VM that was a stop of 0.4 to 1.5 s every 48 s
(``docs/decisions/0016-json-and-per-message-cost.md``). Nothing Bastion keeps per
connection needs that collector any more (no reference cycle outlives a
connection: ``tests/integration/test_no_cycles.py``), so what has survived a
while is moved out of its sight with :func:`gc.freeze`:

* at start-up, once the node listens: a full pass, then everything alive is frozen
  (modules, configuration, the hub);
* then every :data:`FREEZE_SECONDS`: a full pass over what is *not* frozen (the
  objects made since the last step: short, whatever the number of connections),
  then freeze what it left.

A frozen object is still freed the moment its last reference goes (reference
counting does not care); only a cycle made of frozen objects would wait for a
collection that never comes. ``bastion_gc_frozen_objects`` shows the frozen
count, which stays level under churn unless something leaks.

The youngest generation is collected after :data:`YOUNG_ALLOCATIONS` container
allocations instead of CPython's 700: a connection makes and drops a few hundred
such objects (freed by reference counting, never by the collector), so at the
default a reconnect storm ran a young pass every few connections, each scanning
the live connections' young objects again (``docs/decisions/0021-connect-path.md``).

Every collection is timed through :data:`gc.callbacks` into the node's metrics:
``bastion_gc_collections_total`` and the ``bastion_gc_pause_seconds`` histogram,
by generation.

Process-wide, like the collector itself: :func:`bastion.server.runtime.run` (what
``bastion serve`` and each worker run) starts one; nodes built in a test process
do not.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

from bastion.metrics import Metrics

__all__ = ["FREEZE_SECONDS", "YOUNG_ALLOCATIONS", "Collector"]

#: Seconds between two freezing steps. The pass before each freeze scans what the
#: last interval made and kept, so shorter means shorter passes; measured with
#: ``bench/soak.py``'s defaults (10,200 connections, 50 new ones a second).
FREEZE_SECONDS = 10.0
#: Container allocations (less deallocations) between two young collections.
YOUNG_ALLOCATIONS = 10_000


class Collector:
    """Times every collection and freezes what survives, every :data:`FREEZE_SECONDS`.

    Args:
        loop: the node's loop (the steps run on it, between callbacks).
        metrics: where collections and their pauses are counted.
        interval: seconds between freezing steps.
        clock: the pause timer (``time.perf_counter``).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics,
        *,
        interval: float = FREEZE_SECONDS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.loop = loop
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self._started_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._thresholds: tuple[int, int, int] | None = None

    def start(self) -> None:
        """Start timing collections; a full pass, freeze, and the next step in an interval."""
        gc.callbacks.append(self._on_collection)
        self._thresholds = gc.get_threshold()
        _, middle, old = self._thresholds
        gc.set_threshold(YOUNG_ALLOCATIONS, middle, old)
        self.step()

    def step(self) -> None:
        """A full pass over what is not frozen, then freeze what it left alive."""
        gc.collect()
        gc.freeze()
        self._timer = self.loop.call_later(self.interval, self.step)

    def stop(self) -> None:
        """Stop the steps and the timing; frozen objects are handed back to the collector."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None
        gc.unfreeze()

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started_at = self.clock()
            return
        started, self._started_at = self._started_at, None
        if started is None:  # registered in the middle of a collection
            return
        self.metrics.gc_collected(info["generation"], self.clock() - started)
