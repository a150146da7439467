"""The apps' runtime states, built where files may be read (the composition root).

An app in JWT mode verifies with keys from PEM or JWKS files named in its
settings; they are read here, once per start or reload, so a bad path or an
oversized file fails start-up (exit 2) or the reload (400), naming the app, and
``core/`` and ``security/`` never touch a file.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bastion.config import AppSettings, Settings
from bastion.core.state import AppState
from bastion.errors import ConfigError
from bastion.security.tokens import JwtVerifier

__all__ = ["app_state", "app_states", "read_key_file"]

#: Longest key file read (a JWKS of a few dozen keys is far smaller).
KEY_FILE_LIMIT = 1 << 20


def read_key_file(path: str) -> str:
    """Read a PEM or JWKS file for :class:`JwtVerifier`, bounded in size."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read(KEY_FILE_LIMIT + 1)
    if len(text) > KEY_FILE_LIMIT:
        raise ValueError(f"{path} is larger than {KEY_FILE_LIMIT} bytes")
    return text


def app_state(settings: AppSettings, wall_clock: Callable[[], float] = time.time) -> AppState:
    """A fresh runtime state for ``settings``, its JWT verifier read from its key files.

    ``wall_clock`` (Unix seconds) decides when a retiring secret stops verifying.

    Raises:
        ConfigError: a key file cannot be read or parsed (``apps[ID].jwt: …``).
    """
    verifier = None
    if settings.jwt is not None:
        try:
            verifier = JwtVerifier.from_settings(settings.jwt, read_key_file)
        except (OSError, ValueError) as exc:
            field = f"apps[{settings.id}].jwt"
            raise ConfigError(f"{field}: {exc}", fields=(field,)) from None
    return AppState(settings, verifier, wall_clock)


def app_states(settings: Settings, wall_clock: Callable[[], float] = time.time) -> list[AppState]:
    """A runtime state for every app of ``settings``."""
    return [app_state(app, wall_clock) for app in settings.apps]
