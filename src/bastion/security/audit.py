"""The security audit event: what one refusal leaves behind, secrets scrubbed.

Pure: no clock, no randomness, no I/O. The id and the time are arguments, so the
same refusal always makes the same event (and tests compare events byte for byte).

An :class:`AuditEvent` is redacted in its constructor: the message and every string
in the metadata pass through :func:`redact`, so an unredacted event cannot exist.
The message is already the refusal's detail, which names the rule and never the
data; redaction is defence in depth against a detail that one day quotes input.

:func:`parse_time` turns the ``bastion audit --since/--until`` forms (``30m``,
``1h``, ``2d``, an ISO 8601 time or Unix seconds) into Unix seconds.

:func:`fair_share` is the retention rule of the row cap: when the log holds more
than ``max_rows``, each address keeps at most the same number of its newest rows,
chosen as large as the cap allows; addresses below that number keep every row.
So the rows of one address (a flood) can push out only that address's older
rows, never the trail of the others.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from bastion.protocol.refusals import RefusalRecord
    from bastion.security.reputation import Block

__all__ = [
    "BUS_MESSAGE_FORGED",
    "ROLE_UNKNOWN",
    "USER_SUSPENDED",
    "AuditEvent",
    "MetadataValue",
    "Severity",
    "bus_forged_event",
    "fair_share",
    "from_block",
    "from_refusal",
    "from_unblock",
    "parse_time",
    "redact",
    "role_unknown_event",
    "user_suspended_event",
    "webhook_retry_event",
]

Severity = Literal["info", "warning"]
MetadataValue = str | int | float | bool | None

#: What a scrubbed value is replaced with.
REDACTED = "[redacted]"

#: ``name=value`` fragments whose value is a credential (query strings, log text).
_SECRET_PARAM = re.compile(
    r"(?i)(?<![A-Za-z0-9_])(auth_signature|auth|signature|secret|password|token)=[^&\s\"',;]+"
)
#: A Pusher auth value ``key:signature`` (channel and user auth), hex signature.
_KEY_HEX = re.compile(r"(?<![A-Za-z0-9_.-])[A-Za-z0-9_.-]+:[0-9A-Fa-f]{32,}(?![0-9A-Fa-f])")
#: Bare HMAC-SHA256 hex digests (and any longer hex run): signatures or secrets.
_HEX64 = re.compile(r"[0-9A-Fa-f]{64,}")
#: A JSON Web Token: base64url header starting ``{"`` (``eyJ``), payload, signature.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def redact(text: str) -> str:
    """Remove anything that looks like an auth signature or a secret from ``text``.

    Scrubbed: ``auth_signature=…``, ``auth=…`` (and ``signature``, ``secret``,
    ``password``, ``token``) query or log fragments; ``key:hex`` Pusher auth values;
    any run of 64 or more hex digits (an HMAC-SHA256 signature, a hex secret);
    JSON Web Tokens wherever they appear.
    """
    text = _JWT.sub(REDACTED, text)
    text = _SECRET_PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    text = _KEY_HEX.sub(REDACTED, text)
    return _HEX64.sub(REDACTED, text)


def _redact_value(value: MetadataValue) -> MetadataValue:
    return redact(value) if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One security-relevant event (this slice: one refusal).

    Attributes:
        id: unique id (a uuid4 hex made by the caller).
        time: Unix seconds (from the caller's clock).
        type: the refusal slug (``malformed_json``, ``auth_signature``, …).
        severity: ``warning`` for what looks hostile or broken, ``info`` otherwise.
        ip: the peer's address, when known.
        app_id: the app concerned, when known.
        socket_id: the connection concerned, when there is one.
        user_id: the signed-in user, when there is one.
        message: the rule's text (redacted).
        metadata: small flat facts about the event (string values redacted).
    """

    id: str
    time: float
    type: str
    severity: Severity
    ip: str | None
    app_id: str | None
    socket_id: str | None
    user_id: str | None
    message: str
    metadata: dict[str, MetadataValue] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("audit event id must not be empty")
        if not self.type:
            raise ValueError("audit event type must not be empty")
        if self.severity not in ("info", "warning"):
            raise ValueError(f"audit event severity must be info or warning: {self.severity!r}")
        if not math.isfinite(self.time):
            raise ValueError("audit event time must be finite")
        object.__setattr__(self, "message", redact(self.message))
        object.__setattr__(
            self, "metadata", {str(k): _redact_value(v) for k, v in self.metadata.items()}
        )


