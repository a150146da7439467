"""The client-event gate: whether a ``client-*`` event may be relayed. Pure policy.

Checked in this order, cheapest and most telling first, so a refusal names the
first rule broken:

1. the app enables client events (``CLIENT_EVENTS_DISABLED``);
2. the name is a ``client-`` event name within the length limit (``CLIENT_EVENT_NAME``);
3. the channel is private or presence, never encrypted (``CLIENT_EVENT_ENCRYPTED``,
   ``CLIENT_EVENT_CHANNEL``);
4. the sender is subscribed to it (``CLIENT_EVENT_NOT_SUBSCRIBED``);
5. the connection's bucket, then the app's, then its name's (``client_event_limits``,
   per connection and per user) hold a token (``CLIENT_EVENT_RATE``,
   ``CLIENT_EVENT_APP_RATE``, ``CLIENT_EVENT_TYPE_RATE``, 4301): spent only once the
   event is otherwise acceptable in shape, so a stranger's malformed events cannot
   drain the app's;
6. the data is within ``max_event_payload_bytes`` (``CLIENT_EVENT_TOO_LARGE``);
7. the app's allow-list and JSON Schemas accept it (``CLIENT_EVENT_NOT_ALLOWED``,
   ``CLIENT_EVENT_SCHEMA``, naming the schema keyword and location, never the value).

The buckets are passed in (their state is the caller's); ``now`` is the caller's
clock. Raises :class:`~bastion.errors.Refused`.
"""

from __future__ import annotations

from collections.abc import Callable

from bastion.config import AppSettings
from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.names import ChannelKind, classify_channel, is_client_event_name
from bastion.protocol.refusals import Reason
from bastion.security.limits import RateLimiter
from bastion.security.payload import ClientEventPolicy

__all__ = ["check_client_event"]


def check_client_event(
    event: msg.ClientEvent,
    settings: AppSettings,
    *,
    subscribed: bool,
    data_size: int,
    take_token: Callable[[], bool],
    app_bucket: RateLimiter | None,
    policy: ClientEventPolicy,
    now: float,
    take_type_token: Callable[[], bool] | None = None,
) -> None:
    """Refuse ``event`` unless every rule lets it through (see the module doc).

    Args:
        event: the client event.
        settings: its app's settings.
        subscribed: whether the sender is subscribed to the event's channel here.
        data_size: bytes of the event's data as compact UTF-8 JSON (as relayed).
        take_token: takes a token of the sender's per-connection bucket (``False``:
            it is spent; nothing is taken).
        app_bucket: the app-wide bucket (keyed by app id), if the app has one.
        policy: the app's allow-list and schemas.
        now: the buckets' clock.
        take_type_token: takes a token of the buckets of the event's name, if it
            has a rule (``False``: one is spent; nothing is taken).

    Raises:
        Refused: the first rule broken.
    """
    if not settings.enable_client_messages:
        raise Refused(Reason.CLIENT_EVENTS_DISABLED)
    if not is_client_event_name(event.event, settings.max_event_name_length):
        raise Refused(Reason.CLIENT_EVENT_NAME)
    channel_type = classify_channel(event.channel)
    if channel_type.kind is ChannelKind.ENCRYPTED:
        raise Refused(Reason.CLIENT_EVENT_ENCRYPTED)
    if not channel_type.allows_client_events:
        raise Refused(Reason.CLIENT_EVENT_CHANNEL)
    if not subscribed:
        raise Refused(Reason.CLIENT_EVENT_NOT_SUBSCRIBED)
    if not take_token():
        raise Refused(Reason.CLIENT_EVENT_RATE)
    if app_bucket is not None and app_bucket.take(settings.id, now) > 0:
        raise Refused(Reason.CLIENT_EVENT_APP_RATE)
    if take_type_token is not None and not take_type_token():
        raise Refused(Reason.CLIENT_EVENT_TYPE_RATE)
    if data_size > settings.max_event_payload_bytes:
        raise Refused(Reason.CLIENT_EVENT_TOO_LARGE)
    if policy.active:
        if not policy.allows(event.event):
            raise Refused(Reason.CLIENT_EVENT_NOT_ALLOWED)
        detail = policy.check_data(event.event, event.data)
        if detail is not None:
            raise Refused(Reason.CLIENT_EVENT_SCHEMA, detail)
