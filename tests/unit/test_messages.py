"""Decoding client frames and encoding server frames (spec §2, §3, §6, §7, §9, §12, §13)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.messages import (
    MAX_JSON_DEPTH,
    ClientEvent,
    Ping,
    Pong,
    Signin,
    Subscribe,
    Unsubscribe,
    decode_client_message,
)
from bastion.protocol.refusals import Reason


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def refused(text: str) -> Reason:
    with pytest.raises(Refused) as info:
        decode_client_message(text)
    return info.value.reason


def strict_loads(text: str) -> Any:
    """json.loads that rejects NaN/Infinity, like JavaScript's JSON.parse."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=no_constants)


# --- decoding each message type ------------------------------------------------------


def test_decode_ping_and_pong() -> None:
    assert decode_client_message('{"event":"pusher:ping","data":{}}') == Ping()
    assert decode_client_message('{"event":"pusher:ping"}') == Ping()
    assert decode_client_message('{"event":"pusher:pong","data":"{}"}') == Pong()


def test_decode_public_subscribe() -> None:
    text = frame(event="pusher:subscribe", data={"channel": "my-channel", "auth": ""})
    assert decode_client_message(text) == Subscribe(channel="my-channel", auth="")


def test_decode_presence_subscribe() -> None:
    channel_data = '{"user_id":10,"user_info":{"name":"Mr. Channels"}}'
    text = frame(
        event="pusher:subscribe",
        data={"channel": "presence-foobar", "auth": "key:sig", "channel_data": channel_data},
    )
    assert decode_client_message(text) == Subscribe(
        channel="presence-foobar", auth="key:sig", channel_data=channel_data
    )


def test_decode_subscribe_with_data_as_a_json_string() -> None:
    data = json.dumps({"channel": "private-a", "auth": "key:sig"})
    text = frame(event="pusher:subscribe", data=data)
    assert decode_client_message(text) == Subscribe(channel="private-a", auth="key:sig")


def test_decode_unsubscribe() -> None:
    text = frame(event="pusher:unsubscribe", data={"channel": "my-channel"})
    assert decode_client_message(text) == Unsubscribe(channel="my-channel")
    text = frame(event="pusher:unsubscribe", data=json.dumps({"channel": "my-channel"}))
    assert decode_client_message(text) == Unsubscribe(channel="my-channel")


def test_decode_signin() -> None:
    user_data = '{"id":"12345"}'
    text = frame(event="pusher:signin", data={"auth": "key:sig", "user_data": user_data})
    assert decode_client_message(text) == Signin(auth="key:sig", user_data=user_data)
    text = frame(
        event="pusher:signin", data=json.dumps({"auth": "key:sig", "user_data": user_data})
    )
    assert decode_client_message(text) == Signin(auth="key:sig", user_data=user_data)


@pytest.mark.parametrize("data", [{"a": 1}, "a string", 42, None, [1, 2], True])
def test_decode_client_event_keeps_data_as_received(data: Any) -> None:
    text = frame(event="client-typing", channel="private-a", data=data)
    assert decode_client_message(text) == ClientEvent("client-typing", "private-a", data)


def test_decode_client_event_without_data() -> None:
    text = frame(event="client-typing", channel="private-a")
    assert decode_client_message(text) == ClientEvent("client-typing", "private-a", None)


def test_bare_client_prefix_is_accepted_by_the_decoder() -> None:
    text = frame(event="client-", channel="private-a", data={})
    assert decode_client_message(text) == ClientEvent("client-", "private-a", {})


def test_extra_top_level_fields_are_ignored() -> None:
    text = frame(event="pusher:ping", data={}, user_id="spoofed", channel="x")
    assert decode_client_message(text) == Ping()


def test_messages_are_frozen() -> None:
    sub = Subscribe(channel="a")
    with pytest.raises(AttributeError):
        sub.channel = "b"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("factory", "reason"),
    [
        (lambda: Subscribe(channel=""), Reason.INVALID_DATA),
        (lambda: Unsubscribe(channel=""), Reason.INVALID_DATA),
        (lambda: Signin(auth="", user_data="{}"), Reason.INVALID_DATA),
        (lambda: Signin(auth="k:s", user_data=""), Reason.INVALID_DATA),
        (lambda: ClientEvent("hello", "private-a", None), Reason.UNKNOWN_EVENT),
        (lambda: ClientEvent("client-x", "", None), Reason.INVALID_DATA),
    ],
)
def test_constructors_refuse_invalid_messages(factory: Any, reason: Reason) -> None:
    with pytest.raises(Refused) as info:
        factory()
    assert info.value.reason is reason


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "{", "not json", '{"event":"pusher:ping",}', "{'a':1}"])
def test_malformed_json(text: str) -> None:
    assert refused(text) is Reason.MALFORMED_JSON


