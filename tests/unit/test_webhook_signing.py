"""Webhook headers: the published vector, the exact Content-Type, the official SDK agrees."""

from __future__ import annotations

import json

import pusher
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.webhooks.signing import CONTENT_TYPE, signature, webhook_headers

VECTOR = "2677ad3e7c090b2fa2c0fb13020d66d5420879b8316eb356a2d60fb9073bc778"


def test_published_vector() -> None:
    assert signature("secret", b'{"hello":"world"}') == VECTOR
    assert signature(b"secret", b'{"hello":"world"}') == VECTOR


def test_headers() -> None:
    headers = webhook_headers(
        key="key", secret="secret", body=b'{"hello":"world"}', idempotency_key="abc123"
    )
    assert headers == {
        "Content-Type": "application/json",
        "X-Pusher-Key": "key",
        "X-Pusher-Signature": VECTOR,
        "Idempotency-Key": "abc123",
    }
    assert CONTENT_TYPE == "application/json"  # pusher-http-node compares for equality


def test_signature_is_lowercase_hex_and_depends_on_every_byte() -> None:
    body = b'{"time_ms":1,"events":[]}'
    value = signature("s3cret-s3cret", body)
    assert value == value.lower() and len(value) == 64
    assert signature("s3cret-s3cret", body + b" ") != value
    assert signature("s3cret-s3creT", body) != value


@settings(max_examples=50, deadline=None)
@given(
    events=st.lists(
        st.fixed_dictionaries({"name": st.just("channel_occupied"), "channel": st.text()}),
        max_size=5,
    )
)
def test_the_official_sdk_validates_what_we_sign(events: list[dict[str, str]]) -> None:
    import time

    client = pusher.Pusher(app_id="1", key="app-key", secret="app-secret-for-tests")
    body = json.dumps({"time_ms": int(time.time() * 1000), "events": events}).encode()
    headers = webhook_headers(
        key="app-key", secret="app-secret-for-tests", body=body, idempotency_key="k"
    )
    decoded = client.validate_webhook(
        key=headers["X-Pusher-Key"], signature=headers["X-Pusher-Signature"], body=body
    )
    assert decoded is not None and decoded["events"] == events
