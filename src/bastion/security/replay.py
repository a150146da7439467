"""Replay guard for signed REST requests: each signature is accepted once.

Pure: the caller passes ``now`` (Unix seconds, the same wall clock that the
signature's ±600 s timestamp check uses). The guard keeps the latest ``now`` it
has seen as its clock, so a wall clock stepping back cannot bring a forgotten
signature back to life.

Memory is bounded by ``max_entries`` signatures, and nothing the guard forgets
ever becomes acceptable again. It forgets in two ways:

* **Expiry.** A signed request whose ``auth_timestamp`` is more than
  ``window_seconds`` behind the clock is refused by the signature check, so a
  signature is remembered until ``timestamp + window_seconds`` and then dropped;
  from then on the guard itself refuses every request with that timestamp.
* **Eviction behind a horizon.** When the guard holds ``max_entries`` signatures
  and a new one arrives, the remembered signature with the oldest timestamp is
  forgotten, and the *horizon* rises to that timestamp: a signature that is not
  remembered and whose timestamp is at or before the horizon is refused as a
  possible replay (:attr:`Verdict.REPLAYED`). A newcomer whose timestamp is not
  newer than every remembered one is refused itself, and nothing is forgotten for
  it. The horizon never goes down.

So a fresh request is refused only when the app has accepted at least
``max_entries`` other signatures with a timestamp at or after its own. Honest
SDKs sign with the current time: with clocks in sync that takes ``max_entries``
distinct calls stamped within a second or two, and a signer whose clock lags the
app's other signers by *d* seconds is safe while their total rate times *d* stays
below ``max_entries`` (100,000: 500 s at 200 calls a second). Under a heavier
load the horizon trails the clock by about ``max_entries`` ÷ rate seconds, memory
stays at the cap, and current requests keep passing. (Before this design, a full
guard refused every new signature, fail-closed, until old ones
expired: one publisher at 167 calls a second took an app's REST API down for up
to ten minutes. See docs/decisions/0012-replay-guard-horizon.md.)

Layout, for memory: a set of keys (the 32 raw bytes of a 64-hex signature, the
text of anything else), one list of keys per whole-second timestamp, and a
min-heap of those timestamps, so that expiry and eviction each take the oldest
second first: O(log n) per new second, amortised O(1) per signature. About 116
bytes per remembered signature, 11 MiB at the default cap of 100,000
(``bench/replay_guard.py``; the previous layout took 332 bytes, 32 MiB). The
repeat grace adds the first-acceptance times of the signatures of the last two
grace periods, at most twice ``max_entries``.

The official SDKs sign with a whole-second ``auth_timestamp`` and no nonce, so
two identical requests made within the same second carry the same signature and
are indistinguishable from a replay. ``repeat_grace_seconds`` accepts repeats of
a remembered signature for that long after its first acceptance (on the guard's
clock), which keeps such loops working while a replay later than the grace is
refused. ``0`` makes the guard strict.
"""

from __future__ import annotations

import binascii
import enum
import heapq
import math

__all__ = ["ReplayGuard", "Verdict"]

#: What the guard remembers a signature by: its 32 raw bytes when it is 64 hex digits
#: (every signature the REST check accepts is), its text otherwise. Hex case does not
#: matter: ``AB…`` and ``ab…`` are the same signature bytes.
_Key = bytes | str


class Verdict(enum.Enum):
    """The guard's answer for one request."""

    ACCEPTED = "accepted"
    #: Seen before and past the repeat grace, or possibly seen before: its timestamp
    #: has left the window or is at or before the horizon.
    REPLAYED = "replayed"


def _key(signature: str) -> _Key:
    if len(signature) == 64:
        try:
            return binascii.unhexlify(signature)  # strict: no spaces, only hex digits
        except (binascii.Error, ValueError):
            pass
    return signature


