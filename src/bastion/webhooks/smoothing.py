"""Pusher's vacated/occupied smoothing, as a pure object with ``now`` passed in.

Pusher holds ``channel_vacated`` and ``member_removed`` back for a few seconds: when
the channel (or the user, on a presence channel) comes back within that delay,
neither the vacated/removed nor the occupied/added that cancels it is sent. A page
navigation or a network blip then makes no webhook at all, and a receiver never sees
"vacated" for a channel that is in fact occupied (protocol notes, §16.3).

:class:`Smoother` decides; the producer drives it with the event loop's clock and
timers. Ordering: every event leaves in the order it was emitted, except that a held
vacated/removed leaves later (when its delay is over). Before anything else is let
through, every held event that is due is released first, so an ``channel_occupied``
that arrives just after the delay (before the timer ran) follows its
``channel_vacated``, never overtakes it. Per (app, channel) the sent sequence is
therefore always occupied, vacated, occupied, … and ends as the channel really is.

``now`` must never go backwards (a monotonic clock). Because the delay is the same for
every held event, the order they were held in is also the order they fall due, so
the pending table is one insertion-ordered dict: release is O(1) per event.

:class:`CountThrottle` is the other timing rule of Pusher's webhooks: on a channel
with more than 100 subscribers, at most one ``subscription_count`` every 5 seconds;
the latest count of a quiet-again channel is sent when its 5 seconds are over.
"""

from __future__ import annotations

from bastion.core import events as ev
from bastion.protocol import messages as msg

__all__ = [
    "COUNT_THROTTLE_SECONDS",
    "COUNT_THROTTLE_THRESHOLD",
    "DEFAULT_MAX_HELD",
    "CountThrottle",
    "Smoother",
]

#: Held events at most; past it the oldest is released early (sent, not dropped), so
#: churn on millions of channels costs bounded memory and only loses some smoothing.
DEFAULT_MAX_HELD = 100_000

_Key = tuple[str, str, str | None]

#: Above this many subscribers a channel's subscription_count webhooks are throttled,
#: to one every COUNT_THROTTLE_SECONDS (Pusher's rule, in protocol.messages).
COUNT_THROTTLE_THRESHOLD = msg.COUNT_THROTTLE_THRESHOLD
COUNT_THROTTLE_SECONDS = msg.COUNT_THROTTLE_SECONDS


class Smoother:
    """Holds vacated/removed events for ``delay`` seconds, cancelling returning pairs.

    Args:
        delay: seconds a ``channel_vacated`` / ``member_removed`` waits; ``0`` sends
            every event at once (no smoothing).
        max_held: held events at most (the oldest is released early past it).
    """

    def __init__(self, delay: float, max_held: int = DEFAULT_MAX_HELD) -> None:
        if delay < 0:
            raise ValueError("delay must not be negative")
        if max_held < 1:
            raise ValueError("max_held must be positive")
        self.delay = delay
        self.max_held = max_held
        #: key → (due time, held event), in the order they were held (= due order).
        self._held: dict[_Key, tuple[float, ev.HubEvent]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def push(self, event: ev.HubEvent, now: float) -> list[ev.HubEvent]:
        """Take one hub event at ``now``; return what to send now, in order.

        The result starts with every held event that is due, then ``event`` itself
        unless it is held (a vacated/removed) or cancels a held one (an occupied/added
        within the delay: both disappear).
        """
        out = self.due(now)
        if self.delay <= 0:
            out.append(event)
            return out
        match event:
            case ev.ChannelVacated() | ev.MemberRemoved():
                key = _key(event)
                if key not in self._held:  # a second one cannot happen without a return
                    self._held[key] = (now + self.delay, event)
                    if len(self._held) > self.max_held:
                        out.append(self._held.pop(next(iter(self._held)))[1])
            case ev.ChannelOccupied() | ev.MemberAdded():
                if self._held.pop(_key(event), None) is None:
                    out.append(event)
            case _:
                out.append(event)
        return out

    def due(self, now: float) -> list[ev.HubEvent]:
        """Release the held events whose delay is over at ``now``, oldest first."""
        out: list[ev.HubEvent] = []
        while self._held:
            key = next(iter(self._held))
            due_at, event = self._held[key]
            if due_at > now:
                break
            del self._held[key]
            out.append(event)
        return out

    def next_due(self) -> float | None:
        """When the oldest held event falls due, or ``None`` when nothing is held."""
        if not self._held:
            return None
        return next(iter(self._held.values()))[0]

    def flush(self) -> list[ev.HubEvent]:
        """Release every held event now, oldest first (shutdown: they did happen)."""
        out = [event for _, event in self._held.values()]
        self._held.clear()
        return out


def _key(event: ev.ChannelVacated | ev.ChannelOccupied | ev.MemberAdded | ev.MemberRemoved) -> _Key:
    """What cancels what: the same app and channel (and user, for members)."""
    match event:
        case ev.MemberAdded(user_id=user_id) | ev.MemberRemoved(user_id=user_id):
            return (event.app_id, event.channel, user_id)
        case _:
            return (event.app_id, event.channel, None)


class CountThrottle:
    """At most one ``subscription_count`` per ``interval`` on channels above ``threshold``.

    A count at or below the threshold passes at once (and makes any held one stale).
    Above it, a count passes if the channel's last one left ``interval`` ago or more;
    otherwise it is held, replacing any older held count, until :meth:`due`.

    Memory is bounded by the channels above the threshold: a channel is forgotten as
    soon as its count is at or below it, or it vacates.

    Args:
        threshold: subscribers above which counts are throttled.
        interval: seconds between two counts of a throttled channel.
    """

    def __init__(
        self,
        threshold: int = COUNT_THROTTLE_THRESHOLD,
        interval: float = COUNT_THROTTLE_SECONDS,
    ) -> None:
        self.threshold = threshold
        self.interval = interval
        #: (app, channel) → when its last count was let through (throttled channels).
        self._sent_at: dict[tuple[str, str], float] = {}
        #: (app, channel) → the latest count not yet let through.
        self._held: dict[tuple[str, str], ev.SubscriptionCountChanged] = {}

    def __len__(self) -> int:
        return len(self._held)

    def push(
        self, event: ev.SubscriptionCountChanged, now: float
    ) -> ev.SubscriptionCountChanged | None:
        """The count to send now, or ``None`` when it is held for later."""
        key = (event.app_id, event.channel)
        if event.subscription_count <= self.threshold:
            self._held.pop(key, None)
            self._sent_at.pop(key, None)
            return event
        sent_at = self._sent_at.get(key)
        if sent_at is None or now - sent_at >= self.interval:
            self._held.pop(key, None)
            self._sent_at[key] = now
            return event
        self._held[key] = event
        return None

    def forget(self, app_id: str, channel: str) -> None:
        """The channel vacated: a held count is stale."""
        self._held.pop((app_id, channel), None)
        self._sent_at.pop((app_id, channel), None)

    def due(self, now: float) -> list[ev.SubscriptionCountChanged]:
        """The held counts whose channel may send again at ``now``."""
        out: list[ev.SubscriptionCountChanged] = []
        for key in [k for k in self._held if now - self._sent_at[k] >= self.interval]:
            out.append(self._held.pop(key))
            self._sent_at[key] = now
        return out

    def next_due(self) -> float | None:
        """When the first held count may be sent, or ``None`` when none is held."""
        if not self._held:
            return None
        return min(self._sent_at[key] for key in self._held) + self.interval

    def flush(self) -> list[ev.SubscriptionCountChanged]:
        """Every held count now (shutdown)."""
        out = list(self._held.values())
        self._held.clear()
        return out
