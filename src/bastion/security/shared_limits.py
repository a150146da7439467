"""A cluster-wide rate limit as seen by one node: a local view kept in step with Redis.

:class:`SharedLimiter` is a :class:`~bastion.security.limits.RateLimiter` whose
:meth:`~SharedLimiter.take` answers at once from this node's *view* of each key's
bucket, and counts what it grants. The I/O side
(:mod:`bastion.adapters.cluster_limits`) periodically asks :meth:`~SharedLimiter.due`
which keys to send, applies their consumption to the shared bucket in Redis, and
hands the cluster's remaining tokens back through :meth:`~SharedLimiter.settle`;
the view then becomes that remainder (minus what was granted meanwhile), so once
the cluster's bucket is empty every node refuses. See
docs/decisions/0007-cluster-rate-limits.md for the numbers.

The local pre-filter: a key is sent only when

* it was never synced on this node (a new key learns the cluster's state at once);
* its view is *near* the limit (below :data:`NEAR_FRACTION` of the burst);
* the cluster said it is *hot* (its bucket was near empty) a moment ago, here or
  through another node's notice (:meth:`~SharedLimiter.notice`);
* or what it granted unsent reaches :data:`REPORT_FRACTION` of the burst, so the
  cluster sees the sum of many nodes each far from the limit.

A key far from its limit otherwise costs no Redis call at all.

The view may go below zero (down to minus the burst): the cluster's bucket holds
the debt that nodes granted between two syncs, and every node pays it back before
granting again, which keeps a saturated key's long-run rate at ``rate`` however
many nodes share it.

Memory is bounded by ``max_keys``, as :class:`~bastion.security.limits.MemoryRateLimiter`:
idle keys (view full, nothing unsent, not hot) are dropped first, then the least
recently used.

Pure: the caller passes ``now`` (one clock per limiter, :attr:`SharedLimiter.clock`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from bastion.security.ratelimit import _SLACK_SECONDS

__all__ = [
    "HOT_MIN_SECONDS",
    "NEAR_FRACTION",
    "REPORT_FRACTION",
    "SharedLimiter",
]

#: A view below this fraction of the burst is near the limit: synced every interval.
NEAR_FRACTION = 0.5
#: A key far from the limit reports what it granted once it reaches this fraction
#: of the burst (at least one token).
REPORT_FRACTION = 0.1
#: A key the cluster found near empty stays hot on a node at least this long (the
#: Redis script repeats its notice at most once per this period).
HOT_MIN_SECONDS = 1.0


class _View:
    """One key's bucket as this node sees it, and what it granted unsent."""

    __slots__ = ("hot_until", "pending", "synced", "tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        #: Tokens granted here and not yet sent to the cluster.
        self.pending = 0.0
        #: Whether the cluster has answered for this key on this node.
        self.synced = False
        #: Until when the key is hot (synced on every grant), by the limiter's clock.
        self.hot_until = -math.inf

    def refill(self, now: float, rate: float, burst: float) -> float:
        if now > self.updated:
            self.tokens = min(burst, self.tokens + (now - self.updated) * rate)
            self.updated = now
        return self.tokens


class SharedLimiter:
    """A node's view of a cluster-wide :class:`~bastion.security.limits.RateLimiter`.

    Args:
        name: the limit's name (part of the shared bucket's key).
        rate: tokens added per second to each bucket (> 0).
        burst: each bucket's capacity and starting tokens (>= 1).
        max_keys: the most keys held at once (>= 1).
        clock: the clock its callers pass as ``now``; read only by the I/O side,
            when an answer arrives.
    """

    __slots__ = (
        "__weakref__",
        "_due",
        "_views",
        "burst",
        "clock",
        "floor",
        "max_keys",
        "name",
        "near",
        "rate",
        "report",
    )

    def __init__(
        self,
        name: str,
        rate: float,
        burst: float,
        max_keys: int,
        clock: Callable[[], float],
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.name = name
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        #: Below this a view (or the cluster's remainder) is near the limit.
        self.near = self.burst * NEAR_FRACTION
        #: Unsent grants that are worth a Redis call even far from the limit.
        self.report = max(1.0, self.burst * REPORT_FRACTION)
        #: The lowest a bucket goes: the debt nodes may run up between two syncs.
        self.floor = -self.burst
        #: Least recently used first.
        self._views: OrderedDict[str, _View] = OrderedDict()
        #: Keys to send at the next sync (an ordered set).
        self._due: dict[str, None] = {}

    def __len__(self) -> int:
        """Keys held now."""
        return len(self._views)

    # --- the RateLimiter protocol -----------------------------------------------------

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens from this node's view of ``key`` (0.0, or the wait)."""
        view = self._views.get(key)
        if view is None:
            self._make_room(now)
            view = self._views[key] = _View(self.burst, now)
        else:
            self._views.move_to_end(key)
        tokens = view.refill(now, self.rate, self.burst)
        if tokens + self.rate * _SLACK_SECONDS + 1e-9 < cost:
            return (cost - tokens) / self.rate
        view.tokens = max(self.floor, tokens - cost)
        view.pending += cost
        if (
            not view.synced
            or view.tokens < self.near
            or now < view.hot_until
            or view.pending >= self.report
        ):
            self._due[key] = None
        return 0.0

    def peek(self, key: str, now: float, cost: float = 1.0) -> float:
        """What :meth:`take` would answer now; stores nothing."""
        tokens = self.available(key, now)
        if tokens + self.rate * _SLACK_SECONDS + 1e-9 >= cost:
            return 0.0
        return (cost - tokens) / self.rate

    def available(self, key: str, now: float) -> float:
        """Tokens this node's view of ``key`` holds at ``now`` (negative while in debt)."""
        view = self._views.get(key)
        if view is None:
            return self.burst
        if now <= view.updated:
            return view.tokens
        return min(self.burst, view.tokens + (now - view.updated) * self.rate)

    # --- the sync (called by the I/O side) ----------------------------------------------

    def due(self) -> list[tuple[str, float]]:
        """The keys to send now and what each granted since its last send.

        Their unsent grants are handed over (reset to zero): the caller must follow
        with :meth:`settle` for each key, or :meth:`failed`.
        """
        out: list[tuple[str, float]] = []
        for key in self._due:
            view = self._views.get(key)
            if view is None:  # evicted meanwhile: its debt is forgotten with it
                continue
            out.append((key, view.pending))
            view.pending = 0.0
        self._due.clear()
        return out

    @property
    def has_due(self) -> bool:
        """Whether a key waits to be sent."""
        return bool(self._due)

    def settle(self, key: str, remainder: float, now: float) -> None:
        """The cluster's bucket of ``key`` holds ``remainder`` tokens after our grants.

        The view becomes that, less what this node granted since it sent them; a
        remainder near empty makes the key hot here.
        """
        view = self._views.get(key)
        if view is None:
            return
        view.tokens = min(self.burst, max(self.floor, remainder - view.pending))
        view.updated = max(view.updated, now)
        view.synced = True
        self._heat(view, remainder, now)
        if view.pending > 0 and (view.tokens < self.near or now < view.hot_until):
            self._due[key] = None

    def failed(self) -> None:
        """The sync failed (Redis unreachable): what was handed over is not sent again.

        The views keep limiting on this node alone; grants made during an outage
        are never charged to the cluster later (they would arrive stale).
        """

    def notice(self, key: str, remainder: float, now: float) -> bool:
        """Another node found ``key``'s cluster bucket near empty (``remainder`` now).

        Only a key this node holds is affected (a key it never saw is synced on its
        first grant anyway): its view is capped at the remainder, less what it
        granted unsent, and it turns hot. Returns whether the key was held.
        """
        view = self._views.get(key)
        if view is None:
            return False
        tokens = view.refill(now, self.rate, self.burst)
        view.tokens = max(self.floor, min(tokens, remainder - view.pending))
        self._heat(view, remainder, now)
        return True

    def hot(self, key: str, now: float) -> bool:
        """Whether ``key`` is hot on this node at ``now``."""
        view = self._views.get(key)
        return view is not None and now < view.hot_until

    def synced(self, key: str) -> bool:
        """Whether the cluster has answered for ``key`` on this node."""
        view = self._views.get(key)
        return view is not None and view.synced

    def _heat(self, view: _View, remainder: float, now: float) -> None:
        if remainder < self.near:
            # Hot until the cluster's bucket could be back above the near mark.
            until = now + max(HOT_MIN_SECONDS, (self.near - remainder) / self.rate)
            view.hot_until = max(view.hot_until, until)

    def _make_room(self, now: float) -> None:
        views = self._views
        if len(views) < self.max_keys:
            return
        # Idle views carry nothing the cluster lacks: drop them first, oldest first.
        while views:
            key, view = next(iter(views.items()))
            if (
                view.pending > 0
                or now < view.hot_until
                or view.refill(now, self.rate, self.burst) < self.burst
            ):
                break
            del views[key]
        while len(views) >= self.max_keys:
            key, _ = views.popitem(last=False)
            self._due.pop(key, None)
