"""IP reputation: refusals add decaying points; past a threshold an address is blocked.

Pure: no clock, no I/O. ``now`` is an argument (Unix seconds, so that a block's
``until`` means the same thing to a node and to ``bastion block``).

Scoring: each refusal slug has a weight (:data:`DEFAULT_POINTS`, overridden by
``[security.reputation] points``). Every slug a remote peer can cause is weighed
unless :data:`ZERO_POINTS` names it with the reason it is not (pong time-outs,
slow consumers and capacity limits are not hostile; what only a correctly
signed back end can cause must not get that back end blocked). An address's score
halves every ``half_life_seconds``; a refusal first decays the score to ``now``,
then adds its weight. When the score reaches ``threshold``, :meth:`Reputation.add`
returns a :class:`Block` for ``block_seconds`` and forgets the score (the next
offence after the block starts from zero). Addresses in ``never_block`` are never
scored and never blocked.

Memory is bounded: at most ``max_tracked`` addresses are scored. When the table
is full, the addresses with the lowest decayed scores are forgotten (a quarter of
the table at once, so the cost amortises to O(log n) per new address). An
attacker with many addresses can thereby make us forget low scores, never a block.

:class:`BlockSet` holds the blocks in force, keyed by canonical address, with the
"never shorten an existing block automatically" rule shared with the store.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from bastion.security.proxies import IPNetwork, ip_text, parse_ip, parse_networks

if TYPE_CHECKING:
    from bastion.config import ReputationSettings

__all__ = [
    "DEFAULT_POINTS",
    "ZERO_POINTS",
    "Block",
    "BlockSet",
    "BlockSource",
    "Reputation",
    "canonical_ip",
    "parse_duration",
]

BlockSource = Literal["auto", "manual"]

_FAILED_AUTH = 10.0
_RATE_LIMIT = 5.0
_MALFORMED = 5.0
_PROBE = 2.0
_MISUSE = 1.0

#: Built-in points per refusal slug. Failed authentication and replays weigh most
#: (they are guessing or reuse of captured credentials); rate limits and malformed
#: input less (buggy clients do that too); probing for apps, paths and protocol
#: versions less again; a well-formed message the protocol refuses (a client event
#: on the wrong channel, a bad channel name) least, so that only a connection that
#: keeps at it adds up (a connection is closed after its refusal budget anyway).
#: Every slug of :class:`~bastion.protocol.refusals.Reason` is here or in
#: :data:`ZERO_POINTS` (a test holds both tables to the refusal table).
DEFAULT_POINTS: Mapping[str, float] = {
    # failed authentication
    "auth_signature": _FAILED_AUTH,
    "auth_key": _FAILED_AUTH,
    "auth_timestamp": _FAILED_AUTH,
    "body_md5": _FAILED_AUTH,
    "subscribe_auth_invalid": _FAILED_AUTH,
    "signin_invalid": _FAILED_AUTH,
    "signin_token_invalid": _FAILED_AUTH,
    "admin_unauthorized": _FAILED_AUTH,
    "origin_refused": 10.0,
    "replayed_request": 20.0,
    "auth_failure_limit": 20.0,
    # rate limits
    "client_event_rate": _RATE_LIMIT,
    "client_event_app_rate": _RATE_LIMIT,
    "client_event_type_rate": _RATE_LIMIT,
    "subscribe_rate": _RATE_LIMIT,
    "ip_rate_limited": _RATE_LIMIT,
    "connection_rate": _RATE_LIMIT,
    "ip_connection_limit": _RATE_LIMIT,
    "message_rate": _RATE_LIMIT,
    # a connection whose frames kept being refused (on top of those refusals)
    "refusal_limit": 10.0,
    # malformed input
    "malformed_json": _MALFORMED,
    "not_an_object": _MALFORMED,
    "json_too_deep": _MALFORMED,
    "frame_too_large": _MALFORMED,
    "websocket_protocol": _MALFORMED,
    "invalid_utf8": _MALFORMED,
    "binary_frame": _MALFORMED,
    "bad_request": _MALFORMED,
    "headers_too_large": _MALFORMED,
    "unknown_event": _MALFORMED,
    "body_too_large": _MALFORMED,
    # probing: unknown apps, paths, versions; unsigned or unauthorised requests
    "unknown_app": _PROBE,
    "path_not_found": _PROBE,
    "unsupported_protocol": _PROBE,
    "websocket_version": _PROBE,
    "auth_missing": _PROBE,
    "auth_version": _PROBE,
    "query_token_refused": _PROBE,
    "metrics_forbidden": _PROBE,
    "host_not_allowed": _PROBE,
    "resume_future_position": _PROBE,
    "not_found": _MISUSE,
    # well-formed messages the protocol refuses
    "missing_event": _MISUSE,
    "invalid_data": _MISUSE,
    "client_events_disabled": _MISUSE,
    "client_event_channel": _MISUSE,
    "client_event_encrypted": _MISUSE,
    "client_event_not_subscribed": _MISUSE,
    "client_event_name": _MISUSE,
    "client_event_too_large": _MISUSE,
    "client_event_not_allowed": _MISUSE,
    "client_event_schema": _MISUSE,
    "subscribe_invalid_channel": _MISUSE,
    "subscribe_auth_missing": _MISUSE,
    "subscribe_channel_data": _MISUSE,
    "subscribe_member_too_large": _MISUSE,
    "subscribe_not_signed_in": _MISUSE,
    "subscribe_too_many_channels": _MISUSE,
    "signin_conflict": _MISUSE,
    "signin_deadline": _MISUSE,
    "resume_invalid": _MISUSE,
}

_SIGNED_BACK_END = (
    "only a REST call with a valid signature reaches this check: the app's own back"
    " end, whose bugs must not get it blocked (a stolen secret is not stopped by a score)"
)
_CAPACITY = "a capacity limit that legitimate clients reach too; not a sign of hostility"

#: Slugs that weigh nothing by default, each with the reason. An operator can still
#: weigh any of them with ``points``.
ZERO_POINTS: Mapping[str, str] = {
    "app_disabled": "the operator switched the app off; the peer did nothing wrong",
    "app_removed": "the operator removed the app; the peer did nothing wrong",
    "terminated": "the app ended the user's connections on purpose",
    "app_over_quota": _CAPACITY,
    "over_capacity": _CAPACITY + " (also sent to every client while a node drains)",
    "unsigned_over_quota": _CAPACITY,
    "subscribe_presence_full": _CAPACITY,
    "user_connection_limit": _CAPACITY + " (a user with one tab too many)",
    "session_replaced": "the same user signed in on a newer connection; the app's policy",
    "user_suspended": "the user's own refusals were scored already; a suspension is no new"
    " offence (and never blocks the address)",
    "signin_suspended": "a sign-in during a suspension's cool-down; it must not feed itself",
    "app_channels_full": _CAPACITY,
    "node_channels_full": _CAPACITY,
    "slow_consumer": "a slow network, not an attack; the cut already frees the memory",
    "pong_timeout": "a lost network path, not an attack",
    "token_expired": "the normal end of a sign-in token's life",
    "internal_error": "a defect in Bastion, not the peer's fault",
    "cluster_unavailable": "Redis is unreachable; not the peer's fault",
    "ip_blocked": "the address is already blocked; a block must not feed itself",
    "signin_data_invalid": "the app's auth endpoint signed this user_data; not the peer's doing",
    "watchlist_too_long": "the app's auth endpoint signed this watchlist; the sign-in succeeds",
    "app_rate_limited": _SIGNED_BACK_END,
    "event_rate_limited": _SIGNED_BACK_END,
    "method_not_allowed": _SIGNED_BACK_END,
    "invalid_body": _SIGNED_BACK_END,
    "invalid_field": _SIGNED_BACK_END,
    "payload_too_large": _SIGNED_BACK_END,
    "too_many_channels": _SIGNED_BACK_END,
    "batch_too_large": _SIGNED_BACK_END,
    "invalid_channel": _SIGNED_BACK_END,
    "invalid_event_name": _SIGNED_BACK_END,
    "invalid_socket_id": _SIGNED_BACK_END,
    "invalid_info": _SIGNED_BACK_END,
    "not_presence": _SIGNED_BACK_END,
    "encrypted_multi_channel": _SIGNED_BACK_END,
    "invalid_position": _SIGNED_BACK_END,
}

#: Relative slack when comparing a score with the threshold. A burst of refusals
#: decays a little between its hits (ten failed signatures within 100 ms lose about
#: 0.002 of 100 points at the default half-life), and float sums round: without
#: slack, "ten failed signatures in quick succession" would need an eleventh. With
#: 0.1%, ten hits of 10 against 100 block on the tenth when they come within
#: about 0.8 s (loss ~ 0.115 points per second of burst at the default half-life).
_THRESHOLD_SLACK = 1e-3

#: Addresses scored at most, by default (about 100 bytes each).
DEFAULT_MAX_TRACKED = 100_000

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def canonical_ip(text: str) -> str | None:
    """The one spelling of an address used as a key (IPv4-mapped IPv6 unwrapped).

    Returns ``None`` when ``text`` is not an address, so garbage is never scored.
    """
    return ip_text(text)


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``30s``, ``30m``, ``1h``, ``2d`` or ``1w`` (must be > 0).

    Raises:
        ValueError: ``text`` is not such a duration, or is zero.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 1h, 2d, 1w)")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"duration must be more than zero: {text!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Block:
    """One blocked address.

    Attributes:
        ip: the canonical address.
        until: Unix seconds at which the block ends.
        reason: why (an operator's text, or the score that crossed the threshold).
        source: ``auto`` (reputation) or ``manual`` (``bastion block``).
        created: Unix seconds at which the block was made.
        score: the score that produced an automatic block (0 for manual ones).
    """

    ip: str
    until: float
    reason: str
    source: BlockSource = "auto"
    created: float = 0.0
    score: float = 0.0

    def active(self, now: float) -> bool:
        """Whether the block is still in force at ``now``."""
        return now < self.until


def supersedes(new: Block, old: Block | None, now: float) -> bool:
    """Whether ``new`` replaces ``old``: an operator's block always does, an
    automatic one only when it ends later (it must never shorten a block)."""
    return old is None or not old.active(now) or new.source == "manual" or new.until > old.until


class BlockSet:
    """The blocks in force, with O(1) lookup by canonical address."""

    __slots__ = ("_blocks",)

    def __init__(self) -> None:
        self._blocks: dict[str, Block] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def add(self, block: Block, now: float) -> bool:
        """Apply ``block`` unless an existing one wins (see :func:`supersedes`).

        Returns:
            True when ``block`` is now the one in force.
        """
        if not supersedes(block, self._blocks.get(block.ip), now):
            return False
        self._blocks[block.ip] = block
        return True

    def put(self, block: Block) -> None:
        """Set ``block`` as is (the store's word is final when syncing)."""
        self._blocks[block.ip] = block

    def remove(self, ip: str) -> Block | None:
        """Lift the block of ``ip`` (canonical), returning it if there was one."""
        return self._blocks.pop(ip, None)

    def get(self, ip: str, now: float) -> Block | None:
        """The block in force for canonical ``ip`` at ``now`` (an expired one is dropped)."""
        block = self._blocks.get(ip)
        if block is None:
            return None
        if not block.active(now):
            del self._blocks[ip]
            return None
        return block

    def prune(self, now: float) -> list[Block]:
        """Drop expired blocks, returning them."""
        expired = [block for block in self._blocks.values() if not block.active(now)]
        for block in expired:
            del self._blocks[block.ip]
        return expired

    def active(self, now: float) -> list[Block]:
        """Every block in force at ``now``, soonest to end first."""
        return sorted(
            (block for block in self._blocks.values() if block.active(now)),
            key=lambda block: (block.until, block.ip),
        )


class Reputation:
    """Decaying per-address scores that produce automatic blocks.

    Args:
        threshold: points at which an address is blocked (> 0).
        half_life_seconds: seconds for a score to halve (> 0).
        block_seconds: length of an automatic block (> 0).
        never_block: CIDRs never scored nor blocked.
        points: per-slug weights overriding :data:`DEFAULT_POINTS`.
        max_tracked: addresses scored at most (>= 4).
    """

    __slots__ = (
        "_scores",
        "block_seconds",
        "half_life_seconds",
        "max_tracked",
        "never_block",
        "threshold",
        "weights",
    )

    def __init__(
        self,
        *,
        threshold: float = 100.0,
        half_life_seconds: float = 300.0,
        block_seconds: float = 900.0,
        never_block: Sequence[str] = (),
        points: Mapping[str, float] | None = None,
        max_tracked: int = DEFAULT_MAX_TRACKED,
    ) -> None:
        if not (threshold > 0 and half_life_seconds > 0 and block_seconds > 0):
            raise ValueError("threshold, half_life_seconds and block_seconds must be > 0")
        if max_tracked < 4:
            raise ValueError("max_tracked must be >= 4")
        if any(not (value >= 0 and math.isfinite(value)) for value in (points or {}).values()):
            raise ValueError("points must be finite and >= 0")
        self.threshold = float(threshold)
        self.half_life_seconds = float(half_life_seconds)
        self.block_seconds = float(block_seconds)
        self.never_block: tuple[IPNetwork, ...] = parse_networks(never_block)
        self.weights: dict[str, float] = {**DEFAULT_POINTS, **(points or {})}
        self.max_tracked = max_tracked
        #: canonical address -> (score, time of that score)
        self._scores: dict[str, tuple[float, float]] = {}

    @classmethod
    def from_settings(
        cls, settings: ReputationSettings, *, max_tracked: int = DEFAULT_MAX_TRACKED
    ) -> Reputation:
        """A reputation table as ``[security.reputation]`` configures it."""
        return cls(
            threshold=settings.threshold,
            half_life_seconds=settings.half_life_seconds,
            block_seconds=settings.block_seconds,
            never_block=settings.never_block,
            points=settings.points,
            max_tracked=max_tracked,
        )

    def __len__(self) -> int:
        return len(self._scores)

    def weight(self, slug: str) -> float:
        """Points one refusal of ``slug`` adds."""
        return self.weights.get(slug, 0.0)

    def exempt(self, ip: str) -> bool:
        """Whether ``ip`` is in ``never_block`` (an unparsable address is exempt too:
        it cannot be blocked at accept anyway)."""
        address = parse_ip(ip)
        return address is None or _in_networks(address, self.never_block)

    def score(self, ip: str, now: float) -> float:
        """The decayed score of ``ip`` at ``now`` (0 when not tracked)."""
        key = canonical_ip(ip)
        entry = self._scores.get(key) if key is not None else None
        return 0.0 if entry is None else self._decayed(entry, now)

    def add(self, ip: str, slug: str, now: float) -> Block | None:
        """Score one refusal of ``slug`` from ``ip`` at ``now``.

        Returns:
            An automatic :class:`Block` when the score reaches the threshold
            (the score is then forgotten), else ``None``.
        """
        weight = self.weight(slug)
        if weight <= 0:
            return None
        address = parse_ip(ip)
        if address is None or _in_networks(address, self.never_block):
            return None
        key = str(address)
        entry = self._scores.get(key)
        if entry is None and len(self._scores) >= self.max_tracked:
            self._evict(now)
        score = (0.0 if entry is None else self._decayed(entry, now)) + weight
        if score >= self.threshold * (1 - _THRESHOLD_SLACK):
            self._scores.pop(key, None)
            return Block(
                ip=key,
                until=now + self.block_seconds,
                reason=f"reputation score {score:.0f} reached {self.threshold:g} (last: {slug})",
                source="auto",
                created=now,
                score=score,
            )
        # A clock that steps back must not make the score decay twice later on.
        self._scores[key] = (score, now if entry is None else max(now, entry[1]))
        return None

    def forget(self, ip: str) -> None:
        """Drop the score of ``ip`` (e.g. when an operator unblocks it)."""
        key = canonical_ip(ip)
        if key is not None:
            self._scores.pop(key, None)

    def _decayed(self, entry: tuple[float, float], now: float) -> float:
        score, then = entry
        elapsed = max(0.0, now - then)
        return score * math.pow(0.5, elapsed / self.half_life_seconds)

    def _evict(self, now: float) -> None:
        """Forget the lowest decayed scores (oldest first on ties), keeping 3/4."""
        keep = self.max_tracked * 3 // 4
        ranked = sorted(
            self._scores.items(),
            key=lambda item: (self._decayed(item[1], now), item[1][1]),
            reverse=True,
        )
        self._scores = dict(ranked[:keep])


def _in_networks(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Iterable[IPNetwork]
) -> bool:
    return any(address in network for network in networks)
