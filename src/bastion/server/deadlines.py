"""Many connections' deadlines on a few loop timers: one per tick that has any.

Every connection has a deadline or two that almost never fires: the request head
must arrive within ``handshake_timeout``, a kept-alive connection may idle so
long, a closing one is aborted if it has not drained after its grace. A loop
timer each costs an allocation, a heap insertion and a cancellation (or a
callback that finds nothing to do) per connection; in a reconnect storm that was
a measurable share of a connection's cost (``docs/decisions/0021-connect-path.md``).

So deadlines are kept in slots of :data:`TICK` seconds: a deadline joins the slot
of the first tick at or after it, and only the first deadline of a slot sets a
loop timer, for that tick. Leaving a slot is a set removal. A deadline fires
**never early and at most one tick late**; the owner is told through
:meth:`Expiring.expire` and decides for itself (a moved deadline joins a later
slot again).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Protocol

__all__ = ["TICK", "Deadlines", "Expiring"]

log = logging.getLogger("bastion.deadlines")

#: The slots' width, in seconds: how late a deadline may fire.
TICK = 0.05


class Expiring(Protocol):
    """Something with a deadline: told once the deadline has passed."""

    def expire(self) -> None:
        """The deadline this was added for has passed."""
        ...


class Deadlines:
    """Deadlines in slots of ``tick`` seconds of ``loop`` time, one timer per slot in use.

    Args:
        loop: whose clock and timers are used (``time``, ``call_at``).
        tick: the slots' width in seconds.
    """

    __slots__ = ("_slots", "loop", "tick")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = TICK) -> None:
        self.loop = loop
        self.tick = tick
        self._slots: dict[int, set[Expiring]] = {}

    def add(self, when: float, owner: Expiring) -> int:
        """Tell ``owner`` once loop time ``when`` has passed; its slot, for :meth:`discard`."""
        index = math.ceil(when / self.tick)
        slot = self._slots.get(index)
        if slot is None:
            slot = self._slots[index] = set()
            self.loop.call_at(index * self.tick, self._fire, index)
        slot.add(owner)
        return index

    def discard(self, index: int, owner: Expiring) -> None:
        """``owner`` no longer waits in slot ``index`` (nothing if it was told already)."""
        slot = self._slots.get(index)
        if slot is not None:
            slot.discard(owner)

    def __len__(self) -> int:
        """How many deadlines wait."""
        return sum(map(len, self._slots.values()))

    def _fire(self, index: int) -> None:
        for owner in self._slots.pop(index, ()):
            try:
                owner.expire()
            except Exception:  # one owner's defect does not spare the others
                log.exception("internal error at a connection's deadline")
