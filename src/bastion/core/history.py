"""Channel history: each channel's last events with their positions, and the recovery verdict.

Pure: the clock (``now``) and the epochs (``new_epoch``) are arguments, so the
bounds and the verdict are tested without a server. Two parts:

* :func:`verdict` and :func:`complete` decide what a resume gets, from a channel's
  epoch, its last offset (``top``), its oldest kept offset and the events after
  the asked position. The in-memory history below and the Redis history
  (:mod:`bastion.adapters.redis.history`) both answer through them, so the rule
  "``recovered: true`` only with *every* missed event, in order; ``false`` with
  none" is written once: a gap in what a store hands back (a lost or trimmed
  entry, an entry out of place) is ``false``, never a partial replay.
* :class:`AppHistory` keeps one app's channels in memory: per channel at most
  ``max_events`` events, ``max_bytes`` of names and data and ``max_age`` seconds;
  at most ``max_channels`` channels (the least recently used is forgotten first),
  each forgotten ``position_ttl`` seconds after its last event (an empty one
  after ``max_age``). A forgotten channel's next history has a new epoch, so an
  old position is answered ``epoch_changed``, never compared with new offsets.

Bytes are counted as the UTF-8 sizes of the event name, data and excluded socket
id: what the bound is about (a publisher controls them), not Python's overhead,
which ``bench/history.py`` measures.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from bastion.config import HistorySettings
from bastion.protocol.names import SERVER_TO_USER_PREFIX
from bastion.protocol.positions import Position

__all__ = [
    "AppHistory",
    "ChannelHistory",
    "Entry",
    "HistoryLimits",
    "HistoryPolicy",
    "Recovery",
    "Unrecovered",
    "complete",
    "entry_size",
    "verdict",
]


class Unrecovered:
    """Why a recovery is ``false`` (the ``reason`` of ``bastion:recovery``)."""

    HISTORY_OFF = "history_off"
    EPOCH_CHANGED = "epoch_changed"
    TOO_OLD = "too_old"
    TOO_MANY = "too_many"
    FUTURE = "future_position"
    UNAVAILABLE = "unavailable"
    OVERFLOW = "overflow"
    ALREADY_SUBSCRIBED = "already_subscribed"


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """One app's history bounds (from ``[apps.history]``), seconds as floats."""

    max_events: int
    max_bytes: int
    max_age: float
    max_channels: int
    max_replay: int
    position_ttl: float

    @classmethod
    def from_settings(cls, settings: HistorySettings) -> HistoryLimits:
        """The bounds ``settings`` configure."""
        return cls(
            settings.max_events,
            settings.max_bytes,
            float(settings.max_age_seconds),
            settings.max_channels,
            settings.max_replay_events,
            float(settings.position_ttl_seconds),
        )


