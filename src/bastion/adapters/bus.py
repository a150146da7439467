"""Bus messages between nodes: encode, sign, verify. Pure: no I/O, no clock.

Wire format (one Redis pub/sub payload)::

    <64 lowercase hex HMAC-SHA256 of JSON>.<JSON>

The JSON is compact UTF-8 with exactly these keys::

    {"v":1,"o":origin node id,"i":message id,"t":sent at (Unix ms),
     "a":app id,"c":channel,"e":event,"d":data,
     "x":exclude socket id or null,"u":user_id or null,"k":"s"|"c"}

``k`` says whether the event came from the server side (REST, ``"s"``) or from a
client (``"c"``): only server events update a cache channel's cache, as locally.
``d`` is the data string of a server event, or a client event's decoded JSON value
(object, string, …), re-encoded by the receiver exactly as the sender's node did.
The JSON is ASCII-escaped, so a lone surrogate in relayed data cannot break it.

The MAC is checked (in constant time) *before* the JSON is parsed, so
unauthenticated bytes are never handed to a parser; a message that fails any check
raises :class:`BusMessageError` with a short reason slug and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAC_HEX_LENGTH",
    "VERSION",
    "BusMessage",
    "BusMessageError",
    "cluster_key",
    "decode",
    "encode",
]

#: Format version carried in every message (``v``).
VERSION = 1
#: Length of the hex MAC that starts every message.
MAC_HEX_LENGTH = 64
#: Domain-separation labels: a bus key is never the same bytes as any other key.
_LABEL_EXPLICIT = b"bastion/bus/v1/cluster-secret"
_LABEL_DERIVED = b"bastion/bus/v1/derived-from-app-secrets"
_KEYS = frozenset("voitacedxuk")


class BusMessageError(ValueError):
    """A bus payload was refused; ``reason`` is a short slug (never the payload).

    Reasons: ``too_large``, ``malformed`` (no MAC separator, not hex), ``bad_mac``
    (wrong key or altered bytes), ``bad_body`` (authenticated but not a valid
    message: a peer's bug or a different version).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BusMessage:
    """One event travelling between nodes.

    Attributes:
        origin: the node id of the sender (receivers drop their own echoes).
        id: a unique message id (receivers drop duplicates: replays).
        sent_at: the sender's wall clock, Unix milliseconds (receivers drop stale ones).
        app_id: the app.
        channel: the Pusher channel (``#server-to-user-{id}`` for a user).
        event: the event name.
        data: the event data: the string as published (server events), or the
            decoded JSON value as the client sent it (client events).
        exclude_socket_id: the socket that must not receive it, if any.
        user_id: the sender's presence user id (client events on presence channels).
        client: a client event (``True``) or a server (REST) event.
    """

    origin: str
    id: str
    sent_at: int
    app_id: str
    channel: str
    event: str
    data: Any
    exclude_socket_id: str | None = None
    user_id: str | None = None
    client: bool = False


def cluster_key(cluster_secret: str | None, app_secrets: Iterable[str]) -> bytes:
    """The 32-byte key that authenticates bus messages.

    With a ``cluster_secret`` the key comes from it alone. Without one it is derived
    from the sorted app secrets (length-prefixed, so no two lists collide), so every
    node configured with the same apps agrees on it without extra configuration.
    """
    if cluster_secret is not None:
        return hmac.new(_LABEL_EXPLICIT, cluster_secret.encode(), hashlib.sha256).digest()
    material = b"".join(
        len(part).to_bytes(4, "big") + part
        for part in sorted(secret.encode() for secret in app_secrets)
    )
    return hmac.new(_LABEL_DERIVED, material, hashlib.sha256).digest()


def encode(message: BusMessage, key: bytes) -> bytes:
    """The signed wire bytes of ``message``."""
    body = json.dumps(
        {
            "v": VERSION,
            "o": message.origin,
            "i": message.id,
            "t": message.sent_at,
            "a": message.app_id,
            "c": message.channel,
            "e": message.event,
            "d": message.data,
            "x": message.exclude_socket_id,
            "u": message.user_id,
            "k": "c" if message.client else "s",
        },
        separators=(",", ":"),
        allow_nan=False,
    ).encode()
    mac = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
    return mac + b"." + body


def decode(payload: bytes, key: bytes, max_bytes: int) -> BusMessage:
    """Verify and parse wire bytes.

    Raises:
        BusMessageError: for anything but an authentic, well-formed message.
    """
    if not isinstance(payload, bytes | bytearray):
        raise BusMessageError("malformed")
    if len(payload) > max_bytes:
        raise BusMessageError("too_large")
    if len(payload) <= MAC_HEX_LENGTH or payload[MAC_HEX_LENGTH] != 0x2E:  # "."
        raise BusMessageError("malformed")
    given = bytes(payload[:MAC_HEX_LENGTH])
    body = bytes(payload[MAC_HEX_LENGTH + 1 :])
    expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
    # Constant time over the exact hex text: any other byte (even upper-case hex)
    # never matches, so no byte of a message can be altered.
    if not hmac.compare_digest(expected, given):
        raise BusMessageError("bad_mac")
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        raise BusMessageError("bad_body") from None
    return _from_fields(fields)


def _from_fields(fields: Any) -> BusMessage:
    if not isinstance(fields, dict) or set(fields) != _KEYS or fields["v"] != VERSION:
        raise BusMessageError("bad_body")
    sent_at = fields["t"]
    if isinstance(sent_at, bool) or not isinstance(sent_at, int):
        raise BusMessageError("bad_body")
    texts = [fields[name] for name in "oiace"]
    if not all(isinstance(text, str) and text for text in texts):
        raise BusMessageError("bad_body")
    exclude, user_id, kind = fields["x"], fields["u"], fields["k"]
    if not (exclude is None or isinstance(exclude, str)):
        raise BusMessageError("bad_body")
    if not (user_id is None or isinstance(user_id, str)):
        raise BusMessageError("bad_body")
    if kind not in ("s", "c"):
        raise BusMessageError("bad_body")
    origin, message_id, app_id, channel, event = texts
    return BusMessage(
        origin,
        message_id,
        sent_at,
        app_id,
        channel,
        event,
        fields["d"],
        exclude,
        user_id,
        kind == "c",
    )
