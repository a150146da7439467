"""One knob for every time-out in the test suite.

Slow or loaded machines (CI, sanitiser builds, ``coverage run``) set
``BASTION_TEST_TIMEOUT_SCALE`` (e.g. ``3``) instead of each test growing its own
magic numbers. Every wait in the tests goes through :func:`scaled`.
"""

from __future__ import annotations

import os

__all__ = ["ENV_VAR", "scale_factor", "scaled"]

ENV_VAR = "BASTION_TEST_TIMEOUT_SCALE"


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
