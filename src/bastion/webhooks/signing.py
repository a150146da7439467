"""The headers of a Pusher webhook request: key, HMAC-SHA256 signature, idempotency key.

Pure: no clock, no I/O. The signature is the lowercase hex HMAC-SHA256 of the exact
body bytes under the app's newest secret (pusher-http-* ``validate_webhook`` and
``WebHook.isValid()`` verify exactly this). ``Content-Type`` is exactly
``application/json``: pusher-http-node compares the header for equality.
"""

from __future__ import annotations

from typing import Final

from bastion.protocol.signing import webhook_signature

__all__ = ["CONTENT_TYPE", "IDEMPOTENCY_HEADER", "signature", "webhook_headers"]

CONTENT_TYPE: Final = "application/json"
#: Same value on every attempt of one delivery: the receiver's dedupe key.
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"


def signature(secret: str | bytes, body: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of ``body`` under ``secret``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return webhook_signature(key, body)


def webhook_headers(
    *, key: str, secret: str | bytes, body: bytes, idempotency_key: str
) -> dict[str, str]:
    """The headers Bastion sends with one webhook attempt.

    Args:
        key: the app key (``X-Pusher-Key``).
        secret: the app's newest secret; signs ``body``.
        body: the exact bytes that will be sent.
        idempotency_key: the delivery's key, identical on every retry.

    Returns:
        ``Content-Type``, ``X-Pusher-Key``, ``X-Pusher-Signature`` and ``Idempotency-Key``.
    """
    return {
        "Content-Type": CONTENT_TYPE,
        "X-Pusher-Key": key,
        "X-Pusher-Signature": signature(secret, body),
        IDEMPOTENCY_HEADER: idempotency_key,
    }