class ReplayGuard:
    """Remembers accepted signatures until their timestamp leaves the window.

    Args:
        window_seconds: how long after its ``auth_timestamp`` a signature can
            still verify (the signature check's window).
        max_entries: the most signatures remembered at once; beyond it the oldest
            timestamps are forgotten behind the horizon (see the module docstring).
            May be changed on a live guard (a config reload): a lower value takes
            effect at the next new signature.
        repeat_grace_seconds: repeats of a signature within this many seconds
            of its first acceptance are accepted (see the module docstring).
    """

    __slots__ = (
        "_buckets",
        "_clock",
        "_grace_since",
        "_graced",
        "_horizon",
        "_older_graced",
        "_seen",
        "_timestamps",
        "evicted",
        "max_entries",
        "repeat_grace_seconds",
        "window_seconds",
    )

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
        #: Signatures forgotten to make room (not counting expiry), since creation.
        self.evicted = 0
        self._seen: set[_Key] = set()
        #: timestamp → the keys remembered with it; never empty.
        self._buckets: dict[int, list[_Key]] = {}
        #: The keys of ``_buckets``, a min-heap.
        self._timestamps: list[int] = []
        self._horizon = -math.inf
        self._clock = -math.inf
        #: key → first acceptance, for the repeat grace, in two generations: keys
        #: accepted since ``_grace_since``, and those of the generation before. A
        #: generation is dropped once the clock is more than the grace past its end,
        #: so nothing still inside its grace is dropped (unless a generation reaches
        #: ``max_entries`` first: then repeats are refused early, never accepted late).
        self._graced: dict[_Key, float] = {}
        self._older_graced: dict[_Key, float] = {}
        self._grace_since = -math.inf

    def __len__(self) -> int:
        """Signatures remembered (expired ones are dropped when the clock advances)."""
        return len(self._seen)

    @property
    def horizon(self) -> float:
        """The highest timestamp evicted to make room (``-inf`` before any eviction)."""
        return self._horizon

    def check(self, signature: str, timestamp: int, now: float) -> Verdict:
        """Decide on one request whose signature has already verified; remember it.

        Args:
            signature: the request's ``auth_signature``.
            timestamp: its ``auth_timestamp`` (Unix seconds).
            now: the current Unix time.

        Returns:
            :attr:`Verdict.ACCEPTED` or :attr:`Verdict.REPLAYED`.
        """
        if now > self._clock:
            self._clock = now
            self._expire()
        clock = self._clock
        if timestamp + self.window_seconds < clock:
            # Out of the window: the signature check refuses these first. Were a
            # caller's window wider than ours, we could not vouch for this one.
            return Verdict.REPLAYED
        key = _key(signature)
        if key in self._seen:
            # Only remembered keys are looked up: a stale grace entry of an expired or
            # evicted key is never read (such a key is never accepted again).
            first = self._graced.get(key)
            if first is None:
                first = self._older_graced.get(key)
            if first is not None and clock - first <= self.repeat_grace_seconds:
                return Verdict.ACCEPTED
            return Verdict.REPLAYED
        if timestamp <= self._horizon:
            return Verdict.REPLAYED  # it may have been accepted and evicted since
        # A loop, not an if: ``max_entries`` may have been lowered by a reload.
        while len(self._seen) >= self.max_entries:
            if timestamp <= self._timestamps[0]:
                return Verdict.REPLAYED  # the oldest of all: refused, nothing forgotten
            self._evict_oldest()
        self._remember(key, timestamp, clock)
        return Verdict.ACCEPTED

    def check_and_remember(self, signature: str, timestamp: int, now: float) -> bool:
        """``True`` when the request may proceed (see :meth:`check`)."""
        return self.check(signature, timestamp, now) is Verdict.ACCEPTED

    def _remember(self, key: _Key, timestamp: int, clock: float) -> None:
        bucket = self._buckets.get(timestamp)
        if bucket is None:
            self._buckets[timestamp] = [key]
            heapq.heappush(self._timestamps, timestamp)
        else:
            bucket.append(key)
        self._seen.add(key)
        if self.repeat_grace_seconds > 0:
            if len(self._graced) >= self.max_entries:
                self._next_grace_generation(clock)
            self._graced[key] = clock

    def _evict_oldest(self) -> None:
        timestamp = self._timestamps[0]
        bucket = self._buckets[timestamp]
        key = bucket.pop()
        if not bucket:
            heapq.heappop(self._timestamps)
            del self._buckets[timestamp]
        self._seen.discard(key)
        self._horizon = max(self._horizon, timestamp)
        self.evicted += 1

    def _expire(self) -> None:
        clock, window = self._clock, self.window_seconds
        timestamps, buckets, seen = self._timestamps, self._buckets, self._seen
        while timestamps and timestamps[0] + window < clock:
            for key in buckets.pop(heapq.heappop(timestamps)):
                seen.discard(key)
        if clock - self._grace_since > self.repeat_grace_seconds:
            self._next_grace_generation(clock)

    def _next_grace_generation(self, clock: float) -> None:
        self._older_graced = self._graced
        self._graced = {}
        self._grace_since = clock