@pytest.mark.parametrize("text", ["[]", "null", "1", '"pusher:ping"', "true", "[{}]", "1.5"])
def test_non_object_frames(text: str) -> None:
    assert refused(text) is Reason.NOT_AN_OBJECT


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"data":{}}',
        '{"event":null}',
        '{"event":1}',
        '{"event":["pusher:ping"]}',
        '{"event":{}}',
        '{"event":""}',
        '{"event":true}',
    ],
)
def test_missing_or_non_string_event(text: str) -> None:
    assert refused(text) is Reason.MISSING_EVENT


@pytest.mark.parametrize(
    "event",
    [
        "pusher:foo",
        "pusher:error",
        "pusher:connection_established",
        "pusher:",
        "pusher_internal:x",
        "pusher_internal:subscription_succeeded",
        "pusher_internal:member_added",
    ],
)
def test_unknown_or_reserved_events(event: str) -> None:
    assert refused(frame(event=event, channel="private-a", data={})) is Reason.UNKNOWN_EVENT


@pytest.mark.parametrize(
    "event", ["hello", "my-client-x", "Client-x", "clientx", "PUSHER:ping", " client-x"]
)
def test_names_that_are_not_client_events(event: str) -> None:
    assert refused(frame(event=event, channel="private-a", data={})) is Reason.CLIENT_EVENT_NAME


@pytest.mark.parametrize("event", ["pusher:subscribe", "pusher:unsubscribe", "pusher:signin"])
@pytest.mark.parametrize(
    "data",
    [
        None,  # no data at all
        [],
        1,
        True,
        "not json",
        '"a json string"',
        "[1,2]",
        "null",
    ],
)
def test_system_events_need_a_data_object(event: str, data: Any) -> None:
    fields: dict[str, Any] = {"event": event}
    if data is not None:
        fields["data"] = data
    assert refused(json.dumps(fields)) is Reason.INVALID_DATA


@pytest.mark.parametrize("event", ["pusher:subscribe", "pusher:unsubscribe"])
@pytest.mark.parametrize("channel", [None, 1, ["a"], {"a": 1}, True, ""])
def test_subscribe_needs_a_string_channel(event: str, channel: Any) -> None:
    data = {} if channel is None else {"channel": channel}
    assert refused(frame(event=event, data=data)) is Reason.INVALID_DATA


@pytest.mark.parametrize("field", ["auth", "channel_data"])
@pytest.mark.parametrize("value", [1, {"a": 1}, ["x"], True])
def test_subscribe_optional_fields_must_be_strings(field: str, value: Any) -> None:
    data = {"channel": "presence-a", field: value}
    assert refused(frame(event="pusher:subscribe", data=data)) is Reason.INVALID_DATA


def test_subscribe_null_optional_fields_are_absent() -> None:
    data = {"channel": "private-a", "auth": None, "channel_data": None}
    assert decode_client_message(frame(event="pusher:subscribe", data=data)) == Subscribe(
        channel="private-a"
    )


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"auth": "k:s"},
        {"user_data": "{}"},
        {"auth": "", "user_data": "{}"},
        {"auth": 1, "user_data": "{}"},
        {"auth": "k:s", "user_data": {"id": "1"}},
    ],
)
def test_signin_needs_string_auth_and_user_data(data: dict[str, Any]) -> None:
    assert refused(frame(event="pusher:signin", data=data)) is Reason.INVALID_DATA


@pytest.mark.parametrize("channel", [None, 1, {"a": 1}, ["private-a"], ""])
def test_client_event_needs_a_channel(channel: Any) -> None:
    fields: dict[str, Any] = {"event": "client-x", "data": {}}
    if channel is not None:
        fields["channel"] = channel
    assert refused(json.dumps(fields)) is Reason.INVALID_DATA


