"""Channel caps and bounded channel queries through a real node (#11 item 3).

Today's defaults let one address hold up to ``max_channels_per_connection`` (1,000)
channels per connection; a new channel past an app's or the node's cap is refused;
``GET /channels`` lists at most ``max_channels_in_query`` channels and says when it
stopped. With Redis the query reads the app's channel set incrementally.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from support.clients import APP_ID, PusherClient, rest

from bastion.config import AppSettings
from bastion.server.runtime import Node

from .conftest import MakeCluster, MakeNode

Connect = Callable[..., Awaitable[PusherClient]]


def test_the_defaults_bound_channels() -> None:
    settings = AppSettings.model_validate({"id": "1", "key": "k", "secret": "s"})
    assert settings.max_channels_per_connection <= 1_000
    # A reconnect to every channel fits both bursts.
    assert settings.subscribe_burst >= settings.max_channels_per_connection + 1
    assert settings.message_burst >= settings.max_channels_per_connection + 1
    assert settings.max_channels is not None
    assert settings.max_channels_in_query <= 10_000


async def test_a_connection_past_its_channel_cap_gets_a_limit_error_and_stays(
    make_node: MakeNode, connect: Connect
) -> None:
    node = await make_node(app={"max_channels_per_connection": 3})
    client = await connect(node)
    for index in range(3):
        await client.subscribed(f"room-{index}")
    reply = await client.subscribe("room-3")
    assert reply["event"] == "pusher:subscription_error"
    assert reply["channel"] == "room-3"
    assert reply["data"]["type"] == "LimitReached" and reply["data"]["status"] == 403
    assert node.metrics.refusal_count("subscribe_too_many_channels") == 1
    await client.send({"event": "pusher:unsubscribe", "data": {"channel": "room-0"}})
    await client.subscribed("room-3")  # the connection is still served


async def test_a_node_past_its_channel_cap_refuses_new_channels_only(
    make_node: MakeNode, connect: Connect
) -> None:
    node = await make_node(server={"max_channels": 2})
    one, two = await connect(node), await connect(node)
    await one.subscribed("first")
    await two.subscribed("second")
    reply = await two.subscribe("third")
    assert reply["data"]["type"] == "LimitReached"
    assert node.metrics.refusal_count("node_channels_full") == 1
    await two.subscribed("first")  # joining an existing channel is fine


async def test_a_channels_query_is_bounded_and_marked_truncated(
    make_node: MakeNode, connect: Connect
) -> None:
    node = await make_node(app={"max_channels_in_query": 5})
    client = await connect(node)
    for index in range(8):
        await client.subscribed(f"room-{index}")
    answer = (await rest(node.port, "GET", f"/apps/{APP_ID}/channels")).json()
    assert answer["truncated"] is True and len(answer["channels"]) == 5
    narrow = await rest(
        node.port, "GET", f"/apps/{APP_ID}/channels", params=[("filter_by_prefix", "room-7")]
    )
    assert narrow.json() == {"channels": {"room-7": {}}}  # complete: no flag


async def test_a_cluster_channels_query_is_bounded_too(
    make_cluster: MakeCluster, clients: Callable[[Node], Awaitable[PusherClient]], prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app={"max_channels_in_query": 4})
    for node in (a, b):
        client = await clients(node)
        for index in range(4):
            await client.subscribed(f"{'a' if node is a else 'b'}-{index}")
    answer = (await rest(b.port, "GET", f"/apps/{APP_ID}/channels")).json()
    assert answer["truncated"] is True and len(answer["channels"]) == 4
    only_a = await rest(
        b.port, "GET", f"/apps/{APP_ID}/channels", params=[("filter_by_prefix", "a-")]
    )
    assert sorted(only_a.json()["channels"]) == ["a-0", "a-1", "a-2", "a-3"]
