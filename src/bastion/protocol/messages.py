"""Typed Pusher messages: decoding client frames, encoding server frames.

A client frame becomes one of a few small frozen dataclasses, each validated in
its constructor, so an invalid subscribe or client event cannot exist past
:func:`decode_client_message`. The frame's size has already been checked by the
WebSocket layer before this module sees any text.

Server frames are UTF-8 JSON bytes, ready to be framed. They follow the protocol's
"double encoding": ``data`` is a JSON string for every event but ``pusher:error``
and ``pusher:signin_success``, whose ``data`` is an object. The JSON codec is
:mod:`bastion.protocol.codec` (an outgoing frame is always valid UTF-8, lone
surrogates included).
"""

from __future__ import annotations

from typing import Any

import msgspec

from bastion.errors import Refused
from bastion.protocol.codec import dumps, encode, encoded_size, loads
from bastion.protocol.names import RESERVED_EVENT_PREFIXES
from bastion.protocol.positions import Resume, decode_resume
from bastion.protocol.refusals import Reason

__all__ = [
    "MAX_JSON_DEPTH",
    "ClientEvent",
    "ClientMessage",
    "Ping",
    "Pong",
    "Signin",
    "Subscribe",
    "Unsubscribe",
    "cache_miss",
    "channel_event",
    "connection_established",
    "decode_client_message",
    "dumps",
    "encode",
    "encoded_data",
    "error",
    "loads",
    "member_added",
    "member_removed",
    "ping",
    "pong",
    "recovery",
    "signin_success",
    "subscription_count",
    "subscription_error",
    "subscription_succeeded",
    "token_expiring",
    "utf8_size",
    "watchlist_events",
]

#: Deepest JSON nesting accepted in a client frame (the envelope counts as 1).
MAX_JSON_DEPTH = 32

#: Kept under these names for the callers that measure and parse (see :mod:`.codec`).
utf8_size = encoded_size

# The client messages are frozen msgspec structs rather than dataclasses: the same
# immutability and constructor validation (``__post_init__``), built about three
# times faster (one per message on the hot path), and untracked by the cyclic
# garbage collector (``gc=False``: they hold no reference cycle).


class Ping(msgspec.Struct, frozen=True, gc=False):
    """``pusher:ping`` from the client."""


class Pong(msgspec.Struct, frozen=True, gc=False):
    """``pusher:pong`` from the client (answer to a server ping)."""


class Subscribe(msgspec.Struct, frozen=True, gc=False):
    """``pusher:subscribe``: join ``channel``, with ``auth`` when it needs one.

    ``resume`` is Bastion's ``bastion_resume`` (recover missed events once joined;
    :mod:`bastion.protocol.positions`), ``None`` when the client did not ask.
    """

    channel: str
    auth: str | None = None
    channel_data: str | None = None
    resume: Resume | None = None

    def __post_init__(self) -> None:
        if not self.channel:
            raise Refused(Reason.INVALID_DATA, "pusher:subscribe needs a channel")


class Unsubscribe(msgspec.Struct, frozen=True, gc=False):
    """``pusher:unsubscribe``: leave ``channel``."""

    channel: str

    def __post_init__(self) -> None:
        if not self.channel:
            raise Refused(Reason.INVALID_DATA, "pusher:unsubscribe needs a channel")


class Signin(msgspec.Struct, frozen=True, gc=False):
    """``pusher:signin`` with the app server's ``auth`` and the signed ``user_data``."""

    auth: str
    user_data: str

    def __post_init__(self) -> None:
        if not self.auth or not self.user_data:
            raise Refused(Reason.INVALID_DATA, "pusher:signin needs auth and user_data")


class ClientEvent(msgspec.Struct, frozen=True, gc=False):
    """A ``client-*`` event to relay to the channel's other subscribers.

    ``data`` is the decoded JSON value as received (object, string or other).
    """

    event: str
    channel: str
    data: Any

    def __post_init__(self) -> None:
        if not self.event.startswith("client-"):
            raise Refused(Reason.UNKNOWN_EVENT)
        if not self.channel:
            raise Refused(Reason.INVALID_DATA, "client events need a channel")


ClientMessage = Ping | Pong | Subscribe | Unsubscribe | Signin | ClientEvent

#: Messages without fields: one instance each (they are immutable).
_PING = Ping()
_PONG = Pong()


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in item)
    return False


def _data_object(frame: dict[str, Any]) -> dict[str, Any]:
    data = frame.get("data")
    if isinstance(data, str):
        # Some clients double-encode; accept a JSON object inside a string.
        try:
            data = loads(data)
        except Refused as refused:
            if refused.reason is Reason.JSON_TOO_DEEP:
                raise
            data = None
    if not isinstance(data, dict):
        raise Refused(Reason.INVALID_DATA, f"{frame['event']} needs a data object")
    return data


