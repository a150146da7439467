"""The Pusher session's life cycle: the transition table and what the deadlines call for."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.core.session import (
    Deadlines,
    SessionPhase,
    Step,
    check_transition,
    next_step,
)
from bastion.protocol.refusals import Reason

P = SessionPhase
ALLOWED = {
    (P.UNSIGNED, P.SIGNED_IN),
    (P.UNSIGNED, P.ENDED),
    (P.SIGNED_IN, P.SIGNED_IN),
    (P.SIGNED_IN, P.TOKEN_EXPIRING),
    (P.SIGNED_IN, P.ENDED),
    (P.TOKEN_EXPIRING, P.SIGNED_IN),
    (P.TOKEN_EXPIRING, P.ENDED),
}
JWT = Deadlines(signin_seconds=None, warning_seconds=60, grace_seconds=30)


@pytest.mark.parametrize(("current", "new"), list(itertools.product(P, P)))
def test_only_the_drawn_transitions_are_allowed(current: P, new: P) -> None:
    if (current, new) in ALLOWED:
        assert check_transition(current, new) is new
    else:
        with pytest.raises(RuntimeError):
            check_transition(current, new)


def test_an_unsigned_connection_ends_at_the_sign_in_deadline() -> None:
    deadlines = Deadlines(signin_seconds=10, warning_seconds=None, grace_seconds=None)
    assert next_step(P.UNSIGNED, 109.9, 100.0, None, deadlines) is None
    assert next_step(P.UNSIGNED, 110.0, 100.0, None, deadlines) == Step(
        P.ENDED, refusal=Reason.SIGNIN_DEADLINE
    )
    assert next_step(P.UNSIGNED, 1e9, 100.0, None, JWT) is None  # no deadline: never


def test_a_token_is_warned_once_then_ended_after_the_grace() -> None:
    expires = 1_000.0
    assert next_step(P.SIGNED_IN, expires - 61, 0.0, expires, JWT) is None
    assert next_step(P.SIGNED_IN, expires - 59.5, 0.0, expires, JWT) == Step(
        P.TOKEN_EXPIRING, expires_in=60
    )
    assert next_step(P.TOKEN_EXPIRING, expires - 10, 0.0, expires, JWT) is None  # warned once
    assert next_step(P.TOKEN_EXPIRING, expires + 29, 0.0, expires, JWT) is None
    assert next_step(P.TOKEN_EXPIRING, expires + 30, 0.0, expires, JWT) == Step(
        P.ENDED, refusal=Reason.TOKEN_EXPIRED
    )


def test_an_hmac_sign_in_has_no_deadline() -> None:
    assert next_step(P.SIGNED_IN, 1e12, 0.0, None, JWT) is None
    assert next_step(P.ENDED, 1e12, 0.0, 1.0, JWT) is None


@given(
    st.lists(st.floats(0, 50, allow_nan=False), min_size=1, max_size=40),
    st.floats(1, 500, allow_nan=False),
)
def test_following_the_steps_always_takes_allowed_transitions(
    waits: list[float], ttl: float
) -> None:
    """Whatever the ticks, a signed-in session warns at most once and ends at most once."""
    phase, now, expires = P.SIGNED_IN, 0.0, ttl
    warned = 0
    for wait in waits:
        now += wait
        step = next_step(phase, now, 0.0, expires, JWT)
        if step is None:
            continue
        phase = check_transition(phase, step.phase)
        warned += step.phase is P.TOKEN_EXPIRING
    assert warned <= 1
    if phase is P.ENDED:
        assert now - expires >= JWT.grace_seconds  # type: ignore[operator]
