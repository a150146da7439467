"""Pusher's throttle on subscription counts, as one pure object with ``now`` passed in.

On a channel with more than :data:`COUNT_THROTTLE_THRESHOLD` subscribers, the
``pusher_internal:subscription_count`` event and the ``subscription_count``
webhook go out at most once every :data:`COUNT_THROTTLE_SECONDS`; the latest count
of a channel that went quiet is sent when its interval is over. This is the one
place that rule is decided: the cluster state runs it before it announces a
count, and the event and the webhook both follow that announcement.
"""

from __future__ import annotations

__all__ = ["COUNT_THROTTLE_SECONDS", "COUNT_THROTTLE_THRESHOLD", "CountThrottle"]

#: Above this many subscribers a channel's subscription_count is throttled ...
COUNT_THROTTLE_THRESHOLD = 100
#: ... to one every this many seconds.
COUNT_THROTTLE_SECONDS = 5.0

_Key = tuple[str, str]


class CountThrottle:
    """At most one count per ``interval`` on channels above ``threshold``.

    A count at or below the threshold passes at once (and makes any held one
    stale). Above it, a count passes if the channel's last count, whatever its
    size, left ``interval`` ago or more; otherwise it is held, replacing any older
    held count, until :meth:`due`. Memory is bounded by the live channels: the
    owner forgets a channel when it vacates (:meth:`forget`).

    Args:
        threshold: subscribers above which counts are throttled.
        interval: seconds between two counts of a throttled channel.
    """

    __slots__ = ("_held", "_sent_at", "interval", "threshold")

    def __init__(
        self,
        threshold: int = COUNT_THROTTLE_THRESHOLD,
        interval: float = COUNT_THROTTLE_SECONDS,
    ) -> None:
        self.threshold = threshold
        self.interval = interval
        #: (app, channel) → when its last count was let through.
        self._sent_at: dict[_Key, float] = {}
        #: (app, channel) → the latest count not let through yet.
        self._held: dict[_Key, int] = {}

    def __len__(self) -> int:
        """Channels with a count held back."""
        return len(self._held)

    @property
    def tracked(self) -> int:
        """Channels remembered at all."""
        return len(self._sent_at)

    def push(self, app_id: str, channel: str, count: int, now: float) -> bool:
        """Whether ``count`` goes out now (``False``: held for :meth:`due`)."""
        key = (app_id, channel)
        sent_at = self._sent_at.get(key)
        if count <= self.threshold or sent_at is None or now - sent_at >= self.interval:
            self._held.pop(key, None)
            self._sent_at[key] = now
            return True
        self._held[key] = count
        return False

    def forget(self, app_id: str, channel: str) -> None:
        """The channel vacated (or this node left it): a held count is stale."""
        key = (app_id, channel)
        self._held.pop(key, None)
        self._sent_at.pop(key, None)

    def due(self, now: float) -> list[tuple[str, str, int]]:
        """The held counts ``(app_id, channel, count)`` that may go out at ``now``."""
        out: list[tuple[str, str, int]] = []
        for key in [k for k in self._held if now - self._sent_at[k] >= self.interval]:
            out.append((key[0], key[1], self._held.pop(key)))
            self._sent_at[key] = now
        return out

    def next_due(self) -> float | None:
        """When the first held count may go out, or ``None`` when none is held."""
        if not self._held:
            return None
        return min(self._sent_at[key] for key in self._held) + self.interval
