"""Bus messages between nodes: signed round-trip, tampering, wrong keys, garbage."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.adapters import bus
from bastion.adapters.bus import BusMessage, BusMessageError, cluster_key, decode, encode
from bastion.adapters.local import LocalAdapter
from bastion.adapters.redis import describe_url
from bastion.config import settings_from_mapping
from bastion.core.hub import AppState, Hub, Session
from bastion.protocol import messages as msg

KEY = cluster_key("k" * 32, [])
LIMIT = 1 << 20

MESSAGE = BusMessage(
    origin="node-a",
    id="0123abcd",
    sent_at=1_700_000_000_000,
    app_id="12345",
    channel="private-chat",
    event="client-typing",
    data='{"who":"ünïcode \\" quoted"}',
    exclude_socket_id="123.456",
    user_id="alice",
    client=True,
)

texts = st.text(max_size=40)
messages = st.builds(
    BusMessage,
    origin=st.text(min_size=1, max_size=20),
    id=st.text(min_size=1, max_size=20),
    sent_at=st.integers(min_value=-(2**53), max_value=2**53),
    app_id=st.text(min_size=1, max_size=20),
    channel=st.text(min_size=1, max_size=40),
    event=st.text(min_size=1, max_size=40),
    data=texts,
    exclude_socket_id=st.none() | texts,
    user_id=st.none() | texts,
    client=st.booleans(),
)


def test_round_trip_is_exact() -> None:
    assert decode(encode(MESSAGE, KEY), KEY, LIMIT) == MESSAGE


def test_wire_format_is_hex_mac_dot_compact_json() -> None:
    wire = encode(MESSAGE, KEY)
    mac, dot, body = wire[:64], wire[64:65], wire[65:]
    assert dot == b"." and all(c in b"0123456789abcdef" for c in mac)
    assert body.startswith(b'{"v":1,"o":"node-a","i":"0123abcd","t":1700000000000,"a":"12345"')
    assert body.endswith(b'"x":"123.456","u":"alice","k":"c"}')


@given(messages)
def test_round_trip_any_message(message: BusMessage) -> None:
    assert decode(encode(message, KEY), KEY, LIMIT) == message


@given(messages, st.data())
def test_tampering_with_any_byte_is_refused(message: BusMessage, data: st.DataObject) -> None:
    wire = bytearray(encode(message, KEY))
    index = data.draw(st.integers(0, len(wire) - 1))
    flip = data.draw(st.integers(1, 255))
    wire[index] ^= flip
    with pytest.raises(BusMessageError) as refused:
        decode(bytes(wire), KEY, LIMIT)
    assert refused.value.reason in {"malformed", "bad_mac"}


@given(messages)
def test_a_truncated_or_extended_message_is_refused(message: BusMessage) -> None:
    wire = encode(message, KEY)
    for changed in (wire[:-1], wire + b" ", wire[:64], b""):
        with pytest.raises(BusMessageError):
            decode(changed, KEY, LIMIT)


def test_client_event_data_can_be_any_json_value() -> None:
    data = {"text": "lone \ud800 surrogate", "n": [1, 2.5, None, True]}
    message = BusMessage("o", "i", 1, "a", "private-c", "client-x", data, client=True)
    wire = encode(message, KEY)
    assert wire.isascii()
    assert decode(wire, KEY, LIMIT) == message


def test_the_wrong_key_is_refused() -> None:
    other = cluster_key("o" * 32, [])
    with pytest.raises(BusMessageError) as refused:
        decode(encode(MESSAGE, other), KEY, LIMIT)
    assert refused.value.reason == "bad_mac"


def test_upper_case_mac_is_refused() -> None:
    wire = encode(MESSAGE, KEY)
    with pytest.raises(BusMessageError):
        decode(wire[:64].upper() + wire[64:], KEY, LIMIT)


def test_too_large_is_refused_before_anything_else() -> None:
    wire = encode(MESSAGE, KEY)
    with pytest.raises(BusMessageError) as refused:
        decode(wire, KEY, len(wire) - 1)
    assert refused.value.reason == "too_large"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"v":2}',
        b"[" * 100_000,
        b'{"v":1,"o":"a","i":"b","t":true,"a":"c","c":"d","e":"e","d":"","x":null,"u":null,"k":"s"}',
        b'{"v":1,"o":"","i":"b","t":1,"a":"c","c":"d","e":"e","d":"","x":null,"u":null,"k":"s"}',
        b'{"v":1,"o":"a","i":"b","t":1,"a":"c","c":"d","e":"e","d":"","x":1,"u":null,"k":"s"}',
        b'{"v":1,"o":"a","i":"b","t":1,"a":"c","c":"d","e":"e","d":"","x":null,"u":null,"k":"z"}',
        b'{"v":1,"o":"a","i":"b","t":1,"a":"c","c":"d","e":"e","d":"","x":null,"u":null,"k":"s","y":0}',
        b"\xff\xfe",
    ],
)
def test_authentic_but_invalid_bodies_are_refused(body: bytes) -> None:
    wire = hmac.new(KEY, body, hashlib.sha256).hexdigest().encode() + b"." + body
    with pytest.raises(BusMessageError) as refused:
        decode(wire, KEY, 1 << 22)
    assert refused.value.reason == "bad_body"


@given(st.binary(max_size=300))
def test_garbage_is_only_ever_a_clean_refusal(payload: bytes) -> None:
    with pytest.raises(BusMessageError):
        decode(payload, KEY, LIMIT)


@given(st.binary(max_size=200))
def test_garbage_behind_a_plausible_mac_is_a_clean_refusal(body: bytes) -> None:
    with pytest.raises(BusMessageError):
        decode(b"a" * 64 + b"." + body, KEY, LIMIT)


def test_derived_key_is_order_independent_and_32_bytes() -> None:
    one = cluster_key(None, ["s1", "s2", "s3"])
    assert one == cluster_key(None, ["s3", "s1", "s2"])
    assert len(one) == 32
    assert one != cluster_key(None, ["s1", "s2"])
    # Length-prefixed: moving a boundary between secrets changes the key.
    assert cluster_key(None, ["ab", "c"]) != cluster_key(None, ["a", "bc"])


def test_explicit_secret_wins_and_differs_from_derived() -> None:
    assert cluster_key("x" * 32, ["s1"]) == cluster_key("x" * 32, ["s2"])
    assert cluster_key("x" * 32, []) != cluster_key(None, ["x" * 32])


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2-password@db.example:6380/3", "redis://db.example:6380/3"),
        ("rediss://user:hunter2-password@10.0.0.1", "rediss://10.0.0.1:6379/0"),
        ("unix:///run/redis.sock?password=hunter2-password", "unix:/run/redis.sock"),
    ],
)
def test_describe_url_never_shows_the_password(url: str, shown: str) -> None:
    assert describe_url(url) == shown


def test_module_is_pure() -> None:
    source = bus.__file__
    assert source is not None
    with open(source, encoding="utf-8") as handle:
        text = handle.read()
    for forbidden in ("import asyncio", "import time", "import random", "import socket"):
        assert forbidden not in text


# --- the hub's side: deliver_remote and the client-event publish ------------------------


class RecordingAdapter(LocalAdapter):
    """A local adapter that records what the hub hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[Any, ...]] = []

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: Any,
        exclude_socket_id: str | None,
        user_id: str | None = None,
        *,
        client: bool = False,
    ) -> None:
        self.published.append((app_id, channel, event, data, exclude_socket_id, user_id, client))


