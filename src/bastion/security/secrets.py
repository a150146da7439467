"""An app's secrets during rotation: the newest one signs, older ones retire.

Pure: the caller passes ``now`` (Unix seconds, a wall clock: expiries are
instants in configuration, so a monotonic clock cannot express them).

A rotation is: make the new secret ``secret``, move the old one to
``previous_secrets`` with an ``expires_at``, deploy the new secret to every
signer, and let the old one lapse. Until then both verify; afterwards only
the new one does.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from bastion.config import AppSettings

__all__ = ["SecretSet", "unix_seconds"]


def unix_seconds(instant: datetime) -> float:
    """``instant`` as Unix seconds; a naive datetime is read as UTC.

    Reading a naive value as local time would make an expiry depend on the
    host's time zone, so the same config file would retire a secret at
    different instants on different machines.
    """
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return instant.timestamp()


class SecretSet:
    """The newest secret plus the retiring ones, each with an optional expiry.

    Args:
        newest: the secret that signs (never expires while it is the newest).
        retiring: ``(secret, expires_at)`` pairs, ``expires_at`` in Unix seconds
            or ``None`` for "until removed from the config". A retiring secret is
            accepted while ``now <= expires_at``.
    """

    __slots__ = ("_newest", "_retiring")

    def __init__(self, newest: bytes, retiring: Iterable[tuple[bytes, float | None]] = ()) -> None:
        if not newest:
            raise ValueError("the newest secret must not be empty")
        self._newest = newest
        self._retiring = tuple(retiring)
        if any(not secret for secret, _ in self._retiring):
            raise ValueError("a retiring secret must not be empty")

    @classmethod
    def from_settings(cls, app: AppSettings) -> SecretSet:
        """The set configured for ``app``: ``secret`` and ``previous_secrets``."""
        return cls(
            app.secret.get_secret_value().encode(),
            (
                (
                    old.secret.get_secret_value().encode(),
                    None if old.expires_at is None else unix_seconds(old.expires_at),
                )
                for old in app.previous_secrets
            ),
        )

    @property
    def signing(self) -> bytes:
        """The newest secret: the only one used to sign what the server sends."""
        return self._newest

    def active(self, now: float) -> tuple[bytes, ...]:
        """The secrets that verify at ``now``, newest first; expired ones excluded."""
        alive = (s for s, expires in self._retiring if expires is None or now <= expires)
        return (self._newest, *alive)

    def __repr__(self) -> str:
        # Never the secrets themselves: a repr ends up in logs and tracebacks.
        return f"SecretSet(retiring={len(self._retiring)})"