class HistoryPolicy:
    """Which of an app's channels have history, and their bounds.

    Args:
        settings: the app's ``[apps.history]``.
    """

    __slots__ = ("limits", "prefixes")

    def __init__(self, settings: HistorySettings) -> None:
        self.prefixes = tuple(settings.channel_prefixes)
        self.limits = HistoryLimits.from_settings(settings)

    def covers(self, channel: str) -> bool:
        """Whether ``channel`` has history (never a server-to-user channel)."""
        return channel.startswith(self.prefixes) and not channel.startswith(SERVER_TO_USER_PREFIX)


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One recorded event.

    Attributes:
        offset: its place in the channel's history (from 1).
        at: when it was recorded (the store's clock, seconds).
        event: the event name.
        data: the data string as published.
        exclude_socket_id: the socket the publisher excluded, if any.
        size: the bytes it counts for (:func:`entry_size`).
    """

    offset: int
    at: float
    event: str
    data: str
    exclude_socket_id: str | None
    size: int


def entry_size(event: str, data: str, exclude_socket_id: str | None) -> int:
    """The bytes an event counts for against ``max_bytes``."""
    # ASCII (most data: JSON with escapes) is one byte a character: no encoding.
    size = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
    size += len(event) if event.isascii() else len(event.encode("utf-8", "surrogatepass"))
    return size + (len(exclude_socket_id) if exclude_socket_id is not None else 0)


class Recovery(msgspec.Struct, frozen=True, gc=False):
    """What a resume gets.

    Attributes:
        recovered: every missed event is in ``entries`` (in order).
        position: where the client is once it has ``entries`` (the channel's last
            position); ``None`` when the channel has no history.
        entries: the events to replay (none unless ``recovered``).
        reason: why not ``recovered`` (an :class:`Unrecovered` value).
    """

    recovered: bool
    position: Position | None
    entries: tuple[Entry, ...] = ()
    reason: str | None = None


def verdict(
    asked: Position | None, epoch: str, top: int, oldest: int, max_replay: int
) -> Recovery | None:
    """The answer when the events themselves do not matter; ``None``: read them.

    Args:
        asked: the client's position (``None``: it holds none and is told where
            the channel is).
        epoch: the channel's epoch.
        top: the channel's last offset (0 before its first event).
        oldest: the oldest offset still kept (``top + 1`` when none is).
        max_replay: events one resume replays at most.
    """
    current = Position(epoch, top)
    if asked is None:
        return Recovery(True, current)
    if asked.epoch != epoch:
        return Recovery(False, current, reason=Unrecovered.EPOCH_CHANGED)
    if asked.offset > top:
        return Recovery(False, current, reason=Unrecovered.FUTURE)
    if asked.offset == top:
        return Recovery(True, current)
    if asked.offset + 1 < oldest:
        return Recovery(False, current, reason=Unrecovered.TOO_OLD)
    if top - asked.offset > max_replay:
        return Recovery(False, current, reason=Unrecovered.TOO_MANY)
    return None


def complete(
    asked: Position, socket_id: str | None, epoch: str, top: int, missed: Sequence[Entry]
) -> Recovery:
    """The replay of ``missed``, only if it is exactly the events after ``asked``.

    ``missed`` must hold offsets ``asked.offset + 1`` to ``top``, each once, in
    order; anything else (an entry lost or trimmed meanwhile, one out of place) is
    ``unavailable``. Events published excluding ``socket_id`` are left out (that
    connection deliberately never got them).
    """
    current = Position(epoch, top)
    expected = asked.offset + 1
    if len(missed) != top - asked.offset or any(
        entry.offset != offset for entry, offset in zip(missed, itertools.count(expected))
    ):
        return Recovery(False, current, reason=Unrecovered.UNAVAILABLE)
    replay = tuple(
        entry for entry in missed if socket_id is None or entry.exclude_socket_id != socket_id
    )
    return Recovery(True, current, replay)


class ChannelHistory:
    """One channel's epoch, last offset and kept events (oldest first)."""

    __slots__ = ("bytes", "entries", "epoch", "last_at", "top")

    def __init__(self, epoch: str, now: float) -> None:
        self.epoch = epoch
        self.top = 0
        self.entries: deque[Entry] = deque()
        self.bytes = 0
        #: When the channel last recorded an event (or started), for position_ttl.
        self.last_at = now

    @property
    def oldest(self) -> int:
        """The oldest offset kept (``top + 1`` when none is)."""
        return self.entries[0].offset if self.entries else self.top + 1

    def append(
        self,
        event: str,
        data: str,
        exclude_socket_id: str | None,
        now: float,
        limits: HistoryLimits,
    ) -> Position:
        """Record an event; its position."""
        self.top += 1
        size = entry_size(event, data, exclude_socket_id)
        self.entries.append(Entry(self.top, now, event, data, exclude_socket_id, size))
        self.bytes += size
        self.last_at = now
        self.trim(now, limits)
        return Position(self.epoch, self.top)

    def trim(self, now: float, limits: HistoryLimits) -> None:
        """Drop the oldest events past any bound (count, bytes, age)."""
        entries = self.entries
        horizon = now - limits.max_age
        while entries and (
            len(entries) > limits.max_events
            or self.bytes > limits.max_bytes
            or entries[0].at <= horizon
        ):
            self.bytes -= entries.popleft().size

    def since(
        self, asked: Position | None, socket_id: str | None, now: float, limits: HistoryLimits
    ) -> Recovery:
        """What a client at ``asked`` gets now."""
        self.trim(now, limits)
        found = verdict(asked, self.epoch, self.top, self.oldest, limits.max_replay)
        if found is not None:
            return found
        assert asked is not None  # verdict answers a client without a position
        count = self.top - asked.offset
        entries = self.entries
        missed = list(itertools.islice(entries, len(entries) - count, None))
        return complete(asked, socket_id, self.epoch, self.top, missed)

    def expired(self, now: float, limits: HistoryLimits) -> bool:
        """Whether the channel has been quiet long enough to be forgotten."""
        ttl = limits.position_ttl if self.top else limits.max_age
        return now - self.last_at > ttl


class AppHistory:
    """One app's channel histories in memory, bounded by ``max_channels``."""

    __slots__ = ("channels",)

    def __init__(self) -> None:
        #: channel → its history, least recently used first.
        self.channels: OrderedDict[str, ChannelHistory] = OrderedDict()

    def append(
        self,
        channel: str,
        event: str,
        data: str,
        exclude_socket_id: str | None,
        now: float,
        limits: HistoryLimits,
        new_epoch: Callable[[], str],
    ) -> Position:
        """Record an event on ``channel`` (starting its history if needed); its position."""
        return self._channel(channel, now, limits, new_epoch).append(
            event, data, exclude_socket_id, now, limits
        )

    def since(
        self,
        channel: str,
        asked: Position | None,
        socket_id: str | None,
        now: float,
        limits: HistoryLimits,
        new_epoch: Callable[[], str],
    ) -> Recovery:
        """What a client at ``asked`` on ``channel`` gets now.

        A channel without history starts one (offset 0), so a client that holds no
        position yet is given one it can resume from.
        """
        return self._channel(channel, now, limits, new_epoch).since(asked, socket_id, now, limits)

    def sweep(self, now: float, limits: HistoryLimits) -> int:
        """Forget the quiet channels at the old end; how many were forgotten.

        Bounded by what it forgets: it stops at the first channel still kept
        (one used since is caught when it is next used).
        """
        channels = self.channels
        forgotten = 0
        while channels:
            name, history = next(iter(channels.items()))
            if not history.expired(now, limits):
                break
            del channels[name]
            forgotten += 1
        return forgotten

    def _channel(
        self, channel: str, now: float, limits: HistoryLimits, new_epoch: Callable[[], str]
    ) -> ChannelHistory:
        channels = self.channels
        history = channels.get(channel)
        if history is not None and history.expired(now, limits):
            del channels[channel]
            history = None
        if history is None:
            history = channels[channel] = ChannelHistory(new_epoch(), now)
            while len(channels) > limits.max_channels:
                channels.popitem(last=False)
        else:
            channels.move_to_end(channel)
        return history