def _optional_str(data: dict[str, Any], field: str, event: str) -> str | None:
    value = data.get(field)
    if value is None or isinstance(value, str):
        return value
    raise Refused(Reason.INVALID_DATA, f"{event} field {field} must be a string")


def decode_client_message(text: str, max_depth: int = MAX_JSON_DEPTH) -> ClientMessage:
    """Decode one client text frame.

    Raises:
        Refused: the frame is not JSON, not an object, too deeply nested, has no
            string ``event``, names an unknown or reserved event, or carries
            ``data`` of the wrong shape.
    """
    frame = loads(text)
    if not isinstance(frame, dict):
        raise Refused(Reason.NOT_AN_OBJECT)
    # A value nests no deeper than its text has opening brackets: most frames are
    # cleared by two counts in C, without walking the parsed value.
    if text.count("{") + text.count("[") > max_depth and _depth_exceeds(frame, max_depth):
        raise Refused(Reason.JSON_TOO_DEEP)
    event = frame.get("event")
    if not isinstance(event, str) or not event:
        raise Refused(Reason.MISSING_EVENT)

    # Client events first: they are most of the traffic (no reserved name starts so).
    if event.startswith("client-"):
        channel = frame.get("channel")
        if not isinstance(channel, str):
            raise Refused(Reason.INVALID_DATA, "client events need a string channel")
        return ClientEvent(event, channel, frame.get("data"))
    if event == "pusher:ping":
        return _PING
    if event == "pusher:pong":
        return _PONG
    if event == "pusher:subscribe":
        data = _data_object(frame)
        channel = data.get("channel")
        if not isinstance(channel, str):
            raise Refused(Reason.INVALID_DATA, "pusher:subscribe needs a string channel")
        raw_resume = data.get("bastion_resume")
        return Subscribe(
            channel=channel,
            auth=_optional_str(data, "auth", event),
            channel_data=_optional_str(data, "channel_data", event),
            # Never refuses the subscribe: a bad field is answered recovered: false.
            resume=None if raw_resume is None else decode_resume(raw_resume),
        )
    if event == "pusher:unsubscribe":
        channel = _data_object(frame).get("channel")
        if not isinstance(channel, str):
            raise Refused(Reason.INVALID_DATA, "pusher:unsubscribe needs a string channel")
        return Unsubscribe(channel=channel)
    if event == "pusher:signin":
        data = _data_object(frame)
        auth = _optional_str(data, "auth", event)
        user_data = _optional_str(data, "user_data", event)
        return Signin(auth=auth or "", user_data=user_data or "")
    if event.startswith(RESERVED_EVENT_PREFIXES):
        raise Refused(Reason.UNKNOWN_EVENT)
    raise Refused(Reason.CLIENT_EVENT_NAME)


# --- server → client ------------------------------------------------------------
#
# Each returns the frame's UTF-8 JSON bytes. The key order is part of the wire
# format as tests and clients read it: event, channel, data, then user_id, then
# bastion_position (history channels only).


#: Channel events, the hot path: a struct encodes faster than a dict, and a string
#: ``data`` or a client event's already-encoded ``data`` (``msgspec.Raw``) is
#: written as is. Unset optional fields are left out of the frame.
class _ChannelEvent(msgspec.Struct, array_like=False, omit_defaults=True, gc=False):
    event: str
    channel: str
    data: Any
    user_id: str | None = None
    bastion_position: str | None = None


_encode_event = msgspec.json.Encoder().encode


def connection_established(socket_id: str, activity_timeout: int) -> bytes:
    """The first frame of every connection.

    Every connection gets one, so the usual case is filled into its encoded form: a
    socket id of digits and one dot needs no escaping at either level of JSON (the
    data is a string holding JSON). Anything else is encoded the general way.
    """
    high, dot, low = socket_id.partition(".")
    if dot and high.isdigit() and low.isdigit() and high.isascii() and low.isascii():
        return b"%s%s%s%d%s" % (
            _ESTABLISHED_HEAD,
            socket_id.encode("ascii"),
            _ESTABLISHED_MIDDLE,
            activity_timeout,
            _ESTABLISHED_TAIL,
        )
    data = dumps({"socket_id": socket_id, "activity_timeout": activity_timeout})
    return encode({"event": "pusher:connection_established", "data": data})


_ESTABLISHED_HEAD = b'{"event":"pusher:connection_established","data":"{\\"socket_id\\":\\"'
_ESTABLISHED_MIDDLE = b'\\",\\"activity_timeout\\":'
_ESTABLISHED_TAIL = b'}"}'