def from_refusal(
    record: RefusalRecord,
    *,
    id: str,
    time: float,
    repeats: tuple[int, float, float] | None = None,
) -> AuditEvent:
    """The audit event for one refusal, or for the repeats of one aggregation window.

    Args:
        record: the refusal (for repeats: the last one of the window).
        id: the event id, from the caller.
        time: the event time, from the caller (for repeats: the last one's).
        repeats: ``(count, first, last)`` when the row stands for ``count`` refusals
            of the same address, reason and app between ``first`` and ``last`` (Unix
            seconds); they go into the metadata and the message says so. A row
            without ``count`` stands for one refusal.
    """
    rule = record.reason.value
    metadata: dict[str, MetadataValue] = {"reason": record.reason.name}
    for name, value in (
        ("close_code", rule.close_code),
        ("error_code", rule.error_code),
        ("http_status", rule.http_status),
    ):
        if value is not None:
            metadata[name] = value
    message = record.detail
    if repeats is not None:
        count, first, last = repeats
        metadata.update(count=count, first=first, last=last, first_iso=_iso(first))
        message = f"{message} (repeated {count} times over {max(0.0, last - first):.1f} s)"
    return AuditEvent(
        id=id,
        time=time,
        type=rule.slug,
        severity=rule.severity,
        ip=record.ip,
        app_id=record.app_id,
        socket_id=record.socket_id,
        user_id=record.user_id,
        message=message,
        metadata=metadata,
    )


def from_block(block: Block, *, id: str, time: float) -> AuditEvent:
    """The audit event for a block: ``ip_blocked_auto`` (reputation) or ``ip_blocked_manual``.

    Both are warnings: an automatic block means an address misbehaved enough to be
    shut out, a manual one is an operator acting on the node's security.
    """
    metadata: dict[str, MetadataValue] = {
        "until": block.until,
        "until_iso": _iso(block.until),
        "source": block.source,
    }
    if block.source == "auto":
        metadata["score"] = round(block.score, 3)
    return AuditEvent(
        id=id,
        time=time,
        type=f"ip_blocked_{block.source}",
        severity="warning",
        ip=block.ip,
        app_id=None,
        socket_id=None,
        user_id=None,
        message=block.reason,
        metadata=metadata,
    )


def from_unblock(ip: str, *, id: str, time: float, previous: Block | None = None) -> AuditEvent:
    """The audit event ``ip_unblocked`` for an operator lifting the block of ``ip``."""
    metadata: dict[str, MetadataValue] = {}
    if previous is not None:
        metadata = {"until": previous.until, "source": previous.source, "reason": previous.reason}
    return AuditEvent(
        id=id,
        time=time,
        type="ip_unblocked",
        severity="warning",
        ip=ip,
        app_id=None,
        socket_id=None,
        user_id=None,
        message="Address unblocked by an operator",
        metadata=metadata,
    )


def webhook_retry_event(ids: list[int], *, id: str, time: float) -> AuditEvent:
    """The audit event ``webhook_retried``: an operator put dead letters back in the queue."""
    shown = ",".join(str(delivery) for delivery in ids[:50])
    return AuditEvent(
        id=id,
        time=time,
        type="webhook_retried",
        severity="info",
        ip=None,
        app_id=None,
        socket_id=None,
        user_id=None,
        message=f"{len(ids)} webhook dead letter(s) queued again by an operator",
        metadata={"count": len(ids), "ids": shown + (",..." if len(ids) > 50 else "")},
    )


