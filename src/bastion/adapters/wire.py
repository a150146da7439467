"""Bus messages on the wire: encode, sign, verify, and refuse replays. Pure.

Wire format (one Redis pub/sub payload)::

    <64 lowercase hex HMAC-SHA256 of JSON>.<JSON>

The JSON is compact, ASCII-escaped UTF-8 (a lone surrogate in relayed data cannot
break it): an envelope ``{"v":2,"o":origin node id,"q":sequence,"t":sent at (Unix
ms),"k":kind,"a":app id, …}`` with exactly the fields of its kind:

=========  =====================================  ==================================
kind       message                                fields
=========  =====================================  ==================================
``e``      :class:`~.messages.ChannelEvent`       ``c`` channel, ``e`` event, ``d``
                                                  data, ``x`` excluded socket id or
                                                  null, ``u`` user id or null, ``l``
                                                  true for a client event
``he``     a recorded :class:`~.messages.         ``c``, ``e``, ``d`` (a string), ``x``
           ChannelEvent` (channel history)
``ma``     :class:`~.messages.MemberAdded`        ``c``, ``u``, ``d`` user_info, ``x``
``mr``     :class:`~.messages.MemberRemoved`      ``c``, ``u``
``sc``     :class:`~.messages.SubscriptionCount`  ``c``, ``m`` count
``on``     :class:`~.messages.UserOnline`         ``u``
``off``    :class:`~.messages.UserOffline`        ``u``
``tm``     :class:`~.messages.Terminate`          ``u``
``rp``     :class:`~.messages.Replaced`           ``u``, ``s`` list of socket ids
``su``     :class:`~.messages.Suspend`            ``u``, ``m`` cool-down (ms)
=========  =====================================  ==================================

Control messages are messages of their own kind, never events with reserved
names: a receiver cannot mistake one for the other.

A recorded event (``he``) is published by the history's Redis script, which
gives it its position and puts ``pos:<epoch>:<offset>`` and a newline in front
of the signed message.
The position is Redis's: the MAC does not cover it (docs/scaling.md, "What a
Redis writer can do"). :func:`split_position` takes it off; a recorded event
without one, or any other message with one, is refused.

The MAC is checked (in constant time) *before* the JSON is parsed, so
unauthenticated bytes are never handed to a parser; a payload that fails any
check raises :class:`BusMessageError` with a short reason slug and nothing else.

Replays: every node numbers its messages (``q``, from 1 for each process start,
whose node id is new). :class:`ReplayWindows` accepts each ``(origin, q)`` once,
with a window of :data:`WINDOW` sequence numbers for messages that arrive out
of order, so a captured message cannot be delivered twice however fast the
cluster publishes; a message older than the time window is refused as stale
before that (:func:`is_stale`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bastion.adapters.messages import (
    ChannelEvent,
    MemberAdded,
    MemberRemoved,
    Message,
    Replaced,
    SubscriptionCount,
    Suspend,
    Terminate,
    UserOffline,
    UserOnline,
)
from bastion.protocol.positions import parse_position
from bastion.protocol.signing import hmac_sha256_hex

__all__ = [
    "MAC_HEX_LENGTH",
    "REPLAY_WINDOW_MS",
    "VERSION",
    "WINDOW",
    "BusMessageError",
    "Envelope",
    "ReplayWindows",
    "cluster_key",
    "decode",
    "encode",
    "encode_recorded",
    "is_stale",
    "split_position",
]

#: Format version carried in every message (``v``).
VERSION = 2
#: Length of the hex MAC that starts every message.
MAC_HEX_LENGTH = 64
#: Messages older (or newer) than this, by the sender's clock, are stale: bounds how
#: long an origin must be remembered. Nodes need NTP-synced clocks.
REPLAY_WINDOW_MS = 60_000
#: Sequence numbers below an origin's highest that may still arrive (out of order).
WINDOW = 1024
#: Origins remembered at most (authenticated node ids: a handful in practice).
MAX_ORIGINS = 10_000
#: Domain-separation labels: a bus key is never the same bytes as any other key.
_LABEL_EXPLICIT = b"bastion/bus/v1/cluster-secret"
_LABEL_DERIVED = b"bastion/bus/v1/derived-from-app-secrets"
_ENVELOPE = frozenset("voqtka")
_FIELDS: dict[str, frozenset[str]] = {
    "e": _ENVELOPE | {"c", "e", "d", "x", "u", "l"},
    "he": _ENVELOPE | {"c", "e", "d", "x"},
    "ma": _ENVELOPE | {"c", "u", "d", "x"},
    "mr": _ENVELOPE | {"c", "u"},
    "sc": _ENVELOPE | {"c", "m"},
    "on": _ENVELOPE | {"u"},
    "off": _ENVELOPE | {"u"},
    "tm": _ENVELOPE | {"u"},
    "rp": _ENVELOPE | {"u", "s"},
    "su": _ENVELOPE | {"u", "m"},
}
#: Socket ids one ``rp`` message carries at most (a user's oldest connections).
MAX_REPLACED = 1000


class BusMessageError(ValueError):
    """A bus payload was refused; ``reason`` is a short slug (never the payload).

    Reasons: ``too_large``, ``malformed`` (no MAC separator, not hex), ``bad_mac``
    (wrong key or altered bytes), ``bad_body`` (authenticated but not a valid
    message: a peer's bug or a different version), ``bad_position`` (a recorded
    event without a valid position, or another message with one).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message and who sent it when.

    Attributes:
        origin: the sender's node id (receivers drop their own echoes).
        seq: the sender's sequence number of this message (replays are refused).
        sent_at: the sender's wall clock, Unix milliseconds (stale ones are refused).
        message: what is carried.
    """

    origin: str
    seq: int
    sent_at: int
    message: Message


def cluster_key(cluster_secret: str | None, app_secrets: Iterable[str]) -> bytes:
    """The 32-byte key that authenticates bus messages and shared state.

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


