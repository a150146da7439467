"""Hostile and broken input against a live node.

Every case checks four things (:func:`verdict`):

1. the documented answer: a ``pusher:error`` / ``pusher:subscription_error`` with its
   code, a close with its code, or an HTTP status with a JSON body naming the rule;
2. the refusal is counted in ``node.metrics`` under its slug (and nothing else is);
3. the server logged it, at most at WARNING, and nothing anywhere carries a stack
   trace or sits above WARNING;
4. the server keeps serving: a fresh client subscribes and receives a REST event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    OTHER_APP_KEY,
    OTHER_APP_SECRET,
    HttpResult,
    PusherClient,
    RawWebSocket,
    data_of,
    hmac_hex,
    http_request,
    make_sdk,
    rest,
    signed_target,
)

from bastion.server.runtime import Node

Verdict = Callable[[dict[str, int]], Awaitable[None]]

EVENTS = f"/apps/{APP_ID}/events"
BATCH = f"/apps/{APP_ID}/batch_events"


@pytest.fixture
async def node(make_node) -> Node:
    """The node every test here uses: a short handshake timeout for slow heads."""
    return await make_node(server={"handshake_timeout": 0.5})


def refusal_totals(node: Node) -> dict[str, int]:
    """Refusals by slug, summed over apps."""
    totals: Counter[str] = Counter()
    for (slug, _), count in node.metrics.refusals.items():
        totals[slug] += count
    return dict(totals)


@pytest.fixture
def verdict(node: Node, logs, still_serving) -> Verdict:
    """Check the refusal counts, the logs, and that the node still serves."""

    async def check(expected: dict[str, int]) -> None:
        assert refusal_totals(node) == expected
        for slug in expected:
            logs.assert_refusal_logged(slug)
        logs.assert_clean()
        await still_serving()
        assert refusal_totals(node) == expected, "the healthy client was refused something"
        logs.assert_clean()

    return check


async def expect_error(client: PusherClient, code: int | None) -> dict[str, Any]:
    """The next frame is ``pusher:error`` with ``code``; the connection stays usable."""
    message = await client.expect("pusher:error")
    assert message["data"]["code"] == code, message
    assert isinstance(message["data"]["message"], str) and message["data"]["message"]
    await client.barrier()
    return message


async def expect_subscription_error(
    client: PusherClient, channel: str, error_type: str, status: int
) -> dict[str, Any]:
    """The next frame is a ``pusher:subscription_error`` on ``channel``."""
    message = await client.expect("pusher:subscription_error", channel)
    assert message["data"]["type"] == error_type, message
    assert message["data"]["status"] == status, message
    await client.barrier()
    return message


async def private_client(node: Node, connect, channel: str = "private-room") -> PusherClient:
    client = await connect(node)
    await client.subscribed(
        channel, f"{APP_KEY}:{hmac_hex(APP_SECRET, f'{client.socket_id}:{channel}')}"
    )
    return client


# --- malformed messages: pusher:error 4300, connection stays open ---------------------------

DEEP_ARRAY = "[" * 9000 + "]" * 9000
DEEP_OBJECT = '{"event":"pusher:ping","data":' + '{"a":' * 40 + "1" + "}" * 40 + "}"

MESSAGE_ERRORS = [
    pytest.param("{", "malformed_json", id="json-open-brace"),
    pytest.param("not json at all", "malformed_json", id="json-prose"),
    pytest.param('{"event":"pusher:ping"', "malformed_json", id="json-truncated"),
    pytest.param('{"event":"a"}{"event":"b"}', "malformed_json", id="json-two-objects"),
    pytest.param("[1," + "9" * 5000 + "]", "malformed_json", id="json-huge-int"),
    pytest.param("[]", "not_an_object", id="frame-[]"),
    pytest.param("null", "not_an_object", id="frame-null"),
    pytest.param('"x"', "not_an_object", id="frame-string"),
    pytest.param("1", "not_an_object", id="frame-number"),
    pytest.param("true", "not_an_object", id="frame-true"),
    pytest.param("{}", "missing_event", id="event-missing"),
    pytest.param('{"event":1}', "missing_event", id="event-number"),
    pytest.param('{"event":""}', "missing_event", id="event-empty"),
    pytest.param('{"event":["pusher:ping"]}', "missing_event", id="event-list"),
    pytest.param('{"event":"pusher:foo","data":{}}', "unknown_event", id="unknown-pusher:foo"),
    pytest.param(
        '{"event":"pusher_internal:member_added","channel":"x","data":"{}"}',
        "unknown_event",
        id="unknown-pusher_internal",
    ),
    pytest.param('{"event":"hello","data":{}}', "client_event_name", id="unknown-hello"),
    pytest.param('{"event":"pusher:subscribe"}', "invalid_data", id="subscribe-no-data"),
    pytest.param('{"event":"pusher:subscribe","data":5}', "invalid_data", id="subscribe-data-5"),
    pytest.param(
        '{"event":"pusher:subscribe","data":"x"}', "invalid_data", id="subscribe-data-str"
    ),
    pytest.param(
        '{"event":"pusher:subscribe","data":{}}', "invalid_data", id="subscribe-no-channel"
    ),
    pytest.param(
        '{"event":"pusher:subscribe","data":{"channel":7}}',
        "invalid_data",
        id="subscribe-channel-7",
    ),
    pytest.param(
        '{"event":"pusher:subscribe","data":{"channel":""}}', "invalid_data", id="subscribe-empty"
    ),
    pytest.param(
        '{"event":"pusher:subscribe","data":{"channel":"private-a","auth":1}}',
        "invalid_data",
        id="subscribe-auth-number",
    ),
    pytest.param('{"event":"pusher:unsubscribe"}', "invalid_data", id="unsubscribe-no-data"),
    pytest.param('{"event":"pusher:signin","data":{}}', "invalid_data", id="signin-empty"),
    pytest.param('{"event":"client-x","data":{}}', "invalid_data", id="client-no-channel"),
    pytest.param(DEEP_ARRAY, "json_too_deep", id="deep-array-9000"),
    pytest.param(DEEP_OBJECT, "json_too_deep", id="deep-object-42"),
]


@pytest.mark.parametrize(("text", "slug"), MESSAGE_ERRORS)
async def test_malformed_message_gets_error_4300(
    node: Node, connect, verdict: Verdict, text: str, slug: str
) -> None:
    client = await connect(node)
    await client.send(text)
    message = await expect_error(client, 4300)
    assert "channel" not in message
    await verdict({slug: 1})


# --- channels ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channel",
    ["has space", "hash#tag", "x" * 165, "emoji-\U0001f600", "colon:name", "slash/name", "#foo"],
)
async def test_invalid_channel_name_gets_subscription_error(
    node: Node, connect, verdict: Verdict, channel: str
) -> None:
    client = await connect(node)
    await client.send({"event": "pusher:subscribe", "data": {"channel": channel}})
    await expect_subscription_error(client, channel, "InvalidChannel", 400)
    await verdict({"subscribe_invalid_channel": 1})


@pytest.mark.parametrize("channel", ["bell-\x07", "x" * 300])
async def test_unechoable_invalid_channel_gets_error(
    node: Node, connect, verdict: Verdict, channel: str
) -> None:
    client = await connect(node)
    await client.send({"event": "pusher:subscribe", "data": {"channel": channel}})
    message = await client.expect("pusher:error")
    assert "channel" not in message, "a name that is unprintable or long is not echoed"
    assert channel not in json.dumps(message)
    await client.barrier()
    await verdict({"subscribe_invalid_channel": 1})


async def test_subscribing_twice_is_idempotent(node: Node, connect, verdict: Verdict) -> None:
    client = await connect(node)
    await client.subscribed("twice")
    await client.subscribed("twice")
    await client.barrier()
    await verdict({})
    assert node.hub.apps_by_id[APP_ID].channels["twice"].subscription_count == 1


async def test_presence_subscribing_twice_adds_no_duplicate_member(
    node: Node, connect, sdk, verdict: Verdict
) -> None:
    channel = "presence-twice"
    watcher, joiner = await connect(node), await connect(node)

    async def join(client: PusherClient, user_id: str) -> dict[str, Any]:
        auth = sdk.authenticate(channel, client.socket_id, {"user_id": user_id})
        return await client.subscribed(channel, auth["auth"], auth["channel_data"])

    await join(watcher, "w")
    await join(joiner, "j")
    await watcher.expect("pusher_internal:member_added", channel)
    again = await join(joiner, "j")
    assert json.loads(again["data"])["presence"]["count"] == 2
    await joiner.barrier()
    await watcher.barrier()  # no second member_added
    await verdict({})


async def test_unsubscribing_from_a_channel_never_joined(
    node: Node, connect, verdict: Verdict
) -> None:
    client = await connect(node)
    await client.send({"event": "pusher:unsubscribe", "data": {"channel": "never-joined"}})
    await client.send({"event": "pusher:unsubscribe", "data": {"channel": "presence-never"}})
    await client.barrier()  # no reply at all
    await client.subscribed("joined-after")
    await verdict({})


async def test_signature_for_another_socket_is_refused(
    node: Node, connect, sdk, verdict: Verdict
) -> None:
    owner, thief = await connect(node), await connect(node)
    auth = sdk.authenticate("private-vault", owner.socket_id)["auth"]
    reply = await thief.subscribe("private-vault", auth)
    assert reply["event"] == "pusher:subscription_error"
    assert reply["channel"] == "private-vault"
    assert reply["data"]["type"] == "AuthError"
    assert reply["data"]["status"] == 401
    await thief.barrier()
    await owner.subscribed("private-vault", auth)  # still good for its own socket
    await verdict({"subscribe_auth_invalid": 1})


@pytest.mark.parametrize(
    "make_auth",
    [
        pytest.param(lambda s: f"{OTHER_APP_KEY}:{hmac_hex(APP_SECRET, s)}", id="other-key"),
        pytest.param(lambda s: f"{APP_KEY}:{hmac_hex(OTHER_APP_SECRET, s)}", id="other-secret"),
        pytest.param(lambda s: f"{APP_KEY}:{hmac_hex(APP_SECRET, s).upper()}", id="upper-hex"),
        pytest.param(lambda s: hmac_hex(APP_SECRET, s), id="no-key-part"),
        pytest.param(lambda s: f"{APP_KEY}:{hmac_hex(APP_SECRET, s + 'x')}", id="other-string"),
        pytest.param(lambda s: f"{APP_KEY}:", id="empty-signature"),
    ],
)
async def test_bad_private_signatures_are_refused(
    node: Node, connect, verdict: Verdict, make_auth: Callable[[str], str]
) -> None:
    client = await connect(node)
    auth = make_auth(f"{client.socket_id}:private-vault")
    await client.send(
        {"event": "pusher:subscribe", "data": {"channel": "private-vault", "auth": auth}}
    )
    await expect_subscription_error(client, "private-vault", "AuthError", 401)
    await verdict({"subscribe_auth_invalid": 1})


@pytest.mark.parametrize("channel", ["private-x", "presence-x", "private-encrypted-x"])
async def test_missing_auth_is_refused(node: Node, connect, verdict: Verdict, channel) -> None:
    client = await connect(node)
    await client.send({"event": "pusher:subscribe", "data": {"channel": channel, "auth": ""}})
    await expect_subscription_error(client, channel, "AuthError", 401)
    await verdict({"subscribe_auth_missing": 1})


@pytest.mark.parametrize(
    "channel_data",
    [
        pytest.param("not json", id="not-json"),
        pytest.param("{", id="truncated"),
        pytest.param("[]", id="list"),
        pytest.param('"alice"', id="string"),
        pytest.param('{"user_info":{"name":"x"}}', id="no-user_id"),
        pytest.param('{"user_id":null}', id="user_id-null"),
        pytest.param('{"user_id":true}', id="user_id-bool"),
        pytest.param('{"user_id":""}', id="user_id-empty"),
        pytest.param('{"user_id":{"a":1}}', id="user_id-object"),
        pytest.param('{"user_id":"' + "u" * 129 + '"}', id="user_id-too-long"),
    ],
)
async def test_bad_presence_channel_data_is_refused(
    node: Node, connect, verdict: Verdict, channel_data: str
) -> None:
    client = await connect(node)
    channel = "presence-lobby"
    signature = hmac_hex(APP_SECRET, f"{client.socket_id}:{channel}:{channel_data}")
    reply = await client.subscribe(channel, f"{APP_KEY}:{signature}", channel_data)
    assert reply["event"] == "pusher:subscription_error", reply
    assert reply["data"] == {
        "type": "InvalidChannelData",
        "error": "channel_data must be a JSON object with a user_id",
        "status": 400,
    }
    await client.barrier()
    assert "presence-lobby" not in node.hub.apps_by_id[APP_ID].channels
    await verdict({"subscribe_channel_data": 1})


async def test_sdk_signed_presence_data_without_user_id_is_refused(
    node: Node, connect, sdk, verdict: Verdict
) -> None:
    client = await connect(node)
    auth = sdk.authenticate("presence-lobby", client.socket_id, {"user_info": {"n": 1}})
    reply = await client.subscribe("presence-lobby", auth["auth"], auth["channel_data"])
    assert reply["event"] == "pusher:subscription_error"
    assert reply["data"]["type"] == "InvalidChannelData"
    await client.barrier()
    await verdict({"subscribe_channel_data": 1})


async def test_presence_without_channel_data_or_signin_is_refused(
    node: Node, connect, verdict: Verdict
) -> None:
    client = await connect(node)
    auth = f"{APP_KEY}:{hmac_hex(APP_SECRET, f'{client.socket_id}:presence-lobby')}"
    await client.send(
        {"event": "pusher:subscribe", "data": {"channel": "presence-lobby", "auth": auth}}
    )
    await expect_subscription_error(client, "presence-lobby", "InvalidChannelData", 400)
    await verdict({"subscribe_channel_data": 1})


async def test_server_to_user_channel_needs_signin(node: Node, connect, verdict: Verdict) -> None:
    client = await connect(node)
    await client.send({"event": "pusher:subscribe", "data": {"channel": "#server-to-user-bob"}})
    await expect_subscription_error(client, "#server-to-user-bob", "AuthError", 401)
    await verdict({"subscribe_not_signed_in": 1})


async def test_full_presence_channel_refuses_new_users_only(make_node, connect, logs) -> None:
    node = await make_node(app={"max_presence_members": 1})
    sdk = make_sdk(node.port)
    first, second, first_again = [await connect(node) for _ in range(3)]

    async def join(client: PusherClient, user_id: str) -> dict[str, Any]:
        auth = sdk.authenticate("presence-full", client.socket_id, {"user_id": user_id})
        return await client.subscribe("presence-full", auth["auth"], auth["channel_data"])

    assert (await join(first, "a"))["event"] == "pusher_internal:subscription_succeeded"
    refused = await join(second, "b")
    assert refused["event"] == "pusher:subscription_error"
    assert refused["data"]["type"] == "LimitReached"
    assert refused["data"]["status"] == 403
    await second.barrier()
    # Another socket of a user already present is not a new member.
    assert (await join(first_again, "a"))["event"] == "pusher_internal:subscription_succeeded"
    await first.barrier()
    assert refusal_totals(node) == {"subscribe_presence_full": 1}
    logs.assert_refusal_logged("subscribe_presence_full")
    logs.assert_clean()


async def test_oversize_presence_member_is_refused(node, connect, sdk, verdict) -> None:
    client = await connect(node)
    user = {"user_id": "big", "user_info": {"bio": "y" * 3000}}
    auth = sdk.authenticate("presence-big", client.socket_id, user)
    reply = await client.subscribe("presence-big", auth["auth"], auth["channel_data"])
    assert reply["event"] == "pusher:subscription_error"
    assert reply["data"]["type"] == "LimitReached"
    await client.barrier()
    await verdict({"subscribe_member_too_large": 1})


# --- client events -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event", ["my-client-event", "xclient-x", "Client-x", "pusher-client-x", " client-x"]
)
async def test_client_event_name_must_start_with_client(
    node: Node, connect, verdict: Verdict, event: str
) -> None:
    sender = await private_client(node, connect)
    receiver = await private_client(node, connect)
    await sender.send({"event": event, "channel": "private-room", "data": {}})
    await expect_error(sender, 4300)
    await receiver.barrier()  # nothing relayed
    await sender.send({"event": "client-x", "channel": "private-room", "data": {"ok": 1}})
    relayed = await receiver.expect("client-x", "private-room")
    assert relayed["data"] == {"ok": 1}
    await verdict({"client_event_name": 1})


@pytest.mark.parametrize(
    "event", ["client-\x00nul", "client-tab\there", "client-" + "x" * 200, "client-\x7f"]
)
async def test_invalid_client_event_names_are_refused(
    node: Node, connect, verdict: Verdict, event: str
) -> None:
    sender = await private_client(node, connect)
    receiver = await private_client(node, connect)
    await sender.send({"event": event, "channel": "private-room", "data": {}})
    await expect_error(sender, 4300)
    await receiver.barrier()
    await verdict({"client_event_name": 1})


@pytest.mark.parametrize("channel", ["public-room", "cache-room", "not-private-room"])
async def test_client_events_on_public_channels_are_refused(
    node: Node, connect, verdict: Verdict, channel: str
) -> None:
    sender, receiver = await connect(node), await connect(node)
    for client in (sender, receiver):
        await client.subscribed(channel)
        if channel.startswith("cache-"):
            await client.expect("pusher:cache_miss", channel)
    await sender.send({"event": "client-x", "channel": channel, "data": {}})
    await expect_error(sender, 4300)
    await receiver.barrier()
    await verdict({"client_event_channel": 1})


async def test_client_events_on_encrypted_channels_are_refused(
    node: Node, connect, verdict: Verdict
) -> None:
    channel = "private-encrypted-room"
    sender = await private_client(node, connect, channel)
    receiver = await private_client(node, connect, channel)
    await sender.send({"event": "client-x", "channel": channel, "data": {"nonce": "n"}})
    await expect_error(sender, 4300)
    await receiver.barrier()
    await verdict({"client_event_encrypted": 1})


async def test_client_event_without_subscription_is_refused(
    node: Node, connect, verdict: Verdict
) -> None:
    outsider = await connect(node)
    member = await private_client(node, connect)
    await outsider.send({"event": "client-x", "channel": "private-room", "data": {}})
    await expect_error(outsider, 4300)
    await member.barrier()
    await verdict({"client_event_not_subscribed": 1})


async def test_client_events_disabled_for_the_app(node: Node, verdict: Verdict, connect) -> None:
    client = await connect(node, key=OTHER_APP_KEY)
    channel = "private-room"
    signature = hmac_hex(OTHER_APP_SECRET, f"{client.socket_id}:{channel}")
    await client.subscribed(channel, f"{OTHER_APP_KEY}:{signature}")
    await client.send({"event": "client-x", "channel": channel, "data": {}})
    await expect_error(client, 4300)
    await verdict({"client_events_disabled": 1})


async def test_oversize_client_event_is_refused(node: Node, connect, verdict: Verdict) -> None:
    sender = await private_client(node, connect)
    receiver = await private_client(node, connect)
    await sender.send({"event": "client-big", "channel": "private-room", "data": "x" * 11000})
    await expect_error(sender, 4300)
    await receiver.barrier()
    await verdict({"client_event_too_large": 1})


async def test_client_event_flood_gets_4301_and_stays_open(
    node: Node, connect, verdict: Verdict
) -> None:
    sender = await private_client(node, connect)
    receiver = await private_client(node, connect)
    total = 30
    for index in range(total):
        await sender.send({"event": "client-n", "channel": "private-room", "data": index})
    await sender.send({"event": "pusher:ping", "data": {}})
    rejected = 0
    while (message := await sender.recv())["event"] != "pusher:pong":
        assert message["event"] == "pusher:error", message
        assert message["data"]["code"] == 4301
        rejected += 1
    # Burst of 10, refilled at 10/s: most of a tight burst of 30 is rejected.
    assert 10 <= rejected <= total - 10
    relayed = [
        (await receiver.expect("client-n", "private-room"))["data"] for _ in range(total - rejected)
    ]
    assert relayed[:10] == list(range(10))
    await receiver.barrier()
    await sender.barrier()  # still open
    await verdict({"client_event_rate": rejected})


# --- sign-in -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_data", "good_signature", "slug"),
    [
        pytest.param('{"id":"u1"}', False, "signin_invalid", id="bad-signature"),
        pytest.param('{"name":"no id"}', True, "signin_data_invalid", id="no-id"),
        pytest.param('{"id":""}', True, "signin_data_invalid", id="empty-id"),
        pytest.param('{"id":5}', True, "signin_data_invalid", id="numeric-id"),
        pytest.param("not json", True, "signin_data_invalid", id="not-json"),
        pytest.param('{"id":"u","watchlist":"x"}', True, "signin_data_invalid", id="watchlist"),
    ],
)
async def test_bad_signin_closes_4009(
    node: Node, connect, verdict: Verdict, user_data: str, good_signature: bool, slug: str
) -> None:
    client = await connect(node)
    message = f"{client.socket_id}::user::{user_data}"
    secret = APP_SECRET if good_signature else OTHER_APP_SECRET
    auth = f"{APP_KEY}:{hmac_hex(secret, message)}"
    await client.send({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}})
    closed = await client.closed()
    assert closed.code == 4009
    assert [frame["event"] for frame in closed.frames] == ["pusher:error"]
    assert closed.frames[0]["data"]["code"] == 4009
    await verdict({slug: 1})


async def test_signin_as_another_user_closes_4009(node, connect, sdk, verdict) -> None:
    client = await connect(node)
    for user_id in ("first", "first"):  # signing in again as the same user is fine
        auth = sdk.authenticate_user(client.socket_id, {"id": user_id})
        await client.send({"event": "pusher:signin", "data": auth})
        await client.expect("pusher:signin_success")
    auth = sdk.authenticate_user(client.socket_id, {"id": "second"})
    await client.send({"event": "pusher:signin", "data": auth})
    closed = await client.closed()
    assert closed.code == 4009
    await verdict({"signin_conflict": 1})


async def test_watchlist_over_the_limit_gets_4302_and_stays_signed_in(
    make_node, connect, logs
) -> None:
    node = await make_node(app={"max_watchlist_size": 2})
    sdk = make_sdk(node.port)
    client = await connect(node)
    auth = sdk.authenticate_user(client.socket_id, {"id": "w", "watchlist": ["a", "b", "c"]})
    await client.send({"event": "pusher:signin", "data": auth})
    await client.expect("pusher:signin_success")
    events = await client.expect("pusher_internal:watchlist_events")
    assert data_of(events) == {"events": [{"name": "offline", "user_ids": ["a", "b"]}]}
    await expect_error(client, 4302)
    assert refusal_totals(node) == {"watchlist_too_long": 1}
    logs.assert_refusal_logged("watchlist_too_long")
    logs.assert_clean()


# --- broken frames: closed with the RFC 6455 code ------------------------------------------


async def raw_client(node: Node, raw_sockets: list[RawWebSocket]) -> RawWebSocket:
    raw = await RawWebSocket.open(node.port)
    raw_sockets.append(raw)
    return raw


async def test_binary_frame_is_closed_1003(node, raw_sockets, verdict: Verdict) -> None:
    raw = await raw_client(node, raw_sockets)
    raw.send_frame(OP_BINARY, b'{"event":"pusher:ping","data":{}}')
    code, frames = await raw.read_close()
    assert code == 1003
    assert frames == []
    await verdict({"binary_frame": 1})


@pytest.mark.parametrize(
    "fragments",
    [
        pytest.param([b"\xff\xfe"], id="bad-bytes"),
        pytest.param([b'{"event":"pusher:ping","data":"\xc3\x28"}'], id="bad-sequence"),
        pytest.param([b'{"event":"client-\xed\xa0\x80"}'], id="utf8-surrogate"),
        pytest.param([b'{"event":"pusher:ping",', b'"data":"\xe2\x82"}'], id="fragmented"),
    ],
)
async def test_invalid_utf8_is_closed_1007(
    node, raw_sockets, verdict: Verdict, fragments: list[bytes]
) -> None:
    raw = await raw_client(node, raw_sockets)
    for index, fragment in enumerate(fragments):
        opcode = OP_TEXT if index == 0 else OP_CONT
        raw.send_frame(opcode, fragment, fin=index == len(fragments) - 1)
    code, frames = await raw.read_close()
    assert code == 1007
    assert frames == []
    await verdict({"invalid_utf8": 1})


async def test_oversize_frame_is_refused_from_its_header(
    node, raw_sockets, verdict: Verdict
) -> None:
    raw = await raw_client(node, raw_sockets)
    # Announce 64 MiB and send none of it: the server must not wait for the payload.
    raw.send_frame(OP_TEXT, b"", declared_length=64 * 1024 * 1024)
    code, frames = await raw.read_close()
    assert code == 1009
    assert frames == []
    await verdict({"frame_too_large": 1})


async def test_fragments_cannot_exceed_the_size_limit_together(
    node, raw_sockets, verdict: Verdict
) -> None:
    raw = await raw_client(node, raw_sockets)
    chunk = b"x" * 8000
    raw.send_frame(OP_TEXT, chunk, fin=False)
    raw.send_frame(OP_CONT, chunk, fin=False)
    raw.send_frame(OP_CONT, chunk, fin=True)
    code, _ = await raw.read_close()
    assert code == 1009
    await verdict({"frame_too_large": 1})


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(dict(opcode=OP_TEXT, mask=False), id="unmasked"),
        pytest.param(dict(opcode=OP_TEXT, rsv=4), id="rsv1"),
        pytest.param(dict(opcode=OP_TEXT, rsv=2), id="rsv2"),
        pytest.param(dict(opcode=OP_TEXT, rsv=1), id="rsv3"),
        pytest.param(dict(opcode=OP_CONT), id="orphan-continuation"),
        pytest.param(dict(opcode=0x3), id="reserved-opcode"),
        pytest.param(dict(opcode=OP_PING, fin=False), id="fragmented-ping"),
        pytest.param(dict(opcode=OP_PING, payload=b"p" * 126), id="long-ping"),
    ],
)
async def test_protocol_violations_are_closed_1002(
    node, raw_sockets, verdict: Verdict, frame: dict[str, Any]
) -> None:
    raw = await raw_client(node, raw_sockets)
    options = dict(frame)
    opcode = options.pop("opcode")
    payload = options.pop("payload", b'{"event":"pusher:ping","data":{}}')
    raw.send_frame(opcode, payload, **options)
    code, frames = await raw.read_close()
    assert code == 1002
    assert frames == []
    await verdict({"websocket_protocol": 1})


FAILURES = {
    1002: lambda raw: raw.send_frame(OP_TEXT, b"{}", mask=False),
    1007: lambda raw: raw.send_text(b"\xff"),
    1009: lambda raw: raw.send_frame(OP_TEXT, b"", declared_length=1 << 30),
}
FAILURE_SLUGS = {1002: "websocket_protocol", 1007: "invalid_utf8", 1009: "frame_too_large"}


@pytest.mark.parametrize("echo", [True, False], ids=["client-echoes-close", "client-silent"])
@pytest.mark.parametrize("code", sorted(FAILURES))
async def test_failed_connection_is_closed_at_tcp_level(
    node, raw_sockets, verdict: Verdict, code: int, echo: bool
) -> None:
    # RFC 6455 7.1.7: failing the connection closes the TCP connection too; a socket
    # left open here is already forgotten by the node, so nothing would ever reap it.
    raw = await raw_client(node, raw_sockets)
    FAILURES[code](raw)
    assert (await raw.read_close())[0] == code
    if echo:
        raw.send_frame(OP_CLOSE, code.to_bytes(2, "big"))
    assert await raw.read_eof(3) == b""
    assert not node.ctx.connections
    await verdict({FAILURE_SLUGS[code]: 1})


@pytest.mark.parametrize(
    ("payload", "code", "slug"),
    [
        pytest.param((999).to_bytes(2, "big"), 1002, "websocket_protocol", id="code-999"),
        pytest.param((1005).to_bytes(2, "big"), 1002, "websocket_protocol", id="code-1005"),
        pytest.param(b"\x03", 1002, "websocket_protocol", id="one-byte"),
        pytest.param(
            (1000).to_bytes(2, "big") + b"\xff\xfe", 1007, "invalid_utf8", id="bad-reason"
        ),
    ],
)
async def test_malformed_close_frame(
    node, raw_sockets, verdict: Verdict, payload: bytes, code: int, slug: str
) -> None:
    raw = await raw_client(node, raw_sockets)
    raw.send_frame(OP_CLOSE, payload)
    assert (await raw.read_close())[0] == code
    assert await raw.read_eof() == b""
    await verdict({slug: 1})


async def test_clean_close_is_not_a_refusal(node, raw_sockets, verdict: Verdict) -> None:
    raw = await raw_client(node, raw_sockets)
    raw.send_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye")
    assert (await raw.read_close())[0] == 1000
    assert await raw.read_eof() == b""
    await verdict({})


async def test_fragmented_text_message_is_reassembled(node, raw_sockets, verdict: Verdict) -> None:
    raw = await raw_client(node, raw_sockets)
    # The split falls inside the three bytes of the euro sign.
    text = '{"event":"pusher:ping","data":{"note":"\u20ac"}}'.encode()
    cut = text.index("\u20ac".encode()) + 1
    raw.send_frame(OP_TEXT, text[:5], fin=False)
    raw.send_frame(OP_PING, b"mid-message")  # control frames may interleave
    raw.send_frame(OP_CONT, text[5:cut], fin=False)
    raw.send_frame(OP_CONT, text[cut:], fin=True)
    # Both answers come, in either order (the Pong may be flushed after the text).
    answers = {(frame.opcode, frame.payload) for frame in [await raw.read_frame() for _ in "ab"]}
    assert answers == {(OP_PONG, b"mid-message"), (OP_TEXT, b'{"event":"pusher:pong","data":"{}"}')}
    raw.send_frame(OP_TEXT, b'{"event":"pusher:subscribe",', fin=False)
    raw.send_frame(OP_CONT, b'"data":{"channel":"frag"}}', fin=True)
    assert (await raw.read_json())["event"] == "pusher_internal:subscription_succeeded"
    await verdict({})


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400", "[-1e999]"])
async def test_non_standard_json_numbers_are_refused_not_relayed(
    node: Node, connect, verdict: Verdict, constant: str
) -> None:
    # Python's json reads these; relayed, they would make JSON.parse throw in every
    # subscriber (RFC 8259 has no NaN or Infinity).
    sender = await private_client(node, connect)
    receiver = await private_client(node, connect)
    await sender.send(f'{{"event":"client-n","channel":"private-room","data":{constant}}}')
    await expect_error(sender, 4300)
    await receiver.barrier()
    await verdict({"malformed_json": 1})


async def test_non_standard_json_in_presence_user_info_is_refused(
    node: Node, connect, verdict: Verdict
) -> None:
    watcher = await connect(node)
    channel = "presence-lobby"
    good = '{"user_id":"w"}'
    signature = hmac_hex(APP_SECRET, f"{watcher.socket_id}:{channel}:{good}")
    await watcher.subscribed(channel, f"{APP_KEY}:{signature}", good)
    client = await connect(node)
    bad = '{"user_id":"u","user_info":{"score":NaN}}'
    signature = hmac_hex(APP_SECRET, f"{client.socket_id}:{channel}:{bad}")
    await client.send(
        {
            "event": "pusher:subscribe",
            "data": {"channel": channel, "auth": f"{APP_KEY}:{signature}", "channel_data": bad},
        }
    )
    await expect_subscription_error(client, channel, "InvalidChannelData", 400)
    await watcher.barrier()  # no member_added carrying NaN
    await verdict({"subscribe_channel_data": 1})


# --- REST ----------------------------------------------------------------------------------


def trigger_body(**overrides: Any) -> dict[str, Any]:
    return {"name": "evt", "channel": "rest-target", "data": "{}", **overrides}


async def listener(node: Node, connect) -> PusherClient:
    client = await connect(node)
    await client.subscribed("rest-target")
    return client


def assert_json_error(response: HttpResult, status: int, slug: str) -> dict[str, Any]:
    assert response.status == status, response
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["reason"] == slug
    assert isinstance(body["error"], str) and body["error"]
    return body


@pytest.mark.parametrize(
    ("raw_body", "error"),
    [
        pytest.param(b"null", "Request body must be a JSON object", id="null"),
        pytest.param(b"[]", "Request body must be a JSON object", id="list"),
        pytest.param(b'"events"', "Request body must be a JSON object", id="string"),
        pytest.param(b"1", "Request body must be a JSON object", id="number"),
        pytest.param(b"{", "Request body is not valid JSON", id="truncated"),
        pytest.param(b"\xff{}", "Request body is not valid JSON", id="not-utf8"),
        pytest.param(b"[" * 5000, "Request body is not valid JSON", id="deep"),
        pytest.param(
            b'{"name":"e","channel":"c","data":"x","n":NaN}',
            "Request body is not valid JSON",
            id="nan",
        ),
    ],
)
async def test_rest_body_must_be_a_json_object(
    node: Node, connect, verdict: Verdict, raw_body: bytes, error: str
) -> None:
    client = await listener(node, connect)
    response = await rest(node.port, "POST", EVENTS, raw_body=raw_body)
    body = assert_json_error(response, 400, "invalid_body")
    assert body["error"] == error
    await client.barrier()
    await verdict({"invalid_body": 1})


@pytest.mark.parametrize(
    ("overrides", "status", "slug"),
    [
        pytest.param({"data": "x" * 10241}, 413, "payload_too_large", id="data-10241"),
        pytest.param({"data": "\u20ac" * 3414}, 413, "payload_too_large", id="data-utf8-bytes"),
        pytest.param(
            {"channel": None, "channels": [f"c{i}" for i in range(101)]},
            400,
            "too_many_channels",
            id="101-channels",
        ),
        pytest.param({"name": "pusher:foo"}, 400, "invalid_event_name", id="name-pusher:"),
        pytest.param({"name": "pusher_internal:x"}, 400, "invalid_event_name", id="name-internal"),
        pytest.param({"name": ""}, 400, "invalid_event_name", id="name-empty"),
        pytest.param({"name": "x" * 201}, 400, "invalid_event_name", id="name-201"),
        pytest.param({"name": "bad\x00name"}, 400, "invalid_event_name", id="name-nul"),
        pytest.param({"name": 5}, 400, "invalid_event_name", id="name-number"),
        pytest.param({"channel": "bad channel"}, 400, "invalid_channel", id="channel-space"),
        pytest.param({"channel": "a#b"}, 400, "invalid_channel", id="channel-hash"),
        pytest.param({"channel": "x" * 165}, 400, "invalid_channel", id="channel-165"),
        pytest.param({"channel": 5}, 400, "invalid_channel", id="channel-number"),
        pytest.param({"data": {"a": 1}}, 400, "invalid_field", id="data-object"),
        pytest.param({"channels": "rest-target"}, 400, "invalid_field", id="channels-string"),
        pytest.param({"channels": []}, 400, "invalid_field", id="channels-empty"),
        pytest.param({"socket_id": "1.2.3"}, 400, "invalid_socket_id", id="socket-id"),
        pytest.param({"info": "secret_count"}, 400, "invalid_info", id="info"),
        pytest.param(
            {"channel": None, "channels": ["private-encrypted-a", "rest-target"]},
            400,
            "encrypted_multi_channel",
            id="encrypted-multi",
        ),
    ],
)
async def test_rest_trigger_rejections(
    node: Node, connect, verdict: Verdict, overrides: dict[str, Any], status: int, slug: str
) -> None:
    client = await listener(node, connect)
    body = {k: v for k, v in trigger_body(**overrides).items() if v is not None}
    response = await rest(node.port, "POST", EVENTS, body)
    assert_json_error(response, status, slug)
    await client.barrier()  # nothing was delivered
    await verdict({slug: 1})


async def test_rest_batch_over_ten_is_refused_whole(node: Node, connect, verdict) -> None:
    client = await listener(node, connect)
    batch = [trigger_body(name=f"e{i}") for i in range(11)]
    response = await rest(node.port, "POST", BATCH, {"batch": batch})
    assert_json_error(response, 400, "batch_too_large")
    await client.barrier()
    await verdict({"batch_too_large": 1})


async def test_rest_batch_with_one_bad_item_delivers_nothing(node, connect, verdict) -> None:
    client = await listener(node, connect)
    batch = [trigger_body(name="good"), trigger_body(name="pusher:bad")]
    response = await rest(node.port, "POST", BATCH, {"batch": batch})
    assert_json_error(response, 400, "invalid_event_name")
    await client.barrier()
    await verdict({"invalid_event_name": 1})


def tamper(target: str, name: str, value: str | None) -> str:
    """Replace (or drop, with ``None``) one query parameter of a signed target."""
    path, _, query = target.partition("?")
    pairs = [pair.split("=", 1) for pair in query.split("&")]
    kept = [f"{k}={value}" if k == name else f"{k}={v}" for k, v in pairs if k != name or value]
    return f"{path}?{'&'.join(kept)}"


@pytest.mark.parametrize(
    ("mutate", "slug"),
    [
        pytest.param(lambda t: tamper(t, "auth_signature", "0" * 64), "auth_signature", id="sig"),
        pytest.param(lambda t: tamper(t, "auth_signature", None), "auth_missing", id="no-sig"),
        pytest.param(lambda t: tamper(t, "auth_key", None), "auth_missing", id="no-key"),
        pytest.param(lambda t: tamper(t, "auth_version", "2.0"), "auth_version", id="version"),
        pytest.param(lambda t: tamper(t, "body_md5", "0" * 32), "body_md5", id="body-md5"),
        pytest.param(lambda t: tamper(t, "body_md5", None), "body_md5", id="no-body-md5"),
        pytest.param(lambda t: t + "&extra=1", "auth_signature", id="unsigned-param"),
    ],
)
async def test_rest_bad_signatures_are_401(
    node: Node, connect, verdict: Verdict, mutate: Callable[[str], str], slug: str
) -> None:
    client = await listener(node, connect)
    body = json.dumps(trigger_body()).encode()
    target = mutate(signed_target("POST", EVENTS, body=body))
    response = await http_request(node.port, "POST", target, body)
    assert_json_error(response, 401, slug)
    await client.barrier()
    await verdict({slug: 1})


async def test_rest_body_swapped_after_signing_is_401(node, connect, verdict) -> None:
    client = await listener(node, connect)
    signed = json.dumps(trigger_body()).encode()
    target = signed_target("POST", EVENTS, body=signed)
    response = await http_request(
        node.port, "POST", target, json.dumps(trigger_body(data="evil")).encode()
    )
    assert_json_error(response, 401, "body_md5")
    await client.barrier()
    await verdict({"body_md5": 1})


@pytest.mark.parametrize("skew", [-601, 601, -(10**9)])
async def test_rest_timestamp_outside_window_is_401(
    node: Node, connect, verdict: Verdict, skew: int
) -> None:
    client = await listener(node, connect)
    response = await rest(node.port, "POST", EVENTS, trigger_body(), timestamp=time.time() + skew)
    assert_json_error(response, 401, "auth_timestamp")
    await client.barrier()
    await verdict({"auth_timestamp": 1})


async def test_rest_key_of_another_app_on_the_route_is_401(node, connect, verdict) -> None:
    client = await listener(node, connect)
    response = await rest(
        node.port, "POST", EVENTS, trigger_body(), key=OTHER_APP_KEY, secret=OTHER_APP_SECRET
    )
    assert_json_error(response, 401, "auth_key")
    await client.barrier()
    await verdict({"auth_key": 1})


async def test_rest_unknown_app_id_is_404(node: Node, verdict: Verdict) -> None:
    response = await rest(node.port, "POST", "/apps/99999/events", trigger_body())
    assert_json_error(response, 404, "unknown_app")
    await verdict({"unknown_app": 1})


async def test_rest_wrong_method_is_405(node: Node, verdict: Verdict) -> None:
    response = await rest(node.port, "GET", EVENTS)
    assert_json_error(response, 405, "method_not_allowed")
    await verdict({"method_not_allowed": 1})


@pytest.mark.parametrize(
    ("path", "params", "slug"),
    [
        pytest.param(f"/apps/{APP_ID}/channels/public-x/users", (), "not_presence", id="users"),
        pytest.param(
            f"/apps/{APP_ID}/channels/public-x", (("info", "user_count"),), "invalid_info", id="uc"
        ),
        pytest.param(
            f"/apps/{APP_ID}/channels", (("info", "user_count"),), "invalid_info", id="list-uc"
        ),
        pytest.param(
            f"/apps/{APP_ID}/channels/public-x", (("info", "cache"),), "invalid_info", id="cache"
        ),
        pytest.param(f"/apps/{APP_ID}/channels/bad%20name", (), "invalid_channel", id="name"),
    ],
)
async def test_rest_query_rejections(
    node: Node, verdict: Verdict, path: str, params: tuple[tuple[str, str], ...], slug: str
) -> None:
    response = await rest(node.port, "GET", path, params=params)
    assert_json_error(response, 400, slug)
    await verdict({slug: 1})


async def test_rest_request_body_over_the_limit_is_413(node, raw_sockets, verdict) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    size = 2 * 1024 * 1024
    target = signed_target("POST", EVENTS, body=b"x")
    raw.write(
        f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n".encode()
    )
    status, _ = await raw.read_head()
    assert status == 413  # answered from the head, before any of the body arrives
    await verdict({"body_too_large": 1})


# --- HTTP request heads ----------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(
            b"GET /app/app-key HTTP/1.1\r\n"
            + b"".join(b"X-Header-%d: v\r\n" % i for i in range(80))
            + b"\r\n",
            id="too-many-headers",
        ),
        pytest.param(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", id="huge-header"),
        pytest.param(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", id="huge-target"),
    ],
)
async def test_oversize_request_head_is_431(node, raw_sockets, verdict, head: bytes) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    raw.write(head)
    response = await raw.read_eof()
    assert response.startswith(b"HTTP/1.1 431 "), response[:80]
    assert b'"reason":"headers_too_large"' in response
    await verdict({"headers_too_large": 1})


async def test_malformed_request_line_is_400(node, raw_sockets, verdict) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    raw.write(b"BREW /pot HTCPCP/1.0\x00\r\n\r\n")
    response = await raw.read_eof()
    assert response.startswith(b"HTTP/1.1 400 "), response[:80]
    await verdict({"bad_request": 1})


async def test_half_a_request_head_is_cut_after_handshake_timeout(
    node, raw_sockets, verdict
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()  # before the connection: the server's timer starts later
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    raw.write(b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: web")
    assert await raw.read_eof(seconds=3) == b""  # cut within 3 s (scaled) ...
    elapsed = loop.time() - started
    assert elapsed >= 0.4, elapsed  # ... and not before handshake_timeout (0.5 s)
    await verdict({"bad_request": 1})


async def test_a_dribbled_request_head_does_not_extend_the_timeout(
    node, raw_sockets, verdict
) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    head = b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: a\r\n" * 50
    # Cut within 3 s (scaled), though dribbling the whole head would take 12 s.
    eof = asyncio.ensure_future(raw.read_eof(seconds=3))
    for byte in head:
        if eof.done():
            break
        raw.write(bytes([byte]))
        await asyncio.sleep(0.02)  # pacing of the attack, not synchronisation
    assert await eof == b""
    await verdict({"bad_request": 1})


async def test_a_stalled_request_body_is_cut(node, raw_sockets, verdict) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    body = json.dumps(trigger_body()).encode()
    target = signed_target("POST", EVENTS, body=body)
    raw.write(
        f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:10]
    )
    # handshake_timeout (0.5 s) bounds the whole request, body included: cut within
    # 3 s (scaled).
    assert await raw.read_eof(seconds=3) == b""
    await verdict({"bad_request": 1})


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(
            b"POST /apps/12345/events HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 99999999999999999999\r\n\r\n",
            id="content-length-overflow",
        ),
        pytest.param(
            b"POST /apps/12345/events HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            id="two-content-lengths",
        ),
        pytest.param(
            b"POST /apps/12345/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="content-length-and-chunked",
        ),
        pytest.param(
            b"POST /apps/12345/events HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            id="negative-content-length",
        ),
    ],
)
async def test_ambiguous_request_framing_is_400(node, raw_sockets, verdict, head: bytes) -> None:
    # Request-smuggling shapes: refuse rather than guess where the body ends.
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    raw.write(head)
    response = await raw.read_eof()
    assert response.startswith(b"HTTP/1.1 400 "), response[:80]
    await verdict({"bad_request": 1})


@pytest.mark.parametrize("method", ["POST", "PUT", "HEAD"])
async def test_upgrade_with_a_method_other_than_get_is_refused(
    node, raw_sockets, logs, still_serving, method: str
) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    request = raw.handshake_request(f"/app/{APP_KEY}?protocol=7")
    raw.write(method.encode() + request[len(b"GET") :])
    status, _ = await raw.read_head()
    assert 400 <= status < 500, status
    assert not node.ctx.connections
    assert sum(refusal_totals(node).values()) == 1
    logs.assert_clean()
    await still_serving()


async def test_unsupported_websocket_version_is_refused(node, raw_sockets, verdict) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    status, headers = await raw.handshake(f"/app/{APP_KEY}?protocol=7", version="7")
    assert status == 426
    assert headers["sec-websocket-version"] == "13"
    await verdict({"websocket_version": 1})


async def test_upgrade_without_key_is_refused(node, raw_sockets, verdict) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    raw.write(
        b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    status, _ = await raw.read_head()
    assert status == 400
    await verdict({"websocket_protocol": 1})
