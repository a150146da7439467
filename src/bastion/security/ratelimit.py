"""Token buckets: a rate, a burst, and how long to wait when empty.

Pure: the caller passes ``now`` (seconds, any monotonic origin).
"""

from __future__ import annotations

__all__ = ["TokenBucket"]

#: Float slack, in seconds: a token due after exactly 1/rate (or retry_after) must
#: be granted even when ``now`` is a large monotonic reading (ulp(1e8 s) is 1.5e-8 s).
_SLACK_SECONDS = 1e-7


class TokenBucket:
    """A bucket refilled at ``rate`` tokens per second, holding at most ``burst``.

    Args:
        rate: tokens added per second (> 0).
        burst: capacity, and the number of tokens the bucket starts with (>= 1).
        now: the time the bucket is created.
    """

    __slots__ = ("_tokens", "_updated", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens if available.

        Returns:
            0.0 when the tokens were taken, else the seconds until they would be
            (the ``Retry-After``); nothing is taken in that case.
        """
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._updated = max(self._updated, now)
        if self._tokens + self.rate * _SLACK_SECONDS + 1e-9 >= cost:
            self._tokens = max(0.0, self._tokens - cost)
            return 0.0
        return (cost - self._tokens) / self.rate

    def available(self, now: float) -> float:
        """Tokens that a :meth:`take` at ``now`` could use."""
        elapsed = max(0.0, now - self._updated)
        return min(self.burst, self._tokens + elapsed * self.rate)