def _fields(message: Message) -> dict[str, Any]:
    match message:
        case ChannelEvent():
            return {
                "k": "e",
                "c": message.channel,
                "e": message.event,
                "d": message.data,
                "x": message.exclude_socket_id,
                "u": message.user_id,
                "l": message.client,
            }
        case MemberAdded():
            return {
                "k": "ma",
                "c": message.channel,
                "u": message.user_id,
                "d": message.user_info,
                "x": message.exclude_socket_id,
            }
        case MemberRemoved():
            return {"k": "mr", "c": message.channel, "u": message.user_id}
        case SubscriptionCount():
            return {"k": "sc", "c": message.channel, "m": message.count}
        case UserOnline():
            return {"k": "on", "u": message.user_id}
        case UserOffline():
            return {"k": "off", "u": message.user_id}
        case Terminate():
            return {"k": "tm", "u": message.user_id}
        case Replaced():
            return {"k": "rp", "u": message.user_id, "s": list(message.socket_ids)}
        case Suspend():
            return {"k": "su", "u": message.user_id, "m": message.cooldown_ms}


def encode(envelope: Envelope, key: bytes) -> bytes:
    """The signed wire bytes of ``envelope``."""
    return _signed(envelope, _fields(envelope.message), key)


def encode_recorded(envelope: Envelope, key: bytes) -> bytes:
    """The signed wire bytes of a server event the history records (kind ``he``).

    Raises:
        ValueError: the message is not a server event with string data.
    """
    message = envelope.message
    if not isinstance(message, ChannelEvent) or message.client or not isinstance(message.data, str):
        raise ValueError("only server events are recorded")
    fields = {
        "k": "he",
        "c": message.channel,
        "e": message.event,
        "d": message.data,
        "x": message.exclude_socket_id,
    }
    return _signed(envelope, fields, key)


def _signed(envelope: Envelope, fields: dict[str, Any], key: bytes) -> bytes:
    document = {
        "v": VERSION,
        "o": envelope.origin,
        "q": envelope.seq,
        "t": envelope.sent_at,
        "a": envelope.message.app_id,
        **fields,
    }
    body = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    return hmac_sha256_hex(key, body).encode() + b"." + body


#: What the history's script puts in front of a recorded event.
_POSITION_PREFIX = b"pos:"
#: Longest position prefix read (``pos:`` + a position + the newline).
_MAX_PREFIX = 4 + 33 + 1


def split_position(payload: bytes) -> tuple[str | None, bytes]:
    """The position in front of a recorded event, if any, and the signed message.

    Raises:
        BusMessageError: a ``pos:`` prefix without its newline (``malformed``).
    """
    if not payload.startswith(_POSITION_PREFIX):
        return None, payload
    end = payload.find(b"\n", 0, _MAX_PREFIX)
    if end < 0:
        raise BusMessageError("malformed")
    try:
        position = payload[len(_POSITION_PREFIX) : end].decode("ascii")
    except UnicodeDecodeError:
        raise BusMessageError("malformed") from None
    return position, payload[end + 1 :]


