"""Replay guard for signed REST requests: each signature is accepted once.

Pure: the caller passes ``now`` (Unix seconds, the same wall clock that the
signature's ±600 s timestamp check uses).

Why the memory is bounded: a signed request whose ``auth_timestamp`` is more
than ``window_seconds`` from ``now`` is refused by the signature check before
it reaches the guard, so a signature only needs remembering until
``timestamp + window_seconds``; after that it cannot verify again anyway.
Entries are kept in a heap ordered by that expiry, so each is pushed once and
popped once (O(log n) per request, amortised; no scans).

A hard cap (``max_entries``) bounds memory even under a flood of distinct,
validly signed requests. When the guard is full after dropping expired
entries it **fails closed**: a new signature is refused (:attr:`Verdict.FULL`)
rather than an old one forgotten, because forgetting would make that old
request replayable again.

The official SDKs sign with a whole-second ``auth_timestamp`` and no nonce,
so two identical requests made within the same second carry the same
signature and are indistinguishable from a replay. ``repeat_grace_seconds``
accepts repeats of a signature for that long after its first acceptance
(measured on the server's clock), which keeps such loops working while a
replay later than the grace is refused. ``0`` makes the guard strict.
"""

from __future__ import annotations

import enum
import heapq

__all__ = ["ReplayGuard", "Verdict"]


class Verdict(enum.Enum):
    """The guard's answer for one request."""

    ACCEPTED = "accepted"
    #: Seen before, still inside its window, and past the repeat grace (or too old
    #: for the guard to vouch for).
    REPLAYED = "replayed"
    #: A new signature, but the guard is at ``max_entries`` (fail closed).
    FULL = "full"


class ReplayGuard:
    """Remembers accepted signatures until their timestamp leaves the window.

    Args:
        window_seconds: how long after its ``auth_timestamp`` a signature can
            still verify (the signature check's window).
        max_entries: the most signatures remembered at once; beyond it new
            signatures are refused (fail closed).
        repeat_grace_seconds: repeats of a signature within this many seconds
            of its first acceptance are accepted (see the module docstring).
    """

    __slots__ = ("_expiries", "_seen", "max_entries", "repeat_grace_seconds", "window_seconds")

    def __init__(
        self,
        window_seconds: float = 600,
        max_entries: int = 100_000,
        repeat_grace_seconds: float = 0.0,
    ) -> None:
        if window_seconds < 0 or max_entries < 1 or repeat_grace_seconds < 0:
            raise ValueError("window_seconds >= 0, max_entries >= 1, repeat_grace_seconds >= 0")
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self.repeat_grace_seconds = repeat_grace_seconds
        #: signature → (expires_at, first accepted at)
        self._seen: dict[str, tuple[float, float]] = {}
        #: (expires_at, signature), a min-heap; one entry per remembered signature.
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        """Signatures remembered (expired ones are dropped on the next check)."""
        return len(self._seen)

    def _expire(self, now: float) -> None:
        expiries, seen = self._expiries, self._seen
        while expiries and expiries[0][0] < now:
            _, signature = heapq.heappop(expiries)
            del seen[signature]

    def check(self, signature: str, timestamp: int, now: float) -> Verdict:
        """Decide on one request whose signature has already verified; remember it.

        Args:
            signature: the request's ``auth_signature``.
            timestamp: its ``auth_timestamp`` (Unix seconds).
            now: the current Unix time.
        """
        self._expire(now)
        entry = self._seen.get(signature)
        if entry is not None:
            if now - entry[1] <= self.repeat_grace_seconds:
                return Verdict.ACCEPTED
            return Verdict.REPLAYED
        expires_at = timestamp + self.window_seconds
        if expires_at < now:
            # Older than the window: the signature check refuses these first. Were a
            # caller's window wider than ours, we could not remember this one long
            # enough to catch its replay, so refuse it (fail closed).
            return Verdict.REPLAYED
        if len(self._seen) >= self.max_entries:
            return Verdict.FULL
        self._seen[signature] = (expires_at, now)
        heapq.heappush(self._expiries, (expires_at, signature))
        return Verdict.ACCEPTED

    def check_and_remember(self, signature: str, timestamp: int, now: float) -> bool:
        """``True`` when the request may proceed (see :meth:`check`)."""
        return self.check(signature, timestamp, now) is Verdict.ACCEPTED
