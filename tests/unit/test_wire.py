"""Bus messages on the wire: signed round trip, tampering, wrong keys, garbage, replays."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.adapters import wire
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
from bastion.adapters.redis import describe_url
from bastion.adapters.wire import (
    BusMessageError,
    Envelope,
    ReplayWindows,
    cluster_key,
    decode,
    encode,
)

KEY = cluster_key("k" * 32, [])
LIMIT = 1 << 20

EVENT = ChannelEvent(
    app_id="12345",
    channel="private-chat",
    event="client-typing",
    data='{"who":"ünïcode \\" quoted"}',
    exclude_socket_id="123.456",
    user_id="alice",
    client=True,
)
ENVELOPE = Envelope(origin="node-a", seq=7, sent_at=1_700_000_000_000, message=EVENT)

names = st.text(min_size=1, max_size=30)
optional = st.none() | names
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(ChannelEvent, names, names, names, json_values, optional, optional, st.booleans()),
    st.builds(MemberAdded, names, names, names, json_values, optional),
    st.builds(MemberRemoved, names, names, names),
    st.builds(SubscriptionCount, names, names, st.integers(0, 2**40)),
    st.builds(UserOnline, names, names),
    st.builds(UserOffline, names, names),
    st.builds(Terminate, names, names),
    st.builds(Replaced, names, names, st.lists(names, max_size=5).map(tuple)),
    st.builds(Suspend, names, names, st.integers(0, 2**40)),
)
envelopes = st.builds(Envelope, names, st.integers(0, 2**53), st.integers(0, 2**53), messages)


def test_round_trip_is_exact() -> None:
    assert decode(encode(ENVELOPE, KEY), KEY, LIMIT) == ENVELOPE


def test_wire_format_is_hex_mac_dot_compact_json() -> None:
    payload = encode(ENVELOPE, KEY)
    mac, dot, body = payload[:64], payload[64:65], payload[65:]
    assert dot == b"." and all(c in b"0123456789abcdef" for c in mac)
    assert body.startswith(b'{"v":2,"o":"node-a","q":7,"t":1700000000000,"a":"12345","k":"e"')
    assert body.endswith(b'"x":"123.456","u":"alice","l":true}')


def test_control_messages_are_their_own_kinds_not_events() -> None:
    kinds: list[tuple[Message, bytes]] = [
        (MemberAdded("1", "presence-r", "u", {"n": 1}, "1.1"), b'"k":"ma"'),
        (MemberRemoved("1", "presence-r", "u"), b'"k":"mr"'),
        (SubscriptionCount("1", "news", 3), b'"k":"sc"'),
        (UserOnline("1", "u"), b'"k":"on"'),
        (UserOffline("1", "u"), b'"k":"off"'),
        (Terminate("1", "u"), b'"k":"tm"'),
        (Replaced("1", "u", ("1.2", "3.4")), b'"k":"rp","u":"u","s":["1.2","3.4"]'),
        (Suspend("1", "u", 300_000), b'"k":"su","u":"u","m":300000'),
    ]
    for message, kind in kinds:
        payload = encode(Envelope("n", 1, 1, message), KEY)
        assert kind in payload and b"pusher_internal" not in payload
        assert decode(payload, KEY, LIMIT).message == message


@given(envelopes)
def test_round_trip_any_message(envelope: Envelope) -> None:
    assert decode(encode(envelope, KEY), KEY, LIMIT) == envelope


@given(envelopes, st.data())
def test_tampering_with_any_byte_is_refused(envelope: Envelope, data: st.DataObject) -> None:
    payload = bytearray(encode(envelope, KEY))
    index = data.draw(st.integers(0, len(payload) - 1))
    payload[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(BusMessageError) as refused:
        decode(bytes(payload), KEY, LIMIT)
    assert refused.value.reason in {"malformed", "bad_mac"}


@given(envelopes)
def test_a_truncated_or_extended_message_is_refused(envelope: Envelope) -> None:
    payload = encode(envelope, KEY)
    for changed in (payload[:-1], payload + b" ", payload[:64], b""):
        with pytest.raises(BusMessageError):
            decode(changed, KEY, LIMIT)


def test_client_event_data_can_be_any_json_value() -> None:
    data = {"text": "lone \ud800 surrogate", "n": [1, 2.5, None, True]}
    message = ChannelEvent("a", "private-c", "client-x", data, client=True)
    payload = encode(Envelope("o", 1, 1, message), KEY)
    assert payload.isascii()
    assert decode(payload, KEY, LIMIT).message == message


def test_the_wrong_key_is_refused() -> None:
    other = cluster_key("o" * 32, [])
    with pytest.raises(BusMessageError) as refused:
        decode(encode(ENVELOPE, other), KEY, LIMIT)
    assert refused.value.reason == "bad_mac"


def test_upper_case_mac_is_refused() -> None:
    payload = encode(ENVELOPE, KEY)
    with pytest.raises(BusMessageError):
        decode(payload[:64].upper() + payload[64:], KEY, LIMIT)


def test_too_large_is_refused_before_anything_else() -> None:
    payload = encode(ENVELOPE, KEY)
    with pytest.raises(BusMessageError) as refused:
        decode(payload, KEY, len(payload) - 1)
    assert refused.value.reason == "too_large"


_GOOD = b'"v":2,"o":"a","q":1,"t":1,"a":"c"'


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"v":1}',
        b"[" * 100_000,
        b"{" + _GOOD + b',"k":"zz","u":"x"}',
        b"{" + _GOOD + b',"k":"on"}',
        b"{" + _GOOD + b',"k":"on","u":"x","y":0}',
        b"{" + _GOOD + b',"k":"on","u":""}',
        b"{" + _GOOD + b',"k":"sc","c":"d","m":-1}',
        b"{" + _GOOD + b',"k":"sc","c":"d","m":true}',
        b"{" + _GOOD + b',"k":"e","c":"d","e":"e","d":"","x":1,"u":null,"l":false}',
        b"{" + _GOOD + b',"k":"e","c":"d","e":"e","d":"","x":null,"u":null,"l":"c"}',
        b'{"v":2,"o":"","q":1,"t":1,"a":"c","k":"on","u":"x"}',
        b'{"v":2,"o":"a","q":1.5,"t":1,"a":"c","k":"on","u":"x"}',
        b'{"v":2,"o":"a","q":1,"t":true,"a":"c","k":"on","u":"x"}',
        b"\xff\xfe",
    ],
)
def test_authentic_but_invalid_bodies_are_refused(body: bytes) -> None:
    payload = hmac.new(KEY, body, hashlib.sha256).hexdigest().encode() + b"." + body
    with pytest.raises(BusMessageError) as refused:
        decode(payload, KEY, 1 << 22)
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
    source = wire.__file__
    assert source is not None
    with open(source, encoding="utf-8") as handle:
        text = handle.read()
    for forbidden in ("import asyncio", "import time", "import random", "import socket"):
        assert forbidden not in text


# --- replays ----------------------------------------------------------------------------


def test_each_sequence_number_is_accepted_once_at_any_rate() -> None:
    windows = ReplayWindows()
    # Far more messages than the old 100,000-id set held, inside one second.
    for seq in range(1, 250_001):
        assert windows.accept("node-a", seq, 1_000)
    for seq in (1, 2, 100_000, 249_000, 250_000):
        assert not windows.accept("node-a", seq, 1_000)
    assert len(windows) == 1


def test_late_messages_inside_the_window_arrive_once() -> None:
    windows = ReplayWindows(window=8)
    assert windows.accept("a", 10, 0)
    assert windows.accept("a", 7, 0)  # late, inside the window
    assert not windows.accept("a", 7, 0)
    assert windows.accept("a", 3, 0)  # 7 behind the highest: still inside
    assert not windows.accept("a", 2, 0)  # 8 behind: outside, refused
    assert windows.accept("a", 100, 0)
    assert not windows.accept("a", 10, 0)


def test_origins_are_independent_and_forgotten_after_the_time_window() -> None:
    windows = ReplayWindows(max_origins=3)
    assert windows.accept("a", 5, 0) and windows.accept("b", 5, 0)
    assert not windows.accept("a", 5, 0)
    later = wire.REPLAY_WINDOW_MS + 1
    assert windows.accept("c", 1, later)  # a and b, silent for the window, go
    assert len(windows) == 1
    # Whatever a forgotten origin sent before is stale by now.
    assert wire.is_stale(0, later)


@given(st.lists(st.integers(1, 3000), max_size=400))
def test_no_sequence_number_is_ever_accepted_twice(seqs: list[int]) -> None:
    windows = ReplayWindows(window=64)
    accepted: set[int] = set()
    for seq in seqs:
        if windows.accept("a", seq, 0):
            assert seq not in accepted
            accepted.add(seq)


# --- recorded events (channel history) -----------------------------------------------------

RECORDED = ChannelEvent("12345", "chat-1", "message", '{"n":1}', "1.2")


def recorded_payload(position: str) -> bytes:
    signed = wire.encode_recorded(Envelope("node-a", 9, 1_700_000_000_000, RECORDED), KEY)
    return b"pos:" + position.encode() + b"\n" + signed


def test_a_recorded_event_carries_the_position_redis_put_in_front() -> None:
    position, signed = wire.split_position(recorded_payload("Qh3x9TzA:42"))
    assert position == "Qh3x9TzA:42"
    envelope = decode(signed, KEY, LIMIT, position)
    assert envelope.message == ChannelEvent(
        "12345", "chat-1", "message", '{"n":1}', "1.2", position="Qh3x9TzA:42"
    )


def test_a_plain_message_has_no_position() -> None:
    payload = encode(ENVELOPE, KEY)
    assert wire.split_position(payload) == (None, payload)


@pytest.mark.parametrize("position", ["", "x", "e:01", "e:-1", "é:1", "a" * 17 + ":1"])
def test_a_recorded_event_with_a_bad_position_is_refused(position: str) -> None:
    with pytest.raises(BusMessageError) as refused:
        found, signed = wire.split_position(recorded_payload(position))
        decode(signed, KEY, LIMIT, found)
    assert refused.value.reason in ("bad_position", "malformed")


def test_a_recorded_event_without_its_position_is_refused() -> None:
    signed = wire.encode_recorded(Envelope("node-a", 9, 1, RECORDED), KEY)
    with pytest.raises(BusMessageError) as refused:
        decode(signed, KEY, LIMIT)
    assert refused.value.reason == "bad_position"


def test_a_position_put_in_front_of_any_other_message_is_refused() -> None:
    payload = b"pos:e:1\n" + encode(ENVELOPE, KEY)
    position, signed = wire.split_position(payload)
    with pytest.raises(BusMessageError) as refused:
        decode(signed, KEY, LIMIT, position)
    assert refused.value.reason == "bad_position"


def test_a_prefix_without_its_newline_is_malformed() -> None:
    with pytest.raises(BusMessageError) as refused:
        wire.split_position(b"pos:" + b"e" * 100)
    assert refused.value.reason == "malformed"


def test_only_server_events_are_recorded() -> None:
    with pytest.raises(ValueError, match="server events"):
        wire.encode_recorded(ENVELOPE, KEY)  # a client event
