"""Repeated events written once with a count: refusal aggregation and failure episodes.

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

:class:`FailureEpisode` does the same for a recurring job that fails (a sync
with Redis every 2 s): the first failure of an episode is reported, then at most
one reminder every ``remind_seconds``, then one recovery with the number of
failures and how long the episode lasted.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

__all__ = [
    "Aggregate",
    "EpisodeReport",
    "FailureEpisode",
    "RepeatAggregator",
]

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


EpisodeEvent = Literal["failed", "still_failing", "recovered"]


@dataclass(frozen=True, slots=True)
class EpisodeReport:
    """What to say about a failure episode now.

    Attributes:
        event: ``failed`` (the first failure), ``still_failing`` (a reminder) or
            ``recovered`` (the first success after failures).
        failures: failures in the episode so far (for ``recovered``: in all).
        seconds: time since the first failure of the episode.
    """

    event: EpisodeEvent
    failures: int
    seconds: float


class FailureEpisode:
    """The failures of one recurring job, reported once per episode with a count.

    Args:
        remind_seconds: at most one ``still_failing`` report this often (> 0).
    """

    __slots__ = ("_reminded", "failures", "remind_seconds", "started")

    def __init__(self, remind_seconds: float = 600.0) -> None:
        if not remind_seconds > 0:
            raise ValueError("remind_seconds must be > 0")
        self.remind_seconds = float(remind_seconds)
        #: Failures in the current episode (0: the job is healthy).
        self.failures = 0
        #: When the current episode's first failure happened.
        self.started = 0.0
        self._reminded = 0.0

    def failure(self, now: float) -> EpisodeReport | None:
        """The job failed at ``now``: a report for the first failure and for reminders."""
        self.failures += 1
        if self.failures == 1:
            self.started = self._reminded = now
            return EpisodeReport("failed", 1, 0.0)
        if now - self._reminded >= self.remind_seconds or now < self._reminded:
            self._reminded = now
            return EpisodeReport("still_failing", self.failures, max(0.0, now - self.started))
        return None

    def success(self, now: float) -> EpisodeReport | None:
        """The job succeeded at ``now``: a ``recovered`` report when it had been failing."""
        if self.failures == 0:
            return None
        report = EpisodeReport("recovered", self.failures, max(0.0, now - self.started))
        self.failures = 0
        return report
