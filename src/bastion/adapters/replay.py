"""Replay claims held in this process: one :class:`ReplayGuard` per app.

This is the whole cluster's memory of signatures for one node, the node's own
first line of defence under the Redis claims, and (one instance shared by every
node) the in-memory cluster's.
"""

from __future__ import annotations

from bastion.protocol.signing import REPEAT_GRACE_SECONDS, REST_TIMESTAMP_WINDOW
from bastion.security.replay import ReplayGuard, Verdict

__all__ = ["LocalReplayClaims"]


class LocalReplayClaims:
    """Implements :class:`~bastion.adapters.base.ReplayClaims` in memory."""

    __slots__ = ("guards",)

    def __init__(self) -> None:
        #: app id → its guard.
        self.guards: dict[str, ReplayGuard] = {}

    def check(
        self, app_id: str, signature: str, timestamp: int, now: float, *, max_entries: int
    ) -> Verdict:
        """The verdict of the app's guard, at once (the claim without a coroutine)."""
        guard = self.guards.get(app_id)
        if guard is None:
            guard = self.guards[app_id] = ReplayGuard(
                window_seconds=REST_TIMESTAMP_WINDOW,
                max_entries=max_entries,
                repeat_grace_seconds=REPEAT_GRACE_SECONDS,
            )
        elif guard.max_entries != max_entries:
            # A live reload: the guard keeps what it remembers and applies the new
            # bound at its next signature (what it then forgets goes behind its
            # horizon, so it can never be replayed).
            guard.max_entries = max_entries
        return guard.check(signature, timestamp, now)

    async def claim(
        self, app_id: str, signature: str, timestamp: int, now: float, *, max_entries: int
    ) -> Verdict:
        """Claim a verified signature in this process's memory."""
        return self.check(app_id, signature, timestamp, now, max_entries=max_entries)
