"""HMAC-SHA256 signatures: channel auth, user sign-in, REST requests, webhooks.

Pure functions: the secret, the strings and the current time are arguments.
Digests are compared in constant time and only lowercase hex is accepted.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterable, Sequence

from bastion.protocol.refusals import Reason

__all__ = [
    "REPEAT_GRACE_SECONDS",
    "REST_TIMESTAMP_WINDOW",
    "channel_auth_string",
    "hmac_sha256_hex",
    "rest_string_to_sign",
    "sign",
    "signin_auth_string",
    "verify_auth",
    "verify_rest_request",
    "webhook_signature",
]

#: Seconds a signed REST request stays valid either side of its timestamp.
REST_TIMESTAMP_WINDOW = 600
#: The official SDKs sign with a whole-second timestamp and no nonce, so the same
#: call made twice within one second is byte-identical. Repeats of a signature
#: this soon after its first acceptance are let through; later ones are replays.
#: Two seconds: one for the timestamp's resolution, one for network jitter.
REPEAT_GRACE_SECONDS = 2.0
_REST_AUTH_PARAMS = ("auth_key", "auth_timestamp", "auth_version", "auth_signature")


@functools.lru_cache(maxsize=256)
def _keyed(secret: bytes) -> hmac.HMAC:
    """An HMAC-SHA256 keyed with ``secret`` that has read nothing: only ever copied.

    Keying a new one looks SHA-256 up in OpenSSL's method store and hashes the
    padded key twice, which cost more than the message it signs (3.0 against 1.7
    µs for a REST request's string). A node has a few secrets and keys, so few are kept.
    """
    return hmac.new(secret, digestmod=hashlib.sha256)


#: An MD5 that has read nothing, copied for each body (no method lookup per request).
_MD5 = hashlib.md5(usedforsecurity=False)


def hmac_sha256_hex(key: bytes, message: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of ``message`` under ``key``."""
    mac = _keyed(key).copy()
    mac.update(message)
    return mac.hexdigest()


def sign(secret: bytes, message: str) -> str:
    """Lowercase hex HMAC-SHA256 of ``message`` (UTF-8) under ``secret``."""
    return hmac_sha256_hex(secret, message.encode("utf-8"))


def channel_auth_string(socket_id: str, channel: str, channel_data: str | None = None) -> str:
    """The string signed for a private/encrypted/presence subscription."""
    if channel_data is None:
        return f"{socket_id}:{channel}"
    return f"{socket_id}:{channel}:{channel_data}"


def signin_auth_string(socket_id: str, user_data: str) -> str:
    """The string signed for ``pusher:signin`` (note the double colons)."""
    return f"{socket_id}::user::{user_data}"


def verify_auth(auth: str, app_key: str, secrets: Sequence[bytes], message: str) -> bool:
    """Check an ``{app_key}:{hex signature}`` auth value against ``message``.

    Any of ``secrets`` may have signed it (several are active during rotation).
    """
    key, sep, signature = auth.partition(":")
    if not sep or not hmac.compare_digest(key.encode(), app_key.encode()):
        return False
    if len(signature) != 64 or signature != signature.lower():
        return False
    candidate = signature.encode("ascii", "replace")
    matched = False
    for secret in secrets:
        # No early exit: the time taken must not reveal which secret matched.
        matched |= hmac.compare_digest(sign(secret, message).encode(), candidate)
    return matched


def rest_string_to_sign(method: str, path: str, params: Iterable[tuple[str, str]]) -> str:
    """Pusher's REST string to sign: METHOD, path and sorted raw query, newline-joined."""
    pairs = sorted(
        ((key.lower(), value) for key, value in params if key.lower() != "auth_signature"),
        key=lambda pair: pair[0],
    )
    query = "&".join(f"{key}={value}" for key, value in pairs)
    return f"{method.upper()}\n{path}\n{query}"


def verify_rest_request(
    *,
    method: str,
    path: str,
    params: Sequence[tuple[str, str]],
    body: bytes,
    app_key: str,
    secrets: Sequence[bytes],
    now: float,
) -> Reason | None:
    """Check a signed REST request; ``None`` when it is valid, else the reason.

    Args:
        method: HTTP method as received.
        path: the request path exactly as received (still URL-encoded).
        params: the URL-decoded query parameters, in received order.
        body: the raw body bytes, before any parsing.
        app_key: the key of the app named by the route's app id.
        secrets: the app's active secrets.
        now: the current Unix time in seconds.
    """
    values = dict(params)
    if any(not values.get(name) for name in _REST_AUTH_PARAMS):
        return Reason.HTTP_AUTH_MISSING
    if values["auth_version"] != "1.0":
        return Reason.HTTP_AUTH_VERSION
    if not hmac.compare_digest(values["auth_key"].encode(), app_key.encode()):
        return Reason.HTTP_AUTH_KEY
    try:
        timestamp = int(values["auth_timestamp"])
    except ValueError:
        return Reason.HTTP_TIMESTAMP
    if abs(now - timestamp) > REST_TIMESTAMP_WINDOW:
        return Reason.HTTP_TIMESTAMP
    body_md5 = values.get("body_md5")
    if body or body_md5 is not None:
        digest = _MD5.copy()
        digest.update(body)
        expected_md5 = digest.hexdigest()
        if body_md5 is None or not hmac.compare_digest(body_md5.encode(), expected_md5.encode()):
            return Reason.HTTP_BODY_MD5
    message = rest_string_to_sign(method, path, params)
    signature = values["auth_signature"].encode("ascii", "replace")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(sign(secret, message).encode(), signature)
    return None if matched else Reason.HTTP_SIGNATURE


def webhook_signature(secret: bytes, body: bytes) -> str:
    """``X-Pusher-Signature``: lowercase hex HMAC-SHA256 of the raw body."""
    return hmac_sha256_hex(secret, body)
