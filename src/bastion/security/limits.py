"""Keyed rate limits: one token bucket per key (an address, an app), bounded in memory.

:class:`RateLimiter` is the interface the server uses; :class:`MemoryRateLimiter`
implements it for one node; :class:`bastion.security.shared_limits.SharedLimiter`
implements it for a cluster (a local view kept in step with Redis by
:mod:`bastion.adapters.cluster_limits`). Keys are opaque strings.

A :class:`LimiterFactory` is the seam between the two: whoever owns a limit asks
the factory for its limiter by a stable name (see :data:`LIMITER_NAMES`), and the
node decides which implementation answers. :func:`memory_limiters` is the default.

Memory is bounded by ``max_keys``. A bucket that has refilled to its burst
carries no state (a new bucket would start the same), so those are dropped
first; when none is, the least recently used bucket goes. Evicting a bucket
that is not full forgets some debt: the key starts afresh. That is the price of
a bound, and it only happens once ``max_keys`` distinct keys are active at once.

Pure: the caller passes ``now`` (seconds; one clock per limiter).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from bastion.security.ratelimit import _SLACK_SECONDS, TokenBucket

__all__ = [
    "DEFAULT_MAX_KEYS",
    "LIMITER_NAMES",
    "LimiterFactory",
    "MemoryRateLimiter",
    "RateLimiter",
    "memory_limiters",
    "retry_after_seconds",
]

#: Buckets a per-address limiter keeps at most (a few MB), by default.
DEFAULT_MAX_KEYS = 100_000

#: The limits a node asks a :class:`LimiterFactory` for, by name. A name is part of
#: the Redis key of a cluster-wide bucket, so it must not change between releases.
LIMITER_NAMES = {
    "new_conn_ip": "security.new_connections_per_ip",
    "rest_ip": "security.rest_requests_per_ip",
    "auth_fail_ip": "security.auth_failures_per_ip",
    "rest_app": "apps.rest_requests",
    "client_events_app": "apps.client_events_per_app",
    "client_event_user": "apps.client_event_limits (per_user)",
    "rest_event_app": "apps.rest_event_limits",
    "user_errors": "apps.user_error_budget",
}


def retry_after_seconds(wait: float) -> int:
    """The ``Retry-After`` value for a wait: whole seconds, rounded up, at least 1."""
    if not math.isfinite(wait):
        return 1
    return max(1, math.ceil(wait))


class RateLimiter(Protocol):
    """Token buckets by key: ``rate`` tokens a second, at most ``burst`` at once."""

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens from ``key``'s bucket if it holds them.

        Returns:
            0.0 when taken; else the seconds until they would be (nothing taken).
        """
        ...

    def peek(self, key: str, now: float, cost: float = 1.0) -> float:
        """What :meth:`take` would answer, without taking anything or storing ``key``."""
        ...

    def available(self, key: str, now: float) -> float:
        """Tokens ``key`` could use at ``now``."""
        ...


class LimiterFactory(Protocol):
    """Builds the limiter of one named limit (the seam between one node and a cluster)."""

    def __call__(
        self, name: str, rate: float, burst: float, max_keys: int, clock: Callable[[], float]
    ) -> RateLimiter:
        """A limiter of ``rate`` tokens a second and ``burst`` at most per key.

        Args:
            name: which limit (a key of :data:`LIMITER_NAMES`).
            rate: tokens added per second (> 0).
            burst: capacity per key (>= 1).
            max_keys: the most keys held in memory at once.
            clock: the clock the caller passes as ``now`` (a cluster-wide limiter
                reads it when an answer from other nodes arrives; never called here).
        """
        ...


def memory_limiters(
    name: str, rate: float, burst: float, max_keys: int, clock: Callable[[], float]
) -> RateLimiter:
    """The default :class:`LimiterFactory`: a :class:`MemoryRateLimiter` (one node)."""
    del name, clock  # one node needs neither
    return MemoryRateLimiter(rate, burst, max_keys)


class MemoryRateLimiter:
    """An in-process :class:`RateLimiter` holding at most ``max_keys`` buckets.

    Args:
        rate: tokens added per second to each bucket (> 0).
        burst: each bucket's capacity and starting tokens (>= 1).
        max_keys: the most buckets held at once (>= 1).
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        #: Least recently used first.
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        """Buckets held now."""
        return len(self._buckets)

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens from ``key``'s bucket (see :meth:`RateLimiter.take`)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now, cost)

    def peek(self, key: str, now: float, cost: float = 1.0) -> float:
        """What :meth:`take` would answer now; stores nothing, so a read cannot grow memory."""
        tokens = self.available(key, now)
        # The same float slack as TokenBucket.take, so peek and take never disagree.
        if tokens + self.rate * _SLACK_SECONDS + 1e-9 >= cost:
            return 0.0
        return (cost - tokens) / self.rate

    def available(self, key: str, now: float) -> float:
        """Tokens ``key`` could use at ``now`` (a key never seen has a full bucket)."""
        bucket = self._buckets.get(key)
        return float(self.burst) if bucket is None else bucket.available(now)

    def _make_room(self, now: float) -> None:
        buckets = self._buckets
        if len(buckets) < self.max_keys:
            return
        # Full buckets are stateless: drop them, oldest first. The least recently
        # used end is where they gather, so this stops at the first busy bucket and
        # costs O(1) amortised (each bucket is dropped at most once).
        while buckets:
            key, bucket = next(iter(buckets.items()))
            if bucket.available(now) < bucket.burst:
                break
            del buckets[key]
        while len(buckets) >= self.max_keys:
            buckets.popitem(last=False)