def decode(payload: bytes, key: bytes, max_bytes: int, position: str | None = None) -> Envelope:
    """Verify and parse wire bytes (the signed message, its position taken off).

    A recorded event (kind ``he``) must come with the ``position`` Redis gave it
    (a valid one) and becomes a :class:`ChannelEvent` carrying it; any other
    message must come without.

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
    expected = hmac_sha256_hex(key, body).encode()
    # Constant time over the exact hex text: any other byte (even upper-case hex)
    # never matches, so no byte of a message can be altered.
    if not hmac.compare_digest(expected, given):
        raise BusMessageError("bad_mac")
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        raise BusMessageError("bad_body") from None
    envelope = _from_fields(fields)
    recorded = isinstance(fields, dict) and fields.get("k") == "he"
    if not recorded:
        if position is not None:
            raise BusMessageError("bad_position")
        return envelope
    if parse_position(position) is None:
        raise BusMessageError("bad_position")
    message = envelope.message
    assert isinstance(message, ChannelEvent)
    return Envelope(
        envelope.origin,
        envelope.seq,
        envelope.sent_at,
        ChannelEvent(
            message.app_id,
            message.channel,
            message.event,
            message.data,
            message.exclude_socket_id,
            position=position,
        ),
    )


def _text(fields: dict[str, Any], name: str) -> str:
    value = fields[name]
    if not isinstance(value, str) or not value:
        raise BusMessageError("bad_body")
    return value


def _optional_text(fields: dict[str, Any], name: str) -> str | None:
    value = fields[name]
    if value is None or (isinstance(value, str) and value):
        return value
    raise BusMessageError("bad_body")


def _texts(fields: dict[str, Any], name: str) -> tuple[str, ...]:
    value = fields[name]
    if (
        not isinstance(value, list)
        or len(value) > MAX_REPLACED
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise BusMessageError("bad_body")
    return tuple(value)


def _integer(fields: dict[str, Any], name: str) -> int:
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BusMessageError("bad_body")
    return value


def _from_fields(fields: Any) -> Envelope:
    if not isinstance(fields, dict) or fields.get("v") != VERSION:
        raise BusMessageError("bad_body")
    kind = fields.get("k")
    expected = _FIELDS.get(kind) if isinstance(kind, str) else None
    if expected is None or expected != frozenset(fields):
        raise BusMessageError("bad_body")
    origin = _text(fields, "o")
    seq = _integer(fields, "q")
    sent_at = _integer(fields, "t")
    app_id = _text(fields, "a")
    message: Message
    if kind == "he":
        data = fields["d"]
        if not isinstance(data, str):
            raise BusMessageError("bad_body")
        message = ChannelEvent(
            app_id, _text(fields, "c"), _text(fields, "e"), data, _optional_text(fields, "x")
        )
    elif kind == "e":
        client = fields["l"]
        if not isinstance(client, bool):
            raise BusMessageError("bad_body")
        message = ChannelEvent(
            app_id,
            _text(fields, "c"),
            _text(fields, "e"),
            fields["d"],
            _optional_text(fields, "x"),
            _optional_text(fields, "u"),
            client,
        )
    elif kind == "ma":
        message = MemberAdded(
            app_id, _text(fields, "c"), _text(fields, "u"), fields["d"], _optional_text(fields, "x")
        )
    elif kind == "mr":
        message = MemberRemoved(app_id, _text(fields, "c"), _text(fields, "u"))
    elif kind == "sc":
        message = SubscriptionCount(app_id, _text(fields, "c"), _integer(fields, "m"))
    elif kind == "on":
        message = UserOnline(app_id, _text(fields, "u"))
    elif kind == "off":
        message = UserOffline(app_id, _text(fields, "u"))
    elif kind == "tm":
        message = Terminate(app_id, _text(fields, "u"))
    elif kind == "rp":
        message = Replaced(app_id, _text(fields, "u"), _texts(fields, "s"))
    else:
        message = Suspend(app_id, _text(fields, "u"), _integer(fields, "m"))
    return Envelope(origin, seq, sent_at, message)


def is_stale(sent_at: int, now_ms: int) -> bool:
    """Whether a message sent at ``sent_at`` is outside the time window at ``now_ms``."""
    return abs(now_ms - sent_at) > REPLAY_WINDOW_MS


class ReplayWindows:
    """Accepts each ``(origin, seq)`` once: a sliding window per origin.

    An origin's state is its highest sequence number and a bit mask of which of the
    :data:`WINDOW` numbers below it arrived (the anti-replay window of IPsec, RFC
    4303 §3.4.3). A number above the highest slides the window; one inside it is
    accepted once; one below it is refused. The memory is a few integers per
    origin, whatever the rate. An origin not heard from for the time window is
    forgotten (any message of it would be stale by then), and at most
    ``max_origins`` are kept (the least recently heard from goes first).

    Args:
        window: how far below the highest number a late message may arrive.
        max_origins: origins remembered at most.
    """

    __slots__ = ("_origins", "max_origins", "window")

    def __init__(self, window: int = WINDOW, max_origins: int = MAX_ORIGINS) -> None:
        self.window = window
        self.max_origins = max_origins
        #: origin → [highest seq, mask of the window below it, last heard (ms)].
        self._origins: OrderedDict[str, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._origins)

    def accept(self, origin: str, seq: int, now_ms: int) -> bool:
        """``True`` the first time ``(origin, seq)`` is seen inside the window."""
        origins = self._origins
        state = origins.get(origin)
        if state is None:
            self._forget_old(now_ms)
            origins[origin] = [seq, 1, now_ms]
            return True
        highest, mask, _ = state
        if seq > highest:
            shift = seq - highest
            mask = ((mask << shift) | 1) if shift < self.window else 1
            state[0] = seq
        else:
            behind = highest - seq
            if behind >= self.window:
                return False
            bit = 1 << behind
            if mask & bit:
                return False
            mask |= bit
        state[1] = mask & ((1 << self.window) - 1)
        state[2] = now_ms
        origins.move_to_end(origin)
        return True

    def _forget_old(self, now_ms: int) -> None:
        origins = self._origins
        while origins:
            oldest = next(iter(origins.values()))
            if len(origins) < self.max_origins and now_ms - oldest[2] <= REPLAY_WINDOW_MS:
                break
            origins.popitem(last=False)
