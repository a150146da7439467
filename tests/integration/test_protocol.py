"""The Pusher protocol v7 against a live node: handshake, heartbeats, admission,
channels, REST delivery, client events, sign-in, slow consumers and drain.

Signatures for private/presence channels and sign-in are made by the official PyPI
``pusher`` SDK, and REST events are triggered through it, so these tests double as
interop proof for the Python server SDK.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any

import pytest
from support.clients import (
    APP_ID,
    APP_KEY,
    OP_BINARY,
    OP_TEXT,
    OTHER_APP_KEY,
    Closed,
    PusherClient,
    RawWebSocket,
    build_frame,
    data_of,
    make_sdk,
    open_client,
    open_ws,
    read_until_closed,
    rest,
)
from support.timeouts import within
from websockets.exceptions import InvalidStatus

from bastion.server.runtime import Node

SOCKET_ID = re.compile(r"^\d+\.\d+$")


def auth_for(sdk: Any, client: PusherClient, channel: str, user: dict[str, Any] | None = None):
    """The SDK's auth response for ``client`` on ``channel`` (with presence data)."""
    return sdk.authenticate(channel=channel, socket_id=client.socket_id, custom_data=user)


async def subscribe_with_sdk(
    sdk: Any, client: PusherClient, channel: str, user: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Subscribe with a signature from the SDK and assert success."""
    auth = auth_for(sdk, client, channel, user)
    return await client.subscribed(channel, auth["auth"], auth.get("channel_data"))


# --- handshake -----------------------------------------------------------------------------


async def test_connection_established_is_the_first_frame(node: Node) -> None:
    ws = await open_ws(node.port)
    try:
        first = json.loads(await within(ws.recv()))
        assert first["event"] == "pusher:connection_established"
        assert isinstance(first["data"], str), "data is double-encoded (a JSON string)"
        data = json.loads(first["data"])
        assert SOCKET_ID.match(data["socket_id"])
        assert data["activity_timeout"] == 120
    finally:
        await ws.close()


async def test_socket_ids_are_unique(node: Node, connect) -> None:
    clients = [await connect(node) for _ in range(5)]
    ids = {client.socket_id for client in clients}
    assert len(ids) == 5
    assert all(SOCKET_ID.match(socket_id) for socket_id in ids)


@pytest.mark.parametrize("query", ["protocol=7", "protocol=6", "protocol=5", ""])
async def test_supported_or_absent_protocol_is_accepted(node: Node, connect, query: str) -> None:
    client = await connect(node, query=query)
    await client.barrier()


# --- liveness ------------------------------------------------------------------------------


async def test_pusher_ping_gets_pusher_pong(node: Node, connect) -> None:
    client = await connect(node)
    await client.send({"event": "pusher:ping", "data": {}})
    pong = await client.expect("pusher:pong")
    assert "channel" not in pong


async def test_protocol_ping_gets_protocol_pong(node: Node, connect) -> None:
    client = await connect(node)
    pong_waiter = await client.ws.ping(b"are-you-there")
    latency = await within(pong_waiter)
    assert latency >= 0
    await client.barrier()


async def test_silent_client_is_pinged_then_closed_4201(make_node, connect) -> None:
    node = await make_node(server={"activity_timeout": 1, "pong_timeout": 0.5})
    loop = asyncio.get_running_loop()
    started = loop.time()  # before the connection: its activity starts later
    client = await connect(node)
    assert client.activity_timeout == 1
    ping = await client.expect("pusher:ping")
    assert loop.time() - started >= 0.9, "pinged before activity_timeout elapsed"
    closed = await client.closed()
    assert closed.code == 4201
    assert [frame["event"] for frame in closed.frames] == ["pusher:error"]
    assert closed.frames[0]["data"]["code"] == 4201
    assert ping["data"] in ("{}", {})
    assert node.metrics.refusal_count("pong_timeout") == 1
    assert node.metrics.connections_closed[(APP_ID, 4201)] == 1


async def test_answering_the_server_ping_keeps_the_connection_open(make_node, connect) -> None:
    node = await make_node(server={"activity_timeout": 1, "pong_timeout": 0.5})
    client = await connect(node)
    for _ in range(2):
        await client.expect("pusher:ping")
        await client.send({"event": "pusher:pong", "data": {}})
    # A second ping (not a close) proves the connection outlived pong_timeout twice.
    await client.barrier()
    assert node.metrics.refusal_count("pong_timeout") == 0


async def test_client_activity_postpones_the_server_ping(make_node, connect) -> None:
    node = await make_node(server={"activity_timeout": 1, "pong_timeout": 0.5})
    client = await connect(node)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.6
    while loop.time() < deadline:
        # Each pong is awaited, so the client is never silent for a whole activity_timeout.
        await client.barrier()
        await asyncio.sleep(0.2)  # pacing of client traffic, not synchronisation
    assert node.metrics.refusal_count("pong_timeout") == 0


async def test_protocol_pings_count_as_activity(make_node, connect) -> None:
    node = await make_node(server={"activity_timeout": 1, "pong_timeout": 0.5})
    client = await connect(node)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.6
    while loop.time() < deadline:
        await within(await client.ws.ping())  # RFC 6455 Ping, answered by a Pong
        await asyncio.sleep(0.2)  # pacing of client traffic, not synchronisation
    await client.barrier()  # no pusher:ping was sent in between
    assert node.metrics.refusal_count("pong_timeout") == 0


# --- admission -----------------------------------------------------------------------------


async def test_unknown_app_key_gets_error_then_4001(node: Node) -> None:
    closed = await read_until_closed(await open_ws(node.port, key="no-such-key"))
    assert closed.code == 4001
    assert closed.frames == [
        {"event": "pusher:error", "data": {"message": "Application does not exist", "code": 4001}}
    ]
    assert node.metrics.refusal_count("unknown_app") == 1


async def closed_at_handshake(node: Node, key: str = APP_KEY, query: str = "protocol=7") -> Closed:
    """Connect and read until the server closes the connection."""
    return await read_until_closed(await open_ws(node.port, key=key, query=query))


async def test_disabled_app_is_closed_4003(make_node) -> None:
    node = await make_node(app={"enabled": False})
    closed = await closed_at_handshake(node)
    assert closed.code == 4003
    assert closed.frames[0]["data"]["code"] == 4003
    assert node.metrics.refusal_count("app_disabled") == 1


async def test_app_connection_quota_closes_the_second_with_4004(make_node, connect) -> None:
    node = await make_node(app={"max_connections": 1})
    first = await connect(node)
    closed = await closed_at_handshake(node)
    assert closed.code == 4004
    assert node.metrics.refusal_count("app_over_quota") == 1
    await first.barrier()
    # The quota is per app: another app on the node is unaffected.
    other = await connect(node, key=OTHER_APP_KEY)
    await other.barrier()
    # Once the first leaves, its slot is free again.
    await first.close()
    again = await connect(node)
    await again.barrier()


async def test_server_capacity_closes_with_4100(make_node, connect) -> None:
    node = await make_node(server={"max_connections": 1})
    first = await connect(node)
    closed = await closed_at_handshake(node, key=OTHER_APP_KEY)
    assert closed.code == 4100
    assert node.metrics.refusal_count("over_capacity") == 1
    await first.barrier()


@pytest.mark.parametrize("version", ["3", "1", "8", "abc"])
async def test_unsupported_protocol_is_closed_4007(node: Node, version: str) -> None:
    closed = await closed_at_handshake(node, query=f"protocol={version}")
    assert closed.code == 4007
    assert node.metrics.refusal_count("unsupported_protocol") == 1


@pytest.mark.parametrize("path", ["/foo/app-key", "/ws", "/app/", "/app/app-key/extra"])
async def test_upgrade_outside_app_path_is_http_404(node: Node, raw_sockets, path: str) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    status, _ = await raw.handshake(path)
    assert status == 404
    assert node.metrics.refusal_count("path_not_found") == 1


async def test_websockets_client_sees_404_outside_app_path(node: Node) -> None:
    with pytest.raises(InvalidStatus) as info:
        await open_ws(node.port, key="x/y")
    assert info.value.response.status_code == 404


async def test_unsupported_websocket_version_is_http_426(node: Node, raw_sockets) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    status, headers = await raw.handshake(f"/app/{APP_KEY}?protocol=7", version="8")
    # RFC 6455 4.4: 426 naming the version the server speaks.
    assert status == 426
    assert headers.get("sec-websocket-version") == "13"
    assert node.metrics.refusal_count("websocket_version") == 1
    assert not node.ctx.connections


ENDINGS = ["client-close", "tcp-drop", "unmasked-frame", "binary-frame", "invalid-utf8", "oversize"]


@pytest.mark.parametrize("ending", ENDINGS)
async def test_every_way_a_connection_ends_frees_its_quota_slot(
    make_node, connect, raw_sockets, ending: str
) -> None:
    node = await make_node(app={"max_connections": 1})
    if ending == "client-close":
        client = await connect(node)
        await client.close()
    else:
        raw = await RawWebSocket.open(node.port)
        raw_sockets.append(raw)
        if ending == "tcp-drop":
            raw.writer.transport.abort()
        else:
            if ending == "unmasked-frame":
                raw.send_frame(OP_TEXT, b"{}", mask=False)
            elif ending == "binary-frame":
                raw.send_frame(OP_BINARY, b"{}")
            elif ending == "invalid-utf8":
                raw.send_text(b"\xc3\x28")
            else:
                raw.send_frame(OP_TEXT, b"", declared_length=1 << 20)
            await raw.read_close()
            assert await raw.read_eof() == b""

    async def admitted() -> PusherClient:
        # The node learns of a dropped socket on its own schedule: retry the real thing.
        while True:
            ws = await open_ws(node.port)
            first = json.loads(await within(ws.recv()))
            if first["event"] == "pusher:connection_established":
                return PusherClient(ws, first)
            assert first["data"]["code"] == 4004, first
            await read_until_closed(ws)

    client = await within(admitted())
    await client.barrier()
    assert node.hub.apps_by_id[APP_ID].connections == 1
    await client.close()


async def test_frames_pipelined_behind_the_upgrade_are_served(node: Node, raw_sockets) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    ping = build_frame(OP_TEXT, b'{"event":"pusher:ping","data":{}}')
    raw.write(raw.handshake_request(f"/app/{APP_KEY}?protocol=7") + ping)
    status, _ = await raw.read_head()
    assert status == 101
    assert (await raw.read_json())["event"] == "pusher:connection_established"
    assert (await raw.read_json())["event"] == "pusher:pong"


async def test_pipelined_http_requests_are_answered_in_order(node: Node, raw_sockets) -> None:
    raw = await RawWebSocket.connect(node.port)
    raw_sockets.append(raw)
    raw.write(
        b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    response = await raw.read_eof()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 404 " in response


# --- channels ------------------------------------------------------------------------------


async def test_public_subscribe(node: Node, connect) -> None:
    client = await connect(node)
    reply = await client.subscribed("my-channel")
    assert reply["data"] == "{}"
    await client.barrier()


@pytest.mark.parametrize("channel", ["private-orders", "private-encrypted-orders"])
async def test_private_subscribe_with_sdk_signature(node: Node, connect, sdk, channel) -> None:
    if channel.startswith("private-encrypted-"):
        sdk = make_sdk(node.port, encryption_master_key_base64=base64.b64encode(b"k" * 32))
    client = await connect(node)
    auth = auth_for(sdk, client, channel)
    assert ("shared_secret" in auth) == channel.startswith("private-encrypted-")
    reply = await client.subscribed(channel, auth["auth"])  # shared_secret never sent
    assert reply["data"] == "{}"


async def test_private_subscribe_without_auth_is_refused(node: Node, connect) -> None:
    client = await connect(node)
    reply = await client.subscribe("private-orders")
    assert reply["event"] == "pusher:subscription_error"
    assert reply["channel"] == "private-orders"
    assert reply["data"]["type"] == "AuthError"
    assert reply["data"]["status"] == 401
    await client.barrier()


async def test_presence_flow(node: Node, connect, sdk) -> None:
    channel = "presence-room"
    alice, bob = await connect(node), await connect(node)
    reply = await subscribe_with_sdk(
        sdk, alice, channel, {"user_id": "alice", "user_info": {"name": "Alice"}}
    )
    assert data_of(reply) == {
        "presence": {"ids": ["alice"], "hash": {"alice": {"name": "Alice"}}, "count": 1}
    }
    reply = await subscribe_with_sdk(sdk, bob, channel, {"user_id": "bob"})
    presence = data_of(reply)["presence"]
    assert sorted(presence["ids"]) == ["alice", "bob"]
    assert presence["count"] == 2
    assert presence["hash"]["alice"] == {"name": "Alice"}
    added = await alice.expect("pusher_internal:member_added", channel)
    assert isinstance(added["data"], str)
    assert data_of(added)["user_id"] == "bob"
    await bob.barrier()  # the joiner gets no member_added about itself
    await bob.send({"event": "pusher:unsubscribe", "data": {"channel": channel}})
    removed = await alice.expect("pusher_internal:member_removed", channel)
    assert data_of(removed) == {"user_id": "bob"}


async def test_presence_second_socket_of_same_user_adds_no_member(node, connect, sdk) -> None:
    channel = "presence-tabs"
    watcher, tab1, tab2 = await connect(node), await connect(node), await connect(node)
    await subscribe_with_sdk(sdk, watcher, channel, {"user_id": "watcher"})
    await subscribe_with_sdk(sdk, tab1, channel, {"user_id": "carol"})
    await watcher.expect("pusher_internal:member_added", channel)
    reply = await subscribe_with_sdk(sdk, tab2, channel, {"user_id": "carol"})
    assert data_of(reply)["presence"]["count"] == 2
    await watcher.barrier()
    await tab1.close()
    await watcher.barrier()  # carol still has a tab open
    await tab2.close()
    removed = await watcher.expect("pusher_internal:member_removed", channel)
    assert data_of(removed) == {"user_id": "carol"}


@pytest.mark.parametrize("channel", ["cache-prices", "private-cache-prices", "presence-cache-x"])
async def test_cache_miss_then_replay_of_last_rest_event(node, connect, sdk, channel) -> None:
    user = {"user_id": "u1"} if channel.startswith("presence-") else None

    async def join(client: PusherClient) -> None:
        if channel.startswith(("private-", "presence-")):
            await subscribe_with_sdk(sdk, client, channel, user)
        else:
            await client.subscribed(channel)

    first = await connect(node)
    await join(first)
    miss = await first.expect("pusher:cache_miss", channel)
    assert miss["data"] == "{}"
    await asyncio.to_thread(sdk.trigger, channel, "price", {"v": 1})
    await asyncio.to_thread(sdk.trigger, channel, "price", {"v": 2})
    assert data_of(await first.expect("price", channel)) == {"v": 1}
    assert data_of(await first.expect("price", channel)) == {"v": 2}
    if user:
        user["user_id"] = "u2"
    second = await connect(node)
    await join(second)
    replay = await second.expect("price", channel)
    assert replay["data"] == '{"v": 2}'
    await second.barrier()


async def test_public_channel_without_cache_prefix_sends_no_cache_frames(node, connect) -> None:
    client = await connect(node)
    await client.subscribed("not-cache-prices")
    await client.barrier()


async def test_subscription_count_is_broadcast_when_enabled(make_node, connect) -> None:
    node = await make_node(app={"enable_subscription_count": True})
    first = await connect(node)
    await first.subscribed("counted")
    count = await first.expect("pusher_internal:subscription_count", "counted")
    assert data_of(count) == {"subscription_count": 1}
    second = await connect(node)
    await second.subscribed("counted")
    for client in (first, second):
        count = await client.expect("pusher_internal:subscription_count", "counted")
        assert data_of(count) == {"subscription_count": 2}
    await second.close()
    count = await first.expect("pusher_internal:subscription_count", "counted")
    assert data_of(count) == {"subscription_count": 1}


async def test_subscription_count_is_not_sent_by_default(node: Node, connect) -> None:
    client = await connect(node)
    await client.subscribed("uncounted")
    await client.barrier()


# --- REST delivery -------------------------------------------------------------------------


async def test_rest_trigger_reaches_subscribers_except_the_excluded_socket(
    node: Node, connect, sdk
) -> None:
    sender, receiver = await connect(node), await connect(node)
    for client in (sender, receiver):
        await client.subscribed("news")
    await asyncio.to_thread(sdk.trigger, "news", "headline", {"t": "hi"}, sender.socket_id)
    event = await receiver.expect("headline", "news")
    assert event["data"] == '{"t": "hi"}'
    assert "user_id" not in event
    await sender.barrier()  # excluded: nothing was delivered to it


async def test_rest_trigger_to_several_channels(node: Node, connect, sdk) -> None:
    one, two = await connect(node), await connect(node)
    await one.subscribed("ch-one")
    await two.subscribed("ch-two")
    result = await asyncio.to_thread(sdk.trigger, ["ch-one", "ch-two"], "multi", "plain text")
    assert result == {}
    assert (await one.expect("multi", "ch-one"))["data"] == "plain text"
    assert (await two.expect("multi", "ch-two"))["data"] == "plain text"


async def test_rest_batch_trigger(node: Node, connect, sdk) -> None:
    client = await connect(node)
    await client.subscribed("batched")
    batch = [{"channel": "batched", "name": f"e{i}", "data": str(i)} for i in range(3)]
    await asyncio.to_thread(sdk.trigger_batch, batch)
    for i in range(3):
        assert (await client.expect(f"e{i}", "batched"))["data"] == str(i)


# --- client events -------------------------------------------------------------------------


async def test_client_event_on_private_channel(node: Node, connect, sdk) -> None:
    sender, receiver = await connect(node), await connect(node)
    for client in (sender, receiver):
        await subscribe_with_sdk(sdk, client, "private-chat")
    await sender.send({"event": "client-typing", "channel": "private-chat", "data": {"x": [1]}})
    await sender.send(
        {"event": "client-forged", "channel": "private-chat", "data": 1, "user_id": "admin"}
    )
    event = await receiver.expect("client-typing", "private-chat")
    assert event["data"] == {"x": [1]}
    assert "user_id" not in event
    forged = await receiver.expect("client-forged", "private-chat")
    assert "user_id" not in forged, "a client cannot claim a user_id"
    await sender.barrier()  # not echoed


async def test_client_event_on_presence_channel_carries_user_id(node, connect, sdk) -> None:
    sender, receiver = await connect(node), await connect(node)
    await subscribe_with_sdk(sdk, sender, "presence-chat", {"user_id": "sender-1"})
    await subscribe_with_sdk(sdk, receiver, "presence-chat", {"user_id": "receiver-1"})
    await sender.expect("pusher_internal:member_added", "presence-chat")
    await sender.send(
        {"event": "client-hello", "channel": "presence-chat", "data": "str", "user_id": "forged"}
    )
    event = await receiver.expect("client-hello", "presence-chat")
    assert event["data"] == "str"
    assert event["user_id"] == "sender-1"
    await sender.barrier()


# --- sign-in and terminate ---------------------------------------------------------------


async def signin(sdk: Any, client: PusherClient, user: dict[str, Any]) -> dict[str, Any]:
    auth = sdk.authenticate_user(socket_id=client.socket_id, user_data=user)
    await client.send({"event": "pusher:signin", "data": auth})
    reply = await client.expect("pusher:signin_success")
    assert reply["data"] == {"user_data": auth["user_data"]}
    return reply


async def test_signin_success_payload(node: Node, connect, sdk) -> None:
    client = await connect(node)
    reply = await signin(sdk, client, {"id": "user-7", "user_info": {"name": "Seven"}})
    assert json.loads(reply["data"]["user_data"])["id"] == "user-7"
    await client.barrier()


async def test_server_to_user_channel_after_signin(node: Node, connect, sdk) -> None:
    client = await connect(node)
    await signin(sdk, client, {"id": "user-8"})
    await client.subscribed("#server-to-user-user-8")
    await asyncio.to_thread(sdk.send_to_user, "user-8", "notice", {"n": 1})
    event = await client.expect("notice", "#server-to-user-user-8")
    assert data_of(event) == {"n": 1}


@pytest.mark.parametrize("route", ["documented", "pypi-sdk"])
async def test_terminate_connections_closes_signed_in_sockets_with_4009(
    node: Node, connect, sdk, route: str
) -> None:
    tab1, tab2, other, presence_only = [await connect(node) for _ in range(4)]
    await signin(sdk, tab1, {"id": "mallory"})
    await signin(sdk, tab2, {"id": "mallory"})
    await signin(sdk, other, {"id": "alice"})
    await subscribe_with_sdk(sdk, presence_only, "presence-x", {"user_id": "mallory"})
    if route == "documented":
        path = f"/apps/{APP_ID}/users/mallory/terminate_connections"
        response = await rest(node.port, "POST", path, {})
        assert response.status == 200
        assert response.json() == {}
    else:
        # pusher (PyPI) 3.3 posts to /users/{id}/terminate_connections, no /apps/{id}.
        assert await asyncio.to_thread(sdk.terminate_user_connections, "mallory") == {}
    for tab in (tab1, tab2):
        closed = await tab.closed()
        assert closed.code == 4009
        assert closed.frames[-1]["event"] == "pusher:error"
        assert closed.frames[-1]["data"]["code"] == 4009
    await other.barrier()
    await presence_only.barrier()  # presence identity is not a sign-in
    assert node.metrics.refusal_count("terminated") == 2


# --- slow consumers and drain ------------------------------------------------------------


async def test_slow_consumer_is_cut_while_a_reader_keeps_receiving(
    make_node, connect, raw_sockets
) -> None:
    node = await make_node(server={"max_write_buffer_kb": 64})
    sdk = make_sdk(node.port)
    reader = await connect(node)
    await reader.subscribed("firehose")
    slow = await RawWebSocket.open_stalled(node.port)
    raw_sockets.append(slow)
    slow.send_text(json.dumps({"event": "pusher:subscribe", "data": {"channel": "firehose"}}))
    assert (await slow.read_json())["event"] == "pusher_internal:subscription_succeeded"

    payload = "x" * 9000
    sent = 0
    for sequence in range(2000):  # bounded: kernel buffers on loopback hold a few MB
        await asyncio.to_thread(sdk.trigger, "firehose", "big", f"{sequence}:{payload}")
        sent += 1
        event = await reader.expect("big", "firehose")
        assert event["data"].startswith(f"{sequence}:")
        if node.metrics.refusal_count("slow_consumer"):
            break
    assert node.metrics.refusal_count("slow_consumer") == 1, f"not cut after {sent} events"
    assert node.metrics.connections_closed[(APP_ID, 4100)] == 1

    # The slow client finds the reason at the end of its stream, then close 4100.
    code, frames = await slow.read_close()
    assert code == 4100
    assert json.loads(frames[-1].payload) == {
        "event": "pusher:error",
        "data": {"message": "Write buffer limit exceeded; reconnect with back-off", "code": 4100},
    }
    assert len(frames) <= sent + 1
    # The reader was never disturbed and keeps receiving.
    for sequence in range(sent, sent + 5):
        await asyncio.to_thread(sdk.trigger, "firehose", "big", f"{sequence}:small")
        assert (await reader.expect("big", "firehose"))["data"] == f"{sequence}:small"
    response = await asyncio.to_thread(sdk.channel_info, "firehose", ["subscription_count"])
    assert response["subscription_count"] == 1


async def test_drain_closes_open_clients_with_4200(node: Node, connect, sdk) -> None:
    plain, subscribed = await connect(node), await connect(node)
    await subscribe_with_sdk(sdk, subscribed, "presence-drain", {"user_id": "d"})
    port = node.port
    await node.stop()
    for client in (plain, subscribed):
        closed = await client.closed()
        assert closed.code == 4200
        assert closed.frames[-1]["data"]["code"] == 4200
    assert node.metrics.connections_closed[(APP_ID, 4200)] == 2
    with pytest.raises(OSError):
        await open_client(port)


async def test_rest_and_websocket_share_the_port(node: Node) -> None:
    response = await rest(node.port, "GET", f"/apps/{APP_ID}/channels")
    assert response.status == 200
    assert response.json() == {"channels": {}}
