"""Webhook payloads: every hub event becomes exactly Pusher's event object, byte for byte."""

from __future__ import annotations

import hashlib
import hmac
import json

import pusher
import pytest

from bastion.core import events as ev
from bastion.webhooks.payloads import encode_body, event_name, webhook_event

TIME_MS = 1_700_000_000_123


def body_of(event: ev.HubEvent) -> bytes:
    return encode_body(TIME_MS, [webhook_event(event)])


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            ev.ChannelOccupied("1", "my-channel"),
            b'{"time_ms":1700000000123,"events":[{"name":"channel_occupied","channel":"my-channel"}]}',
        ),
        (
            ev.ChannelVacated("1", "my-channel"),
            b'{"time_ms":1700000000123,"events":[{"name":"channel_vacated","channel":"my-channel"}]}',
        ),
        (
            ev.MemberAdded("1", "presence-room", "alice"),
            b'{"time_ms":1700000000123,"events":[{"name":"member_added",'
            b'"channel":"presence-room","user_id":"alice"}]}',
        ),
        (
            ev.MemberRemoved("1", "presence-room", "alice"),
            b'{"time_ms":1700000000123,"events":[{"name":"member_removed",'
            b'"channel":"presence-room","user_id":"alice"}]}',
        ),
        (
            ev.ClientEventSent("1", "private-chat", "client-typing", {"a": [1, 2]}, "1.2", None),
            b'{"time_ms":1700000000123,"events":[{"name":"client_event","channel":"private-chat",'
            b'"event":"client-typing","data":"{\\"a\\":[1,2]}","socket_id":"1.2"}]}',
        ),
        (
            ev.ClientEventSent("1", "presence-room", "client-hi", "as is", "3.4", "bob"),
            b'{"time_ms":1700000000123,"events":[{"name":"client_event","channel":"presence-room",'
            b'"event":"client-hi","data":"as is","socket_id":"3.4","user_id":"bob"}]}',
        ),
        (
            ev.CacheMiss("1", "cache-prices"),
            b'{"time_ms":1700000000123,"events":[{"name":"cache_miss","channel":"cache-prices"}]}',
        ),
        (
            ev.SubscriptionCountChanged("1", "news", 7),
            b'{"time_ms":1700000000123,"events":[{"name":"subscription_count",'
            b'"channel":"news","subscription_count":7}]}',
        ),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, bytes) else "",
)
def test_each_event_type_is_byte_exact(event: ev.HubEvent, expected: bytes) -> None:
    assert body_of(event) == expected
    assert json.loads(expected)["events"][0]["name"] == event_name(event)


def test_client_event_data_string_is_passed_through_unchanged() -> None:
    # A string the client sent is already what Pusher forwards: no double encoding.
    raw = '{"already":"json"}'
    payload = webhook_event(ev.ClientEventSent("1", "private-c", "client-x", raw, "1.1", None))
    assert payload["data"] == raw


def test_client_event_data_non_string_values_are_json_encoded() -> None:
    for data, text in [(5, "5"), (None, "null"), (True, "true"), ([1, "a"], '[1,"a"]')]:
        payload = webhook_event(ev.ClientEventSent("1", "private-c", "client-x", data, "1.1", None))
        assert payload["data"] == text


def test_private_client_event_has_no_user_id() -> None:
    payload = webhook_event(ev.ClientEventSent("1", "private-c", "client-x", "d", "1.1", None))
    assert "user_id" not in payload


def test_body_is_ascii_safe_even_for_lone_surrogates() -> None:
    event = ev.ClientEventSent("1", "private-c", "client-x", "é \ud800 😀", "1.1", None)
    body = body_of(event)
    body.decode("ascii")  # nothing outside ASCII on the wire
    assert json.loads(body)["events"][0]["data"] == "é \ud800 😀"


def test_several_events_keep_their_order() -> None:
    events = [ev.ChannelOccupied("1", "a"), ev.SubscriptionCountChanged("1", "a", 1)]
    body = encode_body(5, [webhook_event(e) for e in events])
    assert body == (
        b'{"time_ms":5,"events":[{"name":"channel_occupied","channel":"a"},'
        b'{"name":"subscription_count","channel":"a","subscription_count":1}]}'
    )


def test_signature_over_the_body_is_accepted_by_the_official_python_sdk() -> None:
    import time

    body = encode_body(int(time.time() * 1000), [webhook_event(ev.ChannelOccupied("1", "c"))])
    signature = hmac.new(b"secret", body, hashlib.sha256).hexdigest()
    sdk = pusher.Pusher(app_id="1", key="key", secret="secret")
    decoded = sdk.validate_webhook("key", signature, body)
    assert decoded is not None
    assert decoded["events"] == [{"name": "channel_occupied", "channel": "c"}]
    assert sdk.validate_webhook("key", signature, body + b" ") is None