def error(message: str, code: int | None, channel: str | None = None) -> bytes:
    """``pusher:error`` (``data`` is an object, as in Pusher's documentation)."""
    frame: dict[str, Any] = {"event": "pusher:error", "data": {"message": message, "code": code}}
    if channel is not None:
        frame["channel"] = channel
    return encode(frame)


def ping() -> bytes:
    """A server ping (``pusher:ping``)."""
    return b'{"event":"pusher:ping","data":"{}"}'


def pong() -> bytes:
    """The answer to a client ``pusher:ping``."""
    return b'{"event":"pusher:pong","data":"{}"}'


def subscription_succeeded(channel: str, data: str = "{}") -> bytes:
    """``pusher_internal:subscription_succeeded``; ``data`` is presence JSON or ``{}``."""
    return encode(
        {"event": "pusher_internal:subscription_succeeded", "channel": channel, "data": data}
    )


def subscription_error(channel: str, error_type: str, message: str, status: int) -> bytes:
    """``pusher:subscription_error`` on ``channel`` (soketi-style body)."""
    return encode(
        {
            "event": "pusher:subscription_error",
            "channel": channel,
            "data": {"type": error_type, "error": message, "status": status},
        }
    )


def channel_event(
    event: str,
    channel: str,
    data: Any,
    user_id: str | None = None,
    position: str | None = None,
) -> bytes:
    """An event delivered on a channel; ``data`` exactly as the publisher sent it.

    ``data`` is a server event's string, a client event's decoded value, or that
    value already encoded (:func:`encoded_data`), which is written as is.
    ``position`` is the event's place in the channel's history
    (``bastion_position``), for channels that have one: pusher-js and the other
    clients ignore the field.
    """
    try:
        return _encode_event(_ChannelEvent(event, channel, data, user_id, position))
    except UnicodeEncodeError:
        frame: dict[str, Any] = {"event": event, "channel": channel, "data": data}
        if user_id is not None:
            frame["user_id"] = user_id
        if position is not None:
            frame["bastion_position"] = position
        return encode(frame)


def encoded_data(value: Any) -> msgspec.Raw:
    """A client event's data encoded once: its size is measured and its bytes relayed."""
    return msgspec.Raw(encode(value))


def member_added(channel: str, user_id: str, user_info: Any) -> bytes:
    """``pusher_internal:member_added``."""
    data = dumps({"user_id": user_id, "user_info": user_info})
    return encode({"event": "pusher_internal:member_added", "channel": channel, "data": data})


def member_removed(channel: str, user_id: str) -> bytes:
    """``pusher_internal:member_removed``."""
    data = dumps({"user_id": user_id})
    return encode({"event": "pusher_internal:member_removed", "channel": channel, "data": data})


def cache_miss(channel: str) -> bytes:
    """``pusher:cache_miss`` after subscribing to an empty cache channel."""
    return encode({"event": "pusher:cache_miss", "channel": channel, "data": "{}"})


def subscription_count(channel: str, count: int) -> bytes:
    """``pusher_internal:subscription_count``."""
    data = dumps({"subscription_count": count})
    return encode({"event": "pusher_internal:subscription_count", "channel": channel, "data": data})


def signin_success(user_data: str) -> bytes:
    """``pusher:signin_success`` echoing the signed ``user_data`` string."""
    return encode({"event": "pusher:signin_success", "data": {"user_data": user_data}})


def watchlist_events(events: list[tuple[str, list[str]]]) -> bytes:
    """``pusher_internal:watchlist_events`` as pusher-js's watchlist facade reads it."""
    data = dumps({"events": [{"name": name, "user_ids": ids} for name, ids in events]})
    return encode({"event": "pusher_internal:watchlist_events", "data": data})


def recovery(
    channel: str,
    *,
    recovered: bool,
    position: str | None,
    replayed: int = 0,
    reason: str | None = None,
) -> bytes:
    """``bastion:recovery``: whether a resume got every missed event (after the replay).

    Not a ``pusher_internal:`` event, so pusher-js hands it to the channel's
    ``bind`` handlers with ``data`` parsed. ``position`` (absent when the channel has
    no history) is where the client now is; ``reason`` says why it is ``false``.
    """
    answer: dict[str, Any] = {"recovered": recovered}
    if recovered:
        answer["replayed"] = replayed
    else:
        answer["reason"] = reason
    if position is not None:
        answer["position"] = position
    return encode({"event": "bastion:recovery", "channel": channel, "data": dumps(answer)})


def token_expiring(expires_in: int) -> bytes:
    """``bastion:token_expiring``: sign in again with a fresh token within ``expires_in`` s.

    Not a ``pusher_internal:`` event, so pusher-js hands it to ``pusher.bind``
    (global) handlers with ``data`` parsed to ``{"expires_in": N}``.
    """
    data = dumps({"expires_in": expires_in})
    return encode({"event": "bastion:token_expiring", "data": data})