def _hub() -> tuple[Hub, RecordingAdapter, AppState]:
    settings = settings_from_mapping(
        {"apps": [{"id": "1", "key": "k", "secret": "s", "enable_client_messages": True}]},
        environ={},
    )
    adapter = RecordingAdapter()
    hub = Hub(settings, str.encode, lambda: 100.0, adapter)
    return hub, adapter, hub.apps_by_id["1"]


def _session(hub: Hub, app: AppState, socket_id: str) -> tuple[Session, list[bytes]]:
    written: list[bytes] = []
    session = Session(socket_id, written.append, lambda refused: None)
    assert hub.admit(app) is None
    return session, written


def test_deliver_remote_writes_what_a_local_publish_writes_and_never_republishes() -> None:
    hub, adapter, app = _hub()
    one, one_written = _session(hub, app, "1.1")
    two, two_written = _session(hub, app, "2.2")
    for session in (one, two):
        hub.subscribe(app, session, msg.Subscribe(channel="cache-news", auth=None))
    one_written.clear()
    two_written.clear()
    hub.publish(app, ["cache-news"], "ev", "local", exclude_socket_id="2.2")
    local = list(one_written)
    one_written.clear()
    published = len(adapter.published)

    hub.deliver_remote("1", "cache-news", "ev", "local", "2.2", None)
    assert one_written == local and two_written == []
    assert len(adapter.published) == published  # nothing handed back to the bus
    assert hub.cached(app, "cache-news") is not None
    # A client event from elsewhere carries its user_id and leaves the cache alone.
    hub.deliver_remote("1", "cache-news", "client-x", {"a": 1}, None, "u1", client=True)
    assert json.loads(one_written[-1]) == {
        "event": "client-x",
        "channel": "cache-news",
        "data": {"a": 1},
        "user_id": "u1",
    }
    cached = hub.cached(app, "cache-news")
    assert cached is not None and cached.data == "local"
    # Unknown apps and non-string server data are ignored.
    before = (list(one_written), list(two_written))
    hub.deliver_remote("nope", "cache-news", "ev", "x", None, None)
    hub.deliver_remote("1", "cache-news", "ev", {"not": "a string"}, None, None)
    assert (one_written, two_written) == before


def test_deliver_remote_reaches_signed_in_users() -> None:
    hub, _, app = _hub()
    session, written = _session(hub, app, "1.1")
    user_data = json.dumps({"id": "alice"})
    auth = "k:" + hmac.new(b"s", f"1.1::user::{user_data}".encode(), hashlib.sha256).hexdigest()
    hub.signin(app, session, msg.Signin(auth=auth, user_data=user_data))
    written.clear()
    hub.deliver_remote("1", "#server-to-user-alice", "note", "hi", None, None)
    assert json.loads(written[0]) == {
        "event": "note",
        "channel": "#server-to-user-alice",
        "data": "hi",
    }
    hub.deliver_remote("1", "#server-to-user-alice", "note", "hi", "1.1", None)
    assert len(written) == 1  # excluded


def test_client_events_are_published_with_the_presence_user_id() -> None:
    hub, adapter, app = _hub()
    session, _ = _session(hub, app, "1.1")
    channel_data = json.dumps({"user_id": "bob"})
    signed = f"1.1:presence-room:{channel_data}".encode()
    auth = "k:" + hmac.new(b"s", signed, hashlib.sha256).hexdigest()
    hub.subscribe(
        app, session, msg.Subscribe(channel="presence-room", auth=auth, channel_data=channel_data)
    )
    hub.client_event(app, session, msg.ClientEvent("client-wave", "presence-room", {"x": 1}))
    assert adapter.published[-1] == (
        "1",
        "presence-room",
        "client-wave",
        {"x": 1},
        "1.1",
        "bob",
        True,
    )
