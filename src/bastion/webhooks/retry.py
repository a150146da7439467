"""When to try a webhook delivery again, and when to give up. Pure: time and jitter are arguments.

The rules:

* a 2xx answer means delivered;
* a network error or time-out (``status=None``), a 5xx or a 429 is retried after an
  exponential back-off with jitter: attempt *n* waits a random time in
  ``[b/2, b)`` with ``b = min(retry_max, retry_initial * 2**(n-1))`` ("equal
  jitter": spread out so a receiver that comes back is not hit by every queued
  delivery at the same instant, yet never much sooner than the nominal delay);
  a numeric ``Retry-After`` (seconds) raises the wait to at least that, capped at
  ``retry_max``;
* any other status (3xx: redirects are not followed; 4xx other than 429) is a
  permanent failure: the receiver told us the request itself is wrong, so
  repeating it cannot help;
* a retryable failure of a delivery older than ``give_up_after`` (counted from
  when it was queued, or last retried by an operator) is given up instead.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["Decision", "Outcome", "classify", "decide", "delay", "parse_retry_after"]

#: Beyond this exponent the nominal delay is above any sane maximum anyway; capping it
#: keeps ``2 ** n`` finite for absurd attempt counts.
_MAX_EXPONENT: Final = 62


class Outcome(enum.Enum):
    """What one attempt's answer means."""

    DELIVERED = "delivered"
    RETRY = "retry"
    PERMANENT = "permanent"


def classify(status: int | None) -> Outcome:
    """The outcome of an attempt answered with ``status`` (``None``: no answer at all)."""
    if status is None or status == 429 or 500 <= status <= 599:
        return Outcome.RETRY
    if 200 <= status <= 299:
        return Outcome.DELIVERED
    return Outcome.PERMANENT


def delay(attempt: int, initial: float, maximum: float, jitter: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first).

    Args:
        attempt: how many attempts have failed so far (values below 1 count as 1).
        initial: nominal delay after the first failure (> 0).
        maximum: no delay is longer than this (> 0).
        jitter: a random value in ``[0, 1)`` from the caller.

    Returns:
        A delay in ``[b/2, b]`` where ``b = min(maximum, initial * 2**(attempt-1))``.
    """
    exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
    base = min(maximum, initial * math.ldexp(1.0, exponent))
    jitter = min(max(jitter, 0.0), 1.0)
    return min(maximum, max(0.0, base * (0.5 + 0.5 * jitter)))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a numeric ``Retry-After`` header; ``None`` when absent or not a number.

    The HTTP-date form is not honoured (the back-off applies then): it depends on
    the receiver's clock agreeing with ours.
    """
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a delivery after one attempt.

    Attributes:
        action: ``done`` (delivered), ``retry`` (pending again) or ``dead`` (dead letter).
        next_attempt_at: Unix seconds of the next attempt (``retry`` only, else ``None``).
        reason: why, for the dead letter's ``last_error`` (``None`` when delivered).
    """

    action: Literal["done", "retry", "dead"]
    next_attempt_at: float | None
    reason: str | None


def decide(
    *,
    status: int | None,
    error: str | None,
    retry_after: str | None,
    attempt: int,
    age_from: float,
    now: float,
    initial: float,
    maximum: float,
    give_up_after: float,
    jitter: float,
) -> Decision:
    """The decision after attempt number ``attempt`` of a delivery.

    Args:
        status: the HTTP status answered, or ``None`` after a network error or time-out.
        error: a short description of the network error (``status=None``).
        retry_after: the answer's ``Retry-After`` header, if any.
        attempt: how many attempts have been made, this one included.
        age_from: Unix seconds the give-up age counts from (queued, or retried by hand).
        now: Unix seconds now.
        initial: ``retry_initial_seconds``.
        maximum: ``retry_max_seconds``.
        give_up_after: ``give_up_after_seconds``.
        jitter: a random value in ``[0, 1)``.
    """
    outcome = classify(status)
    if outcome is Outcome.DELIVERED:
        return Decision("done", None, None)
    reason = f"HTTP {status}" if status is not None else (error or "network error")
    if outcome is Outcome.PERMANENT:
        return Decision("dead", None, f"{reason} (not retried)")
    if now - age_from > give_up_after:
        return Decision("dead", None, f"{reason} (gave up after {give_up_after:g} s)")
    wait = delay(attempt, initial, maximum, jitter)
    asked = parse_retry_after(retry_after)
    if asked is not None:
        wait = min(maximum, max(wait, asked))
    return Decision("retry", now + wait, reason)
