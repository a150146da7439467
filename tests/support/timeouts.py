"""One knob for every time-out in the test suite, and the waits built on it.

Slow or loaded machines (CI, sanitiser builds, ``coverage run``) set
``BASTION_TEST_TIMEOUT_SCALE`` (e.g. ``3``) instead of each test growing its own
magic numbers. Every wait in the tests goes through this module:

* :func:`scaled` — a number of seconds, times the scale;
* :func:`within` — await something, failing the test after ``scaled(seconds)``;
* :func:`until` — wait until a condition holds, polling it, failing after
  ``scaled(seconds)``.

Nothing in the suite sleeps to synchronise: a test waits for the state it needs.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = [
    "DEFAULT_WAIT",
    "ENV_VAR",
    "POLL_INTERVAL",
    "scale_factor",
    "scaled",
    "until",
    "within",
]

T = TypeVar("T")

ENV_VAR = "BASTION_TEST_TIMEOUT_SCALE"

#: Seconds any single expected frame, close, response or condition may take.
DEFAULT_WAIT = 5.0

#: Seconds between two looks at a condition in :func:`until` (never a deadline).
POLL_INTERVAL = 0.01


def scale_factor() -> float:
    """Return the current time-out multiplier (default 1).

    Read on every call so a test (or ``monkeypatch.setenv``) can change it.

    Raises:
        ValueError: if the variable is set to something that is not a positive number;
            a silently ignored typo would hide why a run on a slow machine times out.
    """
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be a positive number, got {raw!r}") from None
    if not factor > 0 or factor == float("inf"):
        raise ValueError(f"{ENV_VAR} must be a positive finite number, got {raw!r}")
    return factor


def scaled(seconds: float) -> float:
    """Return ``seconds`` multiplied by ``BASTION_TEST_TIMEOUT_SCALE``."""
    return seconds * scale_factor()


async def within(awaitable: Awaitable[T], seconds: float = DEFAULT_WAIT) -> T:
    """Await ``awaitable``; raise ``TimeoutError`` after ``scaled(seconds)``."""
    return await asyncio.wait_for(awaitable, scaled(seconds))


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    seconds: float = DEFAULT_WAIT,
    *,
    interval: float = POLL_INTERVAL,
    message: str | Callable[[], str] = "condition not reached in time",
) -> None:
    """Wait until ``condition()`` (sync or async) is true; fail after ``scaled(seconds)``.

    The condition is checked at once, then every ``interval`` seconds (a poll
    interval, not a synchronisation: the deadline is what bounds the wait). An
    async condition still running at the deadline is cancelled.

    Raises:
        AssertionError: the condition still does not hold at the deadline;
            ``message`` (or what it returns) says which.
    """
    scope = asyncio.timeout(scaled(seconds))
    try:
        async with scope:
            while True:
                result = condition()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(interval)
    except TimeoutError:
        if not scope.expired():
            raise  # the condition's own wait timed out: let it say so
        raise AssertionError(message() if callable(message) else message) from None