# --- nesting --------------------------------------------------------------------------


def nested(depth: int, innermost: str = "{}") -> str:
    """A client event whose envelope plus data nest exactly ``depth`` containers."""
    data = innermost
    for _ in range(depth - 2):
        data = '{"a":' + data + "}"
    return '{"event":"client-x","channel":"private-a","data":' + data + "}"


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert MAX_JSON_DEPTH == 32
    message = decode_client_message(nested(MAX_JSON_DEPTH))
    assert isinstance(message, ClientEvent)


@pytest.mark.parametrize("innermost", ["{}", "[]"])
def test_nesting_over_the_limit_is_refused(innermost: str) -> None:
    assert refused(nested(MAX_JSON_DEPTH + 1, innermost)) is Reason.JSON_TOO_DEEP


def test_depth_limit_is_a_parameter() -> None:
    text = nested(5)
    assert isinstance(decode_client_message(text, max_depth=5), ClientEvent)
    with pytest.raises(Refused) as info:
        decode_client_message(text, max_depth=4)
    assert info.value.reason is Reason.JSON_TOO_DEEP


@pytest.mark.parametrize("depth", [1_000, sys.getrecursionlimit() + 10, 100_000])
def test_very_deep_arrays_are_refused_without_crashing(depth: int) -> None:
    assert refused("[" * depth + "]" * depth) is Reason.JSON_TOO_DEEP
    assert refused('{"event":"client-x","channel":"private-a","data":' + "[" * depth) in (
        Reason.JSON_TOO_DEEP,
        Reason.MALFORMED_JSON,
    )
    balanced = "[" * depth + "]" * depth
    text = '{"event":"client-x","channel":"private-a","data":' + balanced + "}"
    assert refused(text) is Reason.JSON_TOO_DEEP


def test_very_deep_objects_are_refused_without_crashing() -> None:
    depth = 100_000
    assert refused('{"a":' * depth + "1" + "}" * depth) is Reason.JSON_TOO_DEEP


@pytest.mark.parametrize("event", ["pusher:subscribe", "pusher:unsubscribe", "pusher:signin"])
def test_deep_json_inside_string_data_is_refused(event: str) -> None:
    # 2 KB: well under the frame size limit, deep enough for the recursion limit.
    text = frame(event=event, data="[" * 2_000)
    with pytest.raises(Refused):
        decode_client_message(text)


# --- strict JSON from peers -------------------------------------------------------------


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400", '{"a":-1e999}'])
def test_loads_refuses_non_standard_numbers(text: str) -> None:
    with pytest.raises(Refused) as info:
        msg.loads(text)
    assert info.value.reason is Reason.MALFORMED_JSON


def test_loads_refuses_deep_nesting_as_too_deep() -> None:
    with pytest.raises(Refused) as info:
        msg.loads("[" * 100_000 + "]" * 100_000)
    assert info.value.reason is Reason.JSON_TOO_DEEP


@pytest.mark.parametrize(
    "text", ['{"a":[1,2.5,-3e10,"x",null,true]}', b'{"a":1}', "1.7976931348623157e308"]
)
def test_loads_accepts_standard_json(text: str | bytes) -> None:
    assert msg.loads(text) == json.loads(text)


def test_dumps_never_writes_non_finite_numbers() -> None:
    # Never NaN on the wire: no decoded value holds one, and a programming error
    # that makes one yields standard JSON (null), never a token JSON.parse refuses.
    assert msg.dumps({"n": float("nan")}) == '{"n":null}'


# --- fuzzing ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

events = st.sampled_from(
    [
        "pusher:ping",
        "pusher:pong",
        "pusher:subscribe",
        "pusher:unsubscribe",
        "pusher:signin",
        "pusher:foo",
        "pusher_internal:x",
        "client-x",
        "client-",
        "hello",
    ]
)


def decodes_or_refuses(text: str) -> None:
    try:
        message = decode_client_message(text)
    except Refused as exc:
        assert isinstance(exc.reason, Reason)
    else:
        assert isinstance(message, Ping | Pong | Subscribe | Unsubscribe | Signin | ClientEvent)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    decodes_or_refuses(text)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_arbitrary_json_values(value: Any) -> None:
    decodes_or_refuses(json.dumps(value))


