"""New apps' credentials and new secrets, from random bytes the caller passes in.

Pure: the randomness is an argument (``token_bytes``, ``secrets.token_bytes`` in
the ``bastion`` command), so tests can check the shapes byte for byte.

* An app id is 7 decimal digits (digits work with every official SDK; Pusher's
  own ids are digits too), never starting with 0.
* A key is 20 lowercase hex digits (Pusher's shape: public, sent by browsers).
* A secret is 32 random bytes as 64 lowercase hex digits by default: 256 bits,
  ASCII, safe in TOML, environment variables and every SDK.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass

__all__ = ["MIN_SECRET_BYTES", "NewApp", "app_toml", "new_app", "new_secret"]

#: Fewer random bytes than this make a guessable secret: refused.
MIN_SECRET_BYTES = 16
_ID_DIGITS = 7

TokenBytes = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class NewApp:
    """A new app's credentials."""

    id: str
    key: str
    secret: str


def new_secret(token_bytes: TokenBytes, nbytes: int = 32) -> str:
    """A secret of ``nbytes`` random bytes, as lowercase hex.

    Raises:
        ValueError: ``nbytes`` is below :data:`MIN_SECRET_BYTES`.
    """
    if nbytes < MIN_SECRET_BYTES:
        raise ValueError(f"a secret needs at least {MIN_SECRET_BYTES} random bytes")
    return token_bytes(nbytes).hex()


def _new_id(token_bytes: TokenBytes, taken: Container[str]) -> str:
    span = 9 * 10 ** (_ID_DIGITS - 1)
    while True:
        # 8 bytes for 7 digits: the modulo bias is below 1e-12.
        value = int.from_bytes(token_bytes(8), "big") % span + 10 ** (_ID_DIGITS - 1)
        app_id = str(value)
        if app_id not in taken:
            return app_id


def new_app(
    token_bytes: TokenBytes,
    *,
    app_id: str | None = None,
    taken_ids: Container[str] = (),
    taken_keys: Container[str] = (),
    secret_bytes: int = 32,
) -> NewApp:
    """Credentials for a new app (an id not in ``taken_ids``, a key not in ``taken_keys``)."""
    chosen = app_id if app_id is not None else _new_id(token_bytes, taken_ids)
    key = token_bytes(10).hex()
    while key in taken_keys:
        key = token_bytes(10).hex()
    return NewApp(chosen, key, new_secret(token_bytes, secret_bytes))


def app_toml(app: NewApp) -> str:
    """The ``[[apps]]`` table of ``app``, ready to paste (or append) into a config file."""
    return (
        "[[apps]]\n"
        f'id = "{app.id}"\n'
        f'key = "{app.key}"\n'
        f'secret = "{app.secret}"\n'
        "enable_client_messages = false\n"
        '# allowed_origins = ["https://app.example.com"]\n'
    )
