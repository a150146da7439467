"""Pusher webhook payloads: a hub event becomes one webhook event object.

Pure: no clock, no I/O. The shapes are exactly Pusher's (see the protocol notes,
§16.2), so the official SDKs' webhook validators and existing receivers accept them::

    {"name": "channel_occupied", "channel": "c"}
    {"name": "channel_vacated", "channel": "c"}
    {"name": "member_added", "channel": "presence-c", "user_id": "u"}
    {"name": "member_removed", "channel": "presence-c", "user_id": "u"}
    {"name": "client_event", "channel": "private-c", "event": "client-e",
     "data": "<string>", "socket_id": "1.2"}          # + "user_id" on presence channels
    {"name": "cache_miss", "channel": "cache-c"}
    {"name": "subscription_count", "channel": "c", "subscription_count": 3}

A request body is ``{"time_ms": <ms>, "events": [...]}`` as compact, ASCII-safe JSON,
encoded once by :func:`encode_body`: the signature is computed over those exact bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bastion.config import WebhookEventType
from bastion.core import events as ev
from bastion.protocol.messages import dumps

__all__ = ["WebhookEvent", "encode_body", "event_name", "webhook_event"]

#: One webhook event object, ready to be JSON-encoded.
WebhookEvent = dict[str, Any]


def event_name(event: ev.HubEvent) -> WebhookEventType:
    """The webhook event type (``name``) a hub event produces."""
    match event:
        case ev.ChannelOccupied():
            return "channel_occupied"
        case ev.ChannelVacated():
            return "channel_vacated"
        case ev.MemberAdded():
            return "member_added"
        case ev.MemberRemoved():
            return "member_removed"
        case ev.ClientEventSent():
            return "client_event"
        case ev.CacheMiss():
            return "cache_miss"
        case ev.SubscriptionCountChanged():
            return "subscription_count"
    raise TypeError(f"not a hub event: {event!r}")  # pragma: no cover - exhaustive above


def webhook_event(event: ev.HubEvent) -> WebhookEvent:
    """The Pusher webhook event object for ``event`` (keys in Pusher's order)."""
    body: WebhookEvent = {"name": event_name(event), "channel": event.channel}
    match event:
        case ev.MemberAdded(user_id=user_id) | ev.MemberRemoved(user_id=user_id):
            body["user_id"] = user_id
        case ev.ClientEventSent():
            body["event"] = event.event
            # Pusher sends ``data`` as a string: what the client sent if it was one,
            # else its JSON encoding (the receiver decodes it as it would a channel event).
            body["data"] = event.data if isinstance(event.data, str) else dumps(event.data)
            body["socket_id"] = event.socket_id
            if event.user_id is not None:  # only presence channels carry a user id
                body["user_id"] = event.user_id
        case ev.SubscriptionCountChanged():
            body["subscription_count"] = event.subscription_count
        case _:
            pass
    return body


def encode_body(time_ms: int, events: Sequence[WebhookEvent]) -> bytes:
    """The exact bytes of one webhook request: ``{"time_ms":…,"events":[…]}``.

    Compact and ASCII-safe (``\\uXXXX`` escapes), so any string a client sent, lone
    surrogates included, encodes without error and signs the same everywhere.
    """
    return dumps({"time_ms": time_ms, "events": list(events)}).encode("ascii")