@settings(max_examples=250, deadline=None)
@given(
    event=events | st.text(max_size=20) | json_values,
    data=json_values
    | json_values.map(json.dumps)
    | st.fixed_dictionaries(
        {},
        optional={
            "channel": st.text(max_size=10) | json_values,
            "auth": st.text(max_size=10) | json_values,
            "channel_data": st.text(max_size=10) | json_values,
            "user_data": st.text(max_size=10) | json_values,
        },
    ),
    channel=st.none() | st.text(max_size=10) | json_values,
    with_data=st.booleans(),
)
def test_fuzz_frame_shaped_values(event: Any, data: Any, channel: Any, with_data: bool) -> None:
    fields: dict[str, Any] = {"event": event}
    if with_data:
        fields["data"] = data
    if channel is not None:
        fields["channel"] = channel
    decodes_or_refuses(json.dumps(fields))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_decoded_as_text(raw: bytes) -> None:
    decodes_or_refuses(raw.decode("utf-8", "surrogateescape"))


# --- encoders: exact wire JSON -----------------------------------------------------------


def test_connection_established_wire_format() -> None:
    assert msg.connection_established("123.456", 120).decode() == (
        '{"event":"pusher:connection_established",'
        '"data":"{\\"socket_id\\":\\"123.456\\",\\"activity_timeout\\":120}"}'
    )


