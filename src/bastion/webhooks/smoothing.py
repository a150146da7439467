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

The other timing rule of Pusher's webhooks, the throttle on ``subscription_count``,
is applied once for both the event and the webhook where counts are announced
(:mod:`bastion.protocol.counts`).
"""

from __future__ import annotations

from bastion.core import events as ev

__all__ = ["DEFAULT_MAX_HELD", "Smoother"]

#: Held events at most; past it the oldest is released early (sent, not dropped), so
#: churn on millions of channels costs bounded memory and only loses some smoothing.
DEFAULT_MAX_HELD = 100_000

_Key = tuple[str, str, str | None]


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
