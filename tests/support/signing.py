"""Pusher signatures computed independently of the server and of the SDKs.

Straight from the spec (§8 channel/user auth, §15.2 REST signing), so a test can craft
a request the SDKs would never send (an old timestamp, a tampered body, ...).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

__all__ = [
    "channel_auth",
    "hmac_hex",
    "signed_rest_request",
    "user_auth",
]


def hmac_hex(secret: str, message: str) -> str:
    """Lowercase hex HMAC-SHA256."""
    return hmac.new(secret.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


def channel_auth(
    key: str, secret: str, socket_id: str, channel: str, channel_data: str | None = None
) -> str:
    """``key:hex(HMAC(secret, socket_id:channel[:channel_data]))``."""
    message = (
        f"{socket_id}:{channel}"
        if channel_data is None
        else f"{socket_id}:{channel}:{channel_data}"
    )
    return f"{key}:{hmac_hex(secret, message)}"


def user_auth(key: str, secret: str, socket_id: str, user_data: str) -> str:
    """``key:hex(HMAC(secret, socket_id::user::user_data))``."""
    return f"{key}:{hmac_hex(secret, f'{socket_id}::user::{user_data}')}"


def signed_rest_request(
    *,
    method: str,
    path: str,
    key: str,
    secret: str,
    body: bytes | str | Mapping[str, Any] | None = None,
    params: Mapping[str, str] | None = None,
    timestamp: int | None = None,
) -> tuple[str, bytes]:
    """Sign a REST call (auth_version 1.0) and return ``(path?query, body_bytes)``.

    ``body`` may be bytes, text, or a mapping (JSON-encoded). ``body_md5`` is added only
    for a non-empty body, as the spec and the Node SDK do.
    """
    if isinstance(body, Mapping):
        body_bytes = json.dumps(body, separators=(",", ":")).encode("utf-8")
    elif isinstance(body, str):
        body_bytes = body.encode("utf-8")
    else:
        body_bytes = body or b""
    query: dict[str, str] = {
        "auth_key": key,
        "auth_timestamp": str(int(time.time()) if timestamp is None else timestamp),
        "auth_version": "1.0",
    }
    if body_bytes:
        query["body_md5"] = hashlib.md5(body_bytes).hexdigest()
    for name, value in (params or {}).items():
        query[name] = value
    canonical = "&".join(f"{k.lower()}={query[k]}" for k in sorted(query, key=str.lower))
    signature = hmac_hex(secret, f"{method.upper()}\n{path}\n{canonical}")
    query["auth_signature"] = signature
    return f"{path}?{urlencode(query)}", body_bytes