@given(
    st.one_of(
        st.from_regex(r"\A[0-9]{1,20}\.[0-9]{1,20}\Z"),  # what the node hands out
        st.text(max_size=30),  # anything else takes the general path
    ),
    st.integers(min_value=0, max_value=10**6),
)
def test_connection_established_fills_its_template_as_the_encoder_would(
    socket_id: str, activity_timeout: int
) -> None:
    data = json.dumps(
        {"socket_id": socket_id, "activity_timeout": activity_timeout},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    frame = msg.connection_established(socket_id, activity_timeout)
    assert json.loads(frame) == {"event": "pusher:connection_established", "data": data}
    assert json.loads(json.loads(frame)["data"]) == {
        "socket_id": socket_id,
        "activity_timeout": activity_timeout,
    }


def test_error_data_is_an_object() -> None:
    assert msg.error("Over quota", 4004).decode() == (
        '{"event":"pusher:error","data":{"message":"Over quota","code":4004}}'
    )
    assert msg.error("Auth info required", None, "private-a").decode() == (
        '{"event":"pusher:error","data":{"message":"Auth info required","code":null},'
        '"channel":"private-a"}'
    )


def test_ping_and_pong_wire_format() -> None:
    assert msg.ping().decode() == '{"event":"pusher:ping","data":"{}"}'
    assert msg.pong().decode() == '{"event":"pusher:pong","data":"{}"}'


def test_subscription_succeeded_wire_format() -> None:
    assert msg.subscription_succeeded("my-channel").decode() == (
        '{"event":"pusher_internal:subscription_succeeded","channel":"my-channel","data":"{}"}'
    )
    presence = '{"presence":{"ids":["1"],"hash":{"1":null},"count":1}}'
    wire = json.loads(msg.subscription_succeeded("presence-a", presence))
    assert wire == {
        "event": "pusher_internal:subscription_succeeded",
        "channel": "presence-a",
        "data": presence,
    }


def test_subscription_error_wire_format() -> None:
    assert msg.subscription_error("private-a", "AuthError", "Invalid signature", 401).decode() == (
        '{"event":"pusher:subscription_error","channel":"private-a",'
        '"data":{"type":"AuthError","error":"Invalid signature","status":401}}'
    )


def test_channel_event_wire_format() -> None:
    assert msg.channel_event("my-event", "my-channel", '{"a":1}').decode() == (
        '{"event":"my-event","channel":"my-channel","data":"{\\"a\\":1}"}'
    )
    assert msg.channel_event("client-x", "presence-a", {"a": 1}, user_id="7").decode() == (
        '{"event":"client-x","channel":"presence-a","data":{"a":1},"user_id":"7"}'
    )


def test_member_events_wire_format() -> None:
    assert msg.member_added("presence-a", "7", {"name": "x"}).decode() == (
        '{"event":"pusher_internal:member_added","channel":"presence-a",'
        '"data":"{\\"user_id\\":\\"7\\",\\"user_info\\":{\\"name\\":\\"x\\"}}"}'
    )
    assert msg.member_removed("presence-a", "7").decode() == (
        '{"event":"pusher_internal:member_removed","channel":"presence-a",'
        '"data":"{\\"user_id\\":\\"7\\"}"}'
    )


def test_cache_miss_wire_format() -> None:
    assert msg.cache_miss("cache-a").decode() == (
        '{"event":"pusher:cache_miss","channel":"cache-a","data":"{}"}'
    )


def test_subscription_count_wire_format() -> None:
    assert msg.subscription_count("my-channel", 3).decode() == (
        '{"event":"pusher_internal:subscription_count","channel":"my-channel",'
        '"data":"{\\"subscription_count\\":3}"}'
    )


def test_signin_success_data_is_an_object_echoing_the_string() -> None:
    assert msg.signin_success('{"id":"1"}').decode() == (
        '{"event":"pusher:signin_success","data":{"user_data":"{\\"id\\":\\"1\\"}"}}'
    )


def test_watchlist_events_wire_format() -> None:
    # Spec §9.3: the exact shape pusher-js's watchlist facade reads.
    assert msg.watchlist_events([("online", ["1", "2"]), ("offline", ["3"])]).decode() == (
        '{"event":"pusher_internal:watchlist_events","data":"{\\"events\\":['
        '{\\"name\\":\\"online\\",\\"user_ids\\":[\\"1\\",\\"2\\"]},'
        '{\\"name\\":\\"offline\\",\\"user_ids\\":[\\"3\\"]}]}"}'
    )


@pytest.mark.parametrize(
    "text",
    [
        msg.connection_established("1.2", 120),
        msg.ping(),
        msg.pong(),
        msg.subscription_succeeded("a"),
        msg.member_added("presence-a", "1", None),
        msg.member_removed("presence-a", "1"),
        msg.cache_miss("cache-a"),
        msg.subscription_count("a", 1),
        msg.watchlist_events([("online", ["1"])]),
        msg.channel_event("e", "a", "{}"),
    ],
)
def test_data_is_double_encoded_except_error_and_signin_success(text: str) -> None:
    wire = strict_loads(text)
    assert isinstance(wire["data"], str)
    strict_loads(wire["data"])


def test_lone_surrogate_from_a_client_escape_encodes_as_valid_utf8() -> None:
    event = decode_client_message(
        '{"event":"client-x","channel":"private-a","data":{"t":"\\ud800 \\udfff x"}}'
    )
    assert isinstance(event, ClientEvent)
    assert event.data == {"t": "\ud800 \udfff x"}
    frame = msg.channel_event(event.event, event.channel, event.data)
    text = frame.decode("utf-8")  # valid UTF-8: the surrogates are escaped
    assert "\\ud800" in text
    assert strict_loads(text)["data"] == {"t": "\ud800 \udfff x"}
    relayed = msg.channel_event(event.event, event.channel, msg.encoded_data(event.data))
    assert relayed == frame


def test_non_ascii_is_written_as_utf8() -> None:
    frame = msg.channel_event("e", "a", {"t": "h\u00e9llo \U0001f600"})
    assert "h\u00e9llo \U0001f600".encode() in frame  # not six-byte escapes
    assert strict_loads(frame.decode("utf-8"))["data"] == {"t": "h\u00e9llo \U0001f600"}


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_client_event_data_roundtrips_through_the_encoder(data: Any) -> None:
    assume(_depth(data) < MAX_JSON_DEPTH)  # the envelope is one level
    event = decode_client_message(frame(event="client-x", channel="private-a", data=data))
    assert isinstance(event, ClientEvent)
    out = msg.channel_event(event.event, event.channel, msg.encoded_data(event.data), "1")
    assert strict_loads(out.decode("utf-8")) == {
        "event": "client-x",
        "channel": "private-a",
        "data": data,
        "user_id": "1",
    }


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_relayed_client_events_are_always_strict_json(literal: str) -> None:
    text = '{"event":"client-x","channel":"private-a","data":{"n":' + literal + "}}"
    try:
        event = decode_client_message(text)
    except Refused:
        return
    assert isinstance(event, ClientEvent)
    strict_loads(msg.channel_event(event.event, event.channel, event.data))
