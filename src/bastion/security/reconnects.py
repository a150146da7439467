"""Reconnects told from new arrivals: who closed a moment ago, by address and by user.

Pure: no clock, no I/O; ``now`` is an argument everywhere. The WebSocket
connection (:mod:`bastion.server.websocket`) reports each close and asks at each
arrival and each sign-in.

The rule. A connection is a **reconnect** when, within :data:`RECONNECT_WINDOW_SECONDS`
before it opened, a connection of the same app closed

* from the same address (asked when it opens), or
* signed in as the same user (asked when it signs in; its opening time is
  compared with the close, so a sign-in that comes late still counts).

Each close answers for one reconnect at most (the first that asks takes it), and
a connection counts once even when both rules match. Limits, by design: many
clients behind one NAT or proxy share an address, so by address it over-counts
busy networks; a user who reconnects from a new address before signing in is
only seen once signed in; a client whose previous connection has not closed yet
(the server has not noticed the drop) is a new arrival. What it is for: a storm
of reconnects (a bad deploy, a proxy cutting connections, a client loop) shows
as a rate climbing in ``bastion_reconnects_total``, next to opens and closes.

Memory is bounded: at most ``max_entries`` closes are remembered per rule,
oldest forgotten first, and a close older than the window is dropped when met.
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["MAX_REMEMBERED_CLOSES", "RECONNECT_WINDOW_SECONDS", "RecentCloses", "Reconnects"]

#: Seconds after a close within which an arrival from the same address or user is a
#: reconnect. pusher-js retries after about a second and backs off to tens of seconds.
RECONNECT_WINDOW_SECONDS = 30.0
#: Closes remembered per rule at most (a few MB at worst).
MAX_REMEMBERED_CLOSES = 50_000


class RecentCloses:
    """When each key last closed, for ``window_seconds``, at most ``max_entries`` keys.

    Args:
        window_seconds: how long a close is remembered (> 0).
        max_entries: keys remembered at most (>= 1).
    """

    __slots__ = ("_closed", "max_entries", "window_seconds")

    def __init__(self, window_seconds: float, max_entries: int) -> None:
        if not window_seconds > 0:
            raise ValueError("window_seconds must be > 0")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.window_seconds = float(window_seconds)
        self.max_entries = max_entries
        #: key → when it closed, oldest first (a key that closes again moves to the end).
        self._closed: dict[Hashable, float] = {}

    def __len__(self) -> int:
        return len(self._closed)

    def closed(self, key: Hashable, now: float) -> None:
        """``key`` closed at ``now``."""
        closed = self._closed
        closed.pop(key, None)
        closed[key] = now
        horizon = now - self.window_seconds
        while closed:
            oldest = next(iter(closed))
            if len(closed) <= self.max_entries and closed[oldest] >= horizon:
                break
            del closed[oldest]

    def take(self, key: Hashable, opened_at: float) -> bool:
        """Whether ``key`` closed within the window before ``opened_at``; forgets that close."""
        at = self._closed.get(key)
        if at is None or not 0.0 <= opened_at - at <= self.window_seconds:
            return False
        del self._closed[key]
        return True


class Reconnects:
    """Both rules of the module docstring, for one node.

    Args:
        window_seconds: :data:`RECONNECT_WINDOW_SECONDS`.
        max_entries: :data:`MAX_REMEMBERED_CLOSES` per rule.
    """

    __slots__ = ("by_address", "by_user")

    def __init__(
        self,
        window_seconds: float = RECONNECT_WINDOW_SECONDS,
        max_entries: int = MAX_REMEMBERED_CLOSES,
    ) -> None:
        self.by_address = RecentCloses(window_seconds, max_entries)
        self.by_user = RecentCloses(window_seconds, max_entries)

    def closed(self, app_id: str, ip: str | None, user_id: str | None, now: float) -> None:
        """A connection of ``app_id`` from ``ip``, signed in as ``user_id``, closed at ``now``."""
        if ip is not None:
            self.by_address.closed((app_id, ip), now)
        if user_id is not None:
            self.by_user.closed((app_id, user_id), now)

    def arrived(self, app_id: str, ip: str | None, opened_at: float) -> bool:
        """Whether a connection opening at ``opened_at`` from ``ip`` is a reconnect."""
        return ip is not None and self.by_address.take((app_id, ip), opened_at)

    def signed_in(self, app_id: str, user_id: str, opened_at: float) -> bool:
        """Whether a connection opened at ``opened_at``, now signed in as ``user_id``, is one."""
        return self.by_user.take((app_id, user_id), opened_at)
