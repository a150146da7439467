"""The histograms and reconnect counts in a real scrape of an in-process node.

Connections' lives (a client's own close counts too), message sizes, reconnects by
address and by signed-in user, REST requests by route template, the publish to
fan-out time, and the sampled loop lag: each driven over real sockets, then read
from ``/metrics`` as Prometheus would.
"""

from __future__ import annotations

import json
from typing import Any

import pusher
from prometheus_client.parser import text_string_to_metric_families
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    DEFAULT_QUERY,
    PusherClient,
    RawWebSocket,
    build_frame,
    http_request,
    make_sdk,
    rest,
)
from support.timeouts import until

from bastion.server.runtime import Node

from .conftest import Connect, MakeNode

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(node: Node) -> tuple[str, Samples]:
    result = await http_request(node.port, "GET", "/metrics")
    assert result.status == 200
    text = result.body.decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, found


def one(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_a_connection_closed_by_its_client_is_timed_and_its_messages_counted(
    node: Node, connect: Connect
) -> None:
    client = await connect(node)
    for _ in range(3):
        await client.ping()
    big = json.dumps({"event": "pusher:ping", "data": {"pad": "x" * 1500}})
    await client.send(big)  # past the lookup table of small sizes
    await client.expect("pusher:pong")
    await client.close()  # the client's own close (1000): counted like the server's
    await until(lambda: node.metrics.connections_closed[(APP_ID, 1000)] == 1)
    _, found = await scrape(node)
    assert one(found, "bastion_connections_closed_total", app=APP_ID, code="1000") == 1
    assert (
        one(found, "bastion_connection_duration_seconds_count", app=APP_ID, code_class="normal")
        == 1
    )
    assert one(found, "bastion_connection_messages_per_minute_count", app=APP_ID) == 1
    assert one(found, "bastion_connection_messages_per_minute_sum", app=APP_ID) > 0
    assert one(found, "bastion_message_size_bytes_count", app=APP_ID) == 4
    ping = len(json.dumps({"event": "pusher:ping", "data": {}}))  # what client.ping() sends
    assert one(found, "bastion_message_size_bytes_sum", app=APP_ID) == 3 * ping + len(big)
    assert one(found, "bastion_message_size_bytes_bucket", app=APP_ID, le="64.0") == 3
    assert one(found, "bastion_message_size_bytes_bucket", app=APP_ID, le="1024.0") == 3
    assert one(found, "bastion_message_size_bytes_bucket", app=APP_ID, le="2048.0") == 4


async def test_a_client_close_is_counted_on_the_slow_path_too(
    node: Node, raw_sockets: list[RawWebSocket]
) -> None:
    raw = await RawWebSocket.open(node.port)  # connection_established read
    raw_sockets.append(raw)
    # A ping and the start of a close in one read: the sans-I/O protocol answers the
    # ping and keeps the partial close, so the rest of it is its to read, not the fast
    # path's, and it asks for the TCP end once the close is whole.
    close = build_frame(0x8, (1000).to_bytes(2, "big"))
    raw.write(build_frame(0x9, b"x") + close[:3])
    assert (await raw.read_frame()).opcode == 0xA  # the pong: that read is handled
    raw.write(close[3:])
    code, _ = await raw.read_close()
    assert code == 1000
    await until(lambda: node.metrics.connections_closed[(APP_ID, 1000)] == 1)
    _, found = await scrape(node)
    assert (
        one(found, "bastion_connection_duration_seconds_count", app=APP_ID, code_class="normal")
        == 1
    )


async def test_a_client_back_from_the_same_address_is_a_reconnect(
    node: Node, connect: Connect
) -> None:
    first = await connect(node)
    await first.close()
    await until(lambda: node.metrics.connections_closed[(APP_ID, 1000)] == 1)
    await connect(node)
    await connect(node)  # a second tab: no close left to answer for it
    _, found = await scrape(node)
    assert one(found, "bastion_reconnects_total", app=APP_ID, match="address") == 1
    assert one(found, "bastion_reconnects_total", app=APP_ID, match="user") == 0


async def _signed_in_from(
    node: Node, sdk: pusher.Pusher, address: str, user: dict[str, Any]
) -> PusherClient:
    client = await PusherClient.connect(
        f"ws://127.0.0.1:{node.port}/app/{APP_KEY}?{DEFAULT_QUERY}",
        additional_headers={"X-Forwarded-For": address},
    )
    auth = sdk.authenticate_user(socket_id=client.socket_id, user_data=user)
    await client.send({"event": "pusher:signin", "data": auth})
    await client.expect("pusher:signin_success")
    return client


async def test_a_signed_in_user_back_from_another_address_is_a_reconnect(
    make_node: MakeNode,
) -> None:
    node = await make_node(security={"trusted_proxies": ["127.0.0.1/32"]})
    sdk = make_sdk(node.port)
    phone = await _signed_in_from(node, sdk, "203.0.113.1", {"id": "user-1"})
    await phone.close()
    await until(lambda: node.metrics.connections_closed[(APP_ID, 1000)] == 1)
    other = await _signed_in_from(node, sdk, "203.0.113.2", {"id": "user-2"})
    again = await _signed_in_from(node, sdk, "198.51.100.7", {"id": "user-1"})
    _, found = await scrape(node)
    assert one(found, "bastion_reconnects_total", app=APP_ID, match="user") == 1
    assert one(found, "bastion_reconnects_total", app=APP_ID, match="address") == 0
    await other.close()
    await again.close()


async def test_rest_requests_are_timed_by_route_template_never_by_path(
    node: Node, connect: Connect
) -> None:
    subscriber = await connect(node)
    await subscriber.subscribe("orders")
    event = {"name": "created", "channel": "orders", "data": "{}"}
    assert (await rest(node.port, "POST", f"/apps/{APP_ID}/events", event)).status == 200
    await subscriber.expect("created")
    assert (
        await rest(node.port, "POST", f"/apps/{APP_ID}/events", event, secret="x")
    ).status == 401
    path = f"/apps/{APP_ID}/channels/private-secret-room"
    assert (await rest(node.port, "GET", path)).status == 200
    text, found = await scrape(node)
    events = "/apps/{app_id}/events"
    assert (
        one(found, "bastion_rest_request_duration_seconds_count", route=events, status_class="2xx")
        == 1
    )
    assert (
        one(found, "bastion_rest_request_duration_seconds_count", route=events, status_class="4xx")
        == 1
    )
    channel = "/apps/{app_id}/channels/{channel}"
    assert (
        one(found, "bastion_rest_request_duration_seconds_count", route=channel, status_class="2xx")
        == 1
    )
    # Only the accepted publish times the fan-out, under its (configured) app id.
    assert one(found, "bastion_publish_fanout_seconds_count", app=APP_ID) == 1
    assert "private-secret-room" not in text and APP_SECRET not in text


async def test_the_loop_lag_is_sampled(node: Node) -> None:
    async def sampled() -> bool:
        _, found = await scrape(node)
        return one(found, "bastion_event_loop_lag_seconds_count") >= 2

    await until(sampled, 10)
