"""The Pusher session's life cycle: phases, the only transitions, and its deadlines.

::

    UNSIGNED ──sign-in──▶ SIGNED_IN ◀──sign-in again (fresh token)──┐
       │                    │   ▲                                  │
       │                    │   └──sign-in again──┐                │
       │          token within the warning ──▶ TOKEN_EXPIRING ─────┘
       │                                           │
       └─sign-in deadline missed─▶ ENDED ◀─token expired past the grace

UNSIGNED is where every connection starts: it may subscribe to public channels
and, in an app with ``signin_deadline_seconds``, must sign in before the deadline.
SIGNED_IN is a connection signed in by HMAC (no expiry) or by a token not yet near
its ``exp``. TOKEN_EXPIRING means ``bastion:token_expiring`` was sent: a sign-in
with a fresh token brings it back to SIGNED_IN, and ``exp`` plus
``expiry_grace_seconds`` ends it. ENDED means the connection was refused (4009)
and is closing.

:func:`next_step` decides what a session's deadlines call for at ``now``; the hub
applies it. Pure: ``now`` and the settings are arguments.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from bastion.protocol.refusals import Reason

__all__ = ["Deadlines", "SessionPhase", "Step", "check_transition", "next_step"]


class SessionPhase(enum.Enum):
    """Where a connection is in the Pusher session's life."""

    UNSIGNED = "unsigned"
    SIGNED_IN = "signed_in"
    TOKEN_EXPIRING = "token_expiring"  # noqa: S105 (a phase's name, not a secret)
    ENDED = "ended"


_ALLOWED: dict[SessionPhase, frozenset[SessionPhase]] = {
    SessionPhase.UNSIGNED: frozenset({SessionPhase.SIGNED_IN, SessionPhase.ENDED}),
    SessionPhase.SIGNED_IN: frozenset(
        {SessionPhase.SIGNED_IN, SessionPhase.TOKEN_EXPIRING, SessionPhase.ENDED}
    ),
    SessionPhase.TOKEN_EXPIRING: frozenset({SessionPhase.SIGNED_IN, SessionPhase.ENDED}),
    SessionPhase.ENDED: frozenset(),
}


def check_transition(current: SessionPhase, new: SessionPhase) -> SessionPhase:
    """Return ``new`` if the transition is allowed, else raise ``RuntimeError``."""
    if new not in _ALLOWED[current]:
        raise RuntimeError(f"invalid session transition {current.name} -> {new.name}")
    return new


@dataclass(frozen=True, slots=True)
class Deadlines:
    """The app's session deadlines (``None``: that rule is off).

    Attributes:
        signin_seconds: an unsigned connection ends this long after it opened.
        warning_seconds: a token's expiry is announced this long before ``exp``.
        grace_seconds: a token's connection ends this long after ``exp``.
    """

    signin_seconds: float | None
    warning_seconds: float | None
    grace_seconds: float | None


@dataclass(frozen=True, slots=True)
class Step:
    """What the deadlines call for now: a phase to enter, and its frame or refusal.

    Attributes:
        phase: the phase to enter.
        expires_in: ``bastion:token_expiring``'s seconds left (TOKEN_EXPIRING).
        refusal: why the connection ends (ENDED).
    """

    phase: SessionPhase
    expires_in: int = 0
    refusal: Reason | None = None


def next_step(
    phase: SessionPhase,
    now: float,
    opened_at: float | None,
    token_expires_at: float | None,
    deadlines: Deadlines,
) -> Step | None:
    """The step the session's deadlines call for at ``now``, or ``None``.

    ``opened_at`` and ``token_expires_at`` are on the same clock as ``now``.
    """
    if phase is SessionPhase.UNSIGNED:
        deadline = deadlines.signin_seconds
        if deadline is not None and opened_at is not None and now - opened_at >= deadline:
            return Step(SessionPhase.ENDED, refusal=Reason.SIGNIN_DEADLINE)
        return None
    if phase is SessionPhase.ENDED or token_expires_at is None:
        return None
    if deadlines.grace_seconds is None or deadlines.warning_seconds is None:
        return None
    remaining = token_expires_at - now
    if remaining <= -deadlines.grace_seconds:
        return Step(SessionPhase.ENDED, refusal=Reason.TOKEN_EXPIRED)
    if phase is SessionPhase.SIGNED_IN and remaining <= deadlines.warning_seconds:
        return Step(SessionPhase.TOKEN_EXPIRING, expires_in=max(0, math.ceil(remaining)))
    return None
