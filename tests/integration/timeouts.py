"""Every wait in the integration tests, scaled by one knob.

Slow or loaded machines set ``BASTION_TEST_TIMEOUT_SCALE`` (e.g. ``3``) instead of
each test growing its own magic numbers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["DEFAULT_WAIT", "poll", "scaled", "within"]

T = TypeVar("T")

#: Seconds any single expected frame, close or response may take to arrive.
DEFAULT_WAIT = 5.0


def scaled(seconds: float) -> float:
    """``seconds`` multiplied by ``BASTION_TEST_TIMEOUT_SCALE`` (default 1)."""
    return seconds * float(os.environ.get("BASTION_TEST_TIMEOUT_SCALE", "1"))


async def within(awaitable: Awaitable[T], seconds: float = DEFAULT_WAIT) -> T:
    """Await ``awaitable``, failing the test after ``scaled(seconds)``."""
    return await asyncio.wait_for(awaitable, scaled(seconds))


async def poll(predicate: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, failing after ``scaled(seconds)``."""
    deadline = time.monotonic() + scaled(seconds)
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)
