"""Frames held for one connection while its transport is paused, bounded by bytes.

Why it exists. A connection's outbound bytes may wait in two places: the
transport's own buffer (asyncio's or uvloop's, behind the kernel's socket
buffer) and, past the transport's high-water mark, here. The transport's mark is
small and fixed (:data:`TRANSPORT_HIGH_WATER`) and ``max_write_buffer_kb`` bounds
the two together. The split is what lets a slow consumer's close reach it: the
transport can only append, so a close frame written to it waits behind whatever
it already holds; with a 1 MiB transport buffer a client on a slow link never
got the frame before the close grace ran out (it saw 1006 and learnt nothing).
Frames held here are not yet the transport's, so the cut drops them (counted)
and writes its ``pusher:error`` and close frame behind at most the small
transport buffer.

What it holds. Whole frames, in the order written, one per entry: whatever is
released to the transport is a sequence of complete frames, so what follows it
on the wire (more frames, or the close) starts on a frame boundary.

The states, driven by :class:`~bastion.server.websocket.WebSocketConnection`:

* no overflow (``None``, what every connection that keeps up has): frames go
  straight to the transport;
* **paused** (made by ``pause_writing``): frames are held while they fit;
* released (``resume_writing``): held frames go to the transport, a slice of
  at most :data:`TRANSPORT_HIGH_WATER` bytes at a time, until the transport
  pauses again or nothing is held (then the connection drops the overflow);
* **spilled** (a frame did not fit): everything held is dropped and nothing is
  held any more; the connection is cut.
"""

from __future__ import annotations

from collections import deque

__all__ = ["TRANSPORT_HIGH_WATER", "Overflow"]

#: The transport's high-water mark, in bytes: what a close frame may wait behind in
#: user space (plus the one write that passed the mark). 64 KiB is 0.5 s at 1 Mbit/s,
#: well inside the close grace, and enough that a client keeping up never pauses.
TRANSPORT_HIGH_WATER = 64 * 1024


class Overflow:
    """Frames held for one connection while its transport is paused.

    Args:
        limit: bytes it may hold (``max_write_buffer_kb`` less what the transport
            held when it paused).

    Attributes:
        limit: the bound, in bytes.
        size: bytes held now.
        paused: whether the transport has paused and not resumed since.
        spilled: whether a frame did not fit (then nothing is held any more).
    """

    __slots__ = ("_frames", "limit", "paused", "size", "spilled")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.paused = True
        self.spilled = False
        self._frames: deque[bytes] = deque()

    def __len__(self) -> int:
        """Frames held now."""
        return len(self._frames)

    def hold(self, frame: bytes) -> bool:
        """Hold ``frame`` behind the others; ``False``, holding nothing, if it does not fit.

        A spilled overflow holds nothing: every frame is refused.
        """
        size = self.size + len(frame)
        if size > self.limit or self.spilled:
            return False
        self._frames.append(frame)
        self.size = size
        return True

    def take(self, budget: int) -> bytes | None:
        """The oldest frames held, joined, at most ``budget`` bytes (but at least one).

        Returns:
            ``None`` when nothing is held.
        """
        frames = self._frames
        if not frames:
            return None
        first = frames.popleft()
        size = len(first)
        if not frames or size + len(frames[0]) > budget:
            self.size -= size
            return first
        taken = [first]
        while frames and size + len(frames[0]) <= budget:
            frame = frames.popleft()
            taken.append(frame)
            size += len(frame)
        self.size -= size
        return b"".join(taken)

    def spill(self) -> tuple[int, int]:
        """Drop every frame held and hold none from now on.

        Returns:
            The frames and the bytes dropped (``(0, 0)`` when it had spilled already).
        """
        dropped = (len(self._frames), self.size)
        self._frames.clear()
        self.size = 0
        self.spilled = True
        return dropped