#: The audit type of a sign-in naming a role its app does not configure.
ROLE_UNKNOWN = "role_unknown"


def role_unknown_event(app_id: str, user_id: str, role: str, *, id: str, time: float) -> AuditEvent:
    """The audit event ``role_unknown``: a signed sign-in named a role the app lacks.

    Written once per app and role (the hub remembers which it reported): the user
    gets the signed-in defaults, so this is for the operator, whose auth endpoint
    or token issuer and ``[apps.roles]`` disagree. ``info``: nobody did wrong.
    """
    return AuditEvent(
        id=id,
        time=time,
        type=ROLE_UNKNOWN,
        severity="info",
        ip=None,
        app_id=app_id,
        socket_id=None,
        user_id=user_id,
        message="Sign-in named a role this app does not configure; default limits apply",
        metadata={"role": role},
    )


#: The audit type of a user signed out everywhere for spending its error budget.
USER_SUSPENDED = "user_suspended"


def user_suspended_event(
    app_id: str, user_id: str, cooldown: float, closed: int, *, id: str, time: float
) -> AuditEvent:
    """The audit event ``user_suspended``: a user spent its ``user_error_budget``.

    Written by the node that decided it, once per suspension (each closed connection
    also has its own ``user_suspended`` refusal row, aggregated as usual). A warning:
    a user's connections kept sending what was refused. No address is blocked.
    """
    return AuditEvent(
        id=id,
        time=time,
        type=USER_SUSPENDED,
        severity="warning",
        ip=None,
        app_id=app_id,
        socket_id=None,
        user_id=user_id,
        message="User signed out everywhere after too many refusals; sign-ins refused for a while",
        metadata={"cooldown_seconds": cooldown, "closed_here": closed},
    )


#: The audit type of a bus message refused by its MAC or its shape.
BUS_MESSAGE_FORGED = "bus_message_forged"


def bus_forged_event(reason: str, size: int, *, id: str, time: float) -> AuditEvent:
    """The audit event ``bus_message_forged``: a bus message failed its checks.

    A warning: whoever can write to Redis without the cluster key tried to inject an
    event (or a node runs with a different key). There is no peer address on the bus;
    the payload is never recorded, only the ``reason`` slug and its size in bytes.
    """
    return AuditEvent(
        id=id,
        time=time,
        type=BUS_MESSAGE_FORGED,
        severity="warning",
        ip=None,
        app_id=None,
        socket_id=None,
        user_id=None,
        message=f"Bus message refused ({reason}): not delivered",
        metadata={"reason": reason, "bytes": size},
    )


def fair_share(counts: Iterable[int], capacity: int) -> int:
    """The largest ``level`` such that ``sum(min(count, level)) <= capacity``.

    The row cap keeps the newest ``level`` rows of each group (address) and every
    row of a group that has fewer. When every group fits, the largest count is
    returned (nothing to delete); 0 means the groups outnumber the capacity.

    Args:
        counts: rows per group (each >= 0).
        capacity: rows that may be kept (>= 0).
    """
    ordered = sorted(counts)
    remaining = capacity
    for index, count in enumerate(ordered):
        groups_left = len(ordered) - index
        if count * groups_left > remaining:
            return remaining // groups_left
        remaining -= count
    return ordered[-1] if ordered else 0


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str, *, now: float) -> float:
    """Unix seconds for ``30m``/``1h``/``2d``/``1w`` ago, an ISO 8601 time, or Unix seconds.

    A duration counts back from ``now``; an ISO time without an offset is UTC.

    Raises:
        ValueError: ``text`` is none of those forms.
    """
    value = text.strip()
    match = _DURATION.fullmatch(value)
    if match:
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
        raise ValueError(f"not a time: {text!r}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use e.g. 30m, 1h, 2d, 1w, or ISO 8601 like 2026-01-31T12:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
