"""Token buckets: a rate, a burst, and how long to wait when empty.

Pure: the caller passes ``now`` (seconds, any monotonic origin).

:class:`TokenBucket` keeps its state in an object. :func:`take_folded` is the same
bucket folded into one float, ``full_at``: the time at which the bucket is full
again (any value at or before ``now`` means full, so ``0.0`` is a fresh bucket).
Tokens held at ``now`` are ``burst - rate * max(0, full_at - now)``. It is meant
for state kept once per connection, where an object per holder would cost about
120 bytes and the float costs one slot (the rate and burst are read from the
settings, so a live reload applies at the next take).
"""

from __future__ import annotations

__all__ = ["TokenBucket", "available_folded", "settle_folded", "take_folded"]

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


def take_folded(full_at: float, now: float, rate: float, burst: float) -> float | None:
    """Take one token from the bucket whose state is ``full_at`` (see the module note).

    The decisions are those of a :class:`TokenBucket` with the same ``rate`` and
    ``burst`` taking at the same times. ``now`` must not go backwards (a loop's
    monotonic clock): a step back is read as tokens not yet refilled.

    Args:
        full_at: the time at which the bucket is full again (``0.0``: full).
        now: the current time.
        rate: tokens added per second (> 0).
        burst: capacity (>= 1).

    Returns:
        The new ``full_at`` when a token was taken, else ``None`` (nothing taken).
    """
    start = full_at if full_at > now else now
    tokens = burst - (start - now) * rate
    if tokens + rate * _SLACK_SECONDS + 1e-9 < 1.0:
        return None
    return start + 1.0 / rate


def settle_folded(full_at: float, now: float, rate: float, burst: float) -> float:
    """The state to keep after :func:`take_folded` refused: at worst an empty bucket.

    A refused take changes nothing, but the rate or burst it was read against may
    have changed since the state was written (a live reload): time owed at a much
    lower old rate would otherwise be a debt of tokens at the new one. Kept after a
    refusal, this makes the bucket at worst empty at the current settings.
    """
    empty_at = now + burst / rate
    return full_at if full_at < empty_at else empty_at


def available_folded(full_at: float, now: float, rate: float, burst: float) -> float:
    """Tokens that a :func:`take_folded` at ``now`` could use."""
    return burst - max(0.0, full_at - now) * rate
