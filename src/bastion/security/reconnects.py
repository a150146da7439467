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
oldest forgotten first (a close older than the window is remembered until then,
but never matched). Every connection's life runs through here, so each call is a
dictionary operation or two, inline.
"""

from __future__ import annotations

__all__ = ["MAX_REMEMBERED_CLOSES", "RECONNECT_WINDOW_SECONDS", "Reconnects"]

#: Seconds after a close within which an arrival from the same address or user is a
#: reconnect. pusher-js retries after about a second and backs off to tens of seconds.
RECONNECT_WINDOW_SECONDS = 30.0
#: Closes remembered per rule at most (a few MB at worst): 20,000 closes within the
#: window is over 600 a second, a storm's rate.
MAX_REMEMBERED_CLOSES = 20_000


class Reconnects:
    """Both rules of the module docstring, for one node.

    Args:
        window_seconds: :data:`RECONNECT_WINDOW_SECONDS` (> 0).
        max_entries: :data:`MAX_REMEMBERED_CLOSES` per rule (>= 1).
    """

    __slots__ = ("_by_address", "_by_user", "max_entries", "window_seconds")

    def __init__(
        self,
        window_seconds: float = RECONNECT_WINDOW_SECONDS,
        max_entries: int = MAX_REMEMBERED_CLOSES,
    ) -> None:
        if not window_seconds > 0:
            raise ValueError("window_seconds must be > 0")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.window_seconds = float(window_seconds)
        self.max_entries = max_entries
        #: (app id, address) and (app id, user id) → when it last closed, oldest
        #: first (a key that closes again moves to the end).
        self._by_address: dict[tuple[str, str], float] = {}
        self._by_user: dict[tuple[str, str], float] = {}

    def remembered(self) -> tuple[int, int]:
        """Closes remembered now: by address, by user."""
        return len(self._by_address), len(self._by_user)

    def closed(self, app_id: str, ip: str | None, user_id: str | None, now: float) -> None:
        """A connection of ``app_id`` from ``ip``, signed in as ``user_id``, closed at ``now``."""
        if ip is not None:
            closes = self._by_address
            key = (app_id, ip)
            closes.pop(key, None)
            closes[key] = now
            if len(closes) > self.max_entries:
                del closes[next(iter(closes))]
        if user_id is not None:
            closes = self._by_user
            key = (app_id, user_id)
            closes.pop(key, None)
            closes[key] = now
            if len(closes) > self.max_entries:
                del closes[next(iter(closes))]

    def arrived(self, app_id: str, ip: str | None, opened_at: float) -> bool:
        """Whether a connection opening at ``opened_at`` from ``ip`` is a reconnect."""
        if ip is None:
            return False
        return self._take(self._by_address, (app_id, ip), opened_at)

    def signed_in(self, app_id: str, user_id: str, opened_at: float) -> bool:
        """Whether a connection opened at ``opened_at``, now signed in as ``user_id``, is one."""
        return self._take(self._by_user, (app_id, user_id), opened_at)

    def _take(self, closes: dict[tuple[str, str], float], key: tuple[str, str], at: float) -> bool:
        """Whether ``key`` closed within the window before ``at``; forgets that close."""
        closed_at = closes.get(key)
        if closed_at is None or not 0.0 <= at - closed_at <= self.window_seconds:
            return False
        del closes[key]
        return True
