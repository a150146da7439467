"""Repeated events written once with a count: the aggregation of refusals.

Pure: no clock, no I/O. ``now`` is an argument everywhere; the callers in
``server/`` pass their clock and do the writing.

:class:`RepeatAggregator` turns a stream of events into a bounded number of
writes. Events are grouped by a key (the refusal path uses ``(ip, slug, app)``):

* the first event of a key is written at once (:meth:`~RepeatAggregator.offer`
  returns ``True``) and opens a window of ``window_seconds`` for that key;
* the events of that key inside the window are counted, not written; when the
  window closes (:meth:`~RepeatAggregator.due`), they become one
  :class:`Aggregate` with their exact count, first and last time, and the last
  event as a sample;
* a window that closed with a count opens the next one at once, so a key that
  keeps going is written once per window; a window that closed empty forgets
  the key, and its next event is written at once again.

Nothing is lost: every offered event is either written at once or counted in
exactly one aggregate, and :meth:`~RepeatAggregator.drain` hands over every open
count (a node stopping). Memory is bounded: at most ``max_keys`` windows are
open; a new key past that closes the oldest window early (its aggregate is
handed over by the next :meth:`~RepeatAggregator.due`), which costs a row, never
a count.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Aggregate", "RepeatAggregator"]

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Aggregate(Generic[K, S]):
    """The events of one key counted in one window (none of them written before).

    Attributes:
        key: the key the events share.
        sample: the last of them.
        count: how many there were (>= 1).
        first: the time of the first of them.
        last: the time of the last of them.
    """

    key: K
    sample: S
    count: int
    first: float
    last: float


class _Window(Generic[S]):
    """One key's open window: when it ends and what it has counted so far."""

    __slots__ = ("count", "ends", "first", "last", "sample")

    def __init__(self, ends: float) -> None:
        self.ends = ends
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.sample: S | None = None

    def add(self, sample: S, now: float) -> None:
        if self.count == 0:
            self.first = now
        self.count += 1
        self.last = max(self.last, now)
        self.sample = sample


class RepeatAggregator(Generic[K, S]):
    """Counts repeats of a key per window (see the module docstring).

    Args:
        window_seconds: how long a key's repeats are counted before they are
            handed over as one :class:`Aggregate` (> 0).
        max_keys: windows open at most (>= 1).
    """

    __slots__ = ("_ready", "_windows", "max_keys", "window_seconds")

    def __init__(self, window_seconds: float, max_keys: int = 10_000) -> None:
        if not window_seconds > 0:
            raise ValueError("window_seconds must be > 0")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.window_seconds = float(window_seconds)
        self.max_keys = max_keys
        #: Open windows, oldest first (a window that reopens moves to the end).
        self._windows: dict[K, _Window[S]] = {}
        #: Aggregates of windows closed early (table full) or found closed by offer().
        self._ready: list[Aggregate[K, S]] = []

    def __len__(self) -> int:
        return len(self._windows)

    def pending(self) -> int:
        """Events counted and not yet handed over."""
        return sum(window.count for window in self._windows.values()) + sum(
            aggregate.count for aggregate in self._ready
        )

    def offer(self, key: K, sample: S, now: float) -> bool:
        """One event of ``key`` at ``now``.

        Returns:
            True when it is to be written now (the first of its key); False when it
            was counted into the key's open window.
        """
        window = self._windows.get(key)
        if window is not None and now >= window.ends:
            # The window ended and due() has not run since: close it here.
            del self._windows[key]
            # Still going (it counted something): keep counting in a new window.
            window = self._open(key, now) if self._close(key, window) else None
        if window is None:
            self._open(key, now)
            return True
        window.add(sample, now)
        return False

    def due(self, now: float) -> list[Aggregate[K, S]]:
        """Close every window that ended by ``now``; their aggregates, oldest first.

        A window that counted something opens the next one for its key.
        """
        windows = self._windows
        while windows:
            key = next(iter(windows))
            window = windows[key]
            if now < window.ends:
                break
            del windows[key]
            if self._close(key, window):
                self._open(key, now)
        ready, self._ready = self._ready, []
        return ready

    def drain(self) -> list[Aggregate[K, S]]:
        """Close every window now (a stop): every count not yet handed over."""
        for key, window in self._windows.items():
            self._close(key, window)
        self._windows.clear()
        ready, self._ready = self._ready, []
        return ready

    def _open(self, key: K, now: float) -> _Window[S]:
        if len(self._windows) >= self.max_keys:
            oldest = next(iter(self._windows))
            self._close(oldest, self._windows.pop(oldest))
        window: _Window[S] = _Window(now + self.window_seconds)
        self._windows[key] = window
        return window

    def _close(self, key: K, window: _Window[S]) -> bool:
        """Queue the window's aggregate; False when it counted nothing."""
        if window.count == 0 or window.sample is None:
            return False
        self._ready.append(Aggregate(key, window.sample, window.count, window.first, window.last))
        return True
