"""Three in-process nodes sharing events over a real Redis (issue #5, first slice).

Every test uses its own key ``prefix``, so tests never see each other's messages
on the shared Redis at 127.0.0.1:6379; outage tests run a private ``redis-server``
(:mod:`support.redis_server`) they can kill and restart on the same port. Waits
are on observable effects (a frame, a ``PUBSUB NUMSUB`` count, a metric, the
adapter's health), each bounded by :func:`timeouts.within`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import redis.asyncio as aioredis
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    PusherClient,
    data_of,
    hmac_hex,
    rest,
)
from support.pki import make_pki
from support.redis_server import RedisServer
from support.timeouts import until

from bastion.adapters.messages import ChannelEvent
from bastion.server.runtime import Node
from bastion.store.audit import query as query_audit

from .conftest import LogCheck, MakeCluster


def topic(prefix: str, channel: str, app_id: str = APP_ID) -> str:
    return f"{prefix}:ch:{app_id}:{channel}"


async def numsub(client: aioredis.Redis, name: str) -> int:
    """Subscribers of one Redis pub/sub channel (one per interested node)."""
    counts = await client.pubsub_numsub(name)
    return int(counts[0][1])


async def trigger(node: Node, channel: str, event: str, data: str, **extra: Any) -> None:
    """A signed REST trigger on ``node``."""
    body = {"name": event, "channel": channel, "data": data, **extra}
    result = await rest(node.port, "POST", f"/apps/{APP_ID}/events", body)
    assert result.status == 200, result


def private_auth(client: PusherClient, channel: str, channel_data: str | None = None) -> str:
    message = f"{client.socket_id}:{channel}" + (f":{channel_data}" if channel_data else "")
    return f"{APP_KEY}:{hmac_hex(APP_SECRET, message)}"


async def test_rest_trigger_reaches_subscribers_on_other_nodes_only_where_interested(
    make_cluster: MakeCluster,
    clients: Any,
    shared_redis: aioredis.Redis,
    prefix: str,
    logs: LogCheck,
) -> None:
    a, b, c = await make_cluster(3, prefix=prefix)
    assert all(node.hub.bus.healthy for node in (a, b, c))
    on_a, on_c, on_b = await clients(a), await clients(c), await clients(b)
    await on_a.subscribed("news")
    await on_c.subscribed("news")
    await until(lambda: _equals(numsub(shared_redis, topic(prefix, "news")), 2))

    await trigger(b, "news", "headline", '{"n":1}')
    for client in (on_a, on_c):
        event = await client.expect("headline", "news")
        assert event["data"] == '{"n":1}'
    # Each exactly once (no echo, no double delivery); B has no subscriber of "news".
    for client in (on_a, on_c, on_b):
        await client.barrier()
    assert b.metrics.bus_published[APP_ID] >= 1
    assert a.metrics.bus_received[APP_ID] == 1 and c.metrics.bus_received[APP_ID] == 1
    assert b.metrics.bus_received[APP_ID] == 0  # no interest: never subscribed
    logs.assert_clean()


async def _equals(awaitable: Awaitable[int], expected: int) -> bool:
    return await awaitable == expected


async def test_echoes_are_not_delivered_twice(
    make_cluster: MakeCluster, clients: Any, shared_redis: aioredis.Redis, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix)
    on_a, on_b = await clients(a), await clients(b)
    await on_a.subscribed("room")
    await on_b.subscribed("room")
    await until(lambda: _equals(numsub(shared_redis, topic(prefix, "room")), 2))
    await trigger(a, "room", "hello", "1")
    await on_a.expect("hello", "room")
    await on_b.expect("hello", "room")
    # Redis sends A the echo of "hello" before anything published after it on the
    # topic: once A has B's "marker" over the bus, it has read (and dropped) the echo.
    await trigger(b, "room", "marker", "2")
    await on_a.expect("marker", "room")
    await on_b.expect("marker", "room")
    for client in (on_a, on_b):
        await client.barrier()
    assert a.metrics.bus_received[APP_ID] == 1  # only the marker
    assert b.metrics.bus_received[APP_ID] == 1  # only hello


async def test_socket_id_exclusion_works_across_nodes(
    make_cluster: MakeCluster, clients: Any, shared_redis: aioredis.Redis, prefix: str
) -> None:
    a, b, c = await make_cluster(3, prefix=prefix)
    on_a, on_c = await clients(a), await clients(c)
    await on_a.subscribed("feed")
    await on_c.subscribed("feed")
    await until(lambda: _equals(numsub(shared_redis, topic(prefix, "feed")), 2))
    await trigger(b, "feed", "update", "x", socket_id=on_a.socket_id)
    await on_c.expect("update", "feed")
    await until(lambda: a.metrics.bus_received[APP_ID] == 1)
    await on_a.barrier()  # received over the bus, excluded: nothing written


async def test_client_event_reaches_other_nodes_but_not_the_sender(
    make_cluster: MakeCluster, clients: Any, shared_redis: aioredis.Redis, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix)
    sender, receiver = await clients(a), await clients(b)
    for client in (sender, receiver):
        await client.subscribed("private-chat", auth=private_auth(client, "private-chat"))
    await until(lambda: _equals(numsub(shared_redis, topic(prefix, "private-chat")), 2))
    await sender.send({"event": "client-typing", "channel": "private-chat", "data": {"k": 1}})
    event = await receiver.expect("client-typing", "private-chat")
    assert event["data"] == {"k": 1}  # relayed as the client sent it, as locally
    assert "user_id" not in event
    await until(lambda: a.metrics.bus_published[APP_ID] == 1)
    await sender.barrier()


async def test_presence_client_event_carries_the_user_id_across_nodes(
    make_cluster: MakeCluster, clients: Any, shared_redis: aioredis.Redis, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix)
    sender, receiver = await clients(a), await clients(b)
    channel = "presence-room"
    for client, user in ((sender, "alice"), (receiver, "bob")):
        data = json.dumps({"user_id": user})
        auth = private_auth(client, channel, data)
        await client.subscribed(channel, auth=auth, channel_data=data)
    await until(lambda: _equals(numsub(shared_redis, topic(prefix, channel)), 2))
    await sender.send({"event": "client-wave", "channel": channel, "data": {}})
    event = await receiver.recv()
    if event["event"] == "pusher_internal:member_added":
        # Presence is cluster-wide: alice may join bob's view after his member list.
        assert data_of(event)["user_id"] == "alice"
        event = await receiver.recv()
    assert event["event"] == "client-wave" and event["channel"] == channel
    assert event["user_id"] == "alice"


async def test_server_to_user_reaches_a_signed_in_user_on_another_node(
    make_cluster: MakeCluster, clients: Any, prefix: str
) -> None:
    _, b, c = await make_cluster(3, prefix=prefix)
    user = await clients(c)
    user_data = json.dumps({"id": "carol"})
    auth = f"{APP_KEY}:{hmac_hex(APP_SECRET, f'{user.socket_id}::user::{user_data}')}"
    await user.send({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}})
    await user.expect("pusher:signin_success")
    # The users topic is subscribed from start: no interest to wait for.
    await trigger(b, "#server-to-user-carol", "notice", '{"hi":1}')
    event = await user.expect("notice", "#server-to-user-carol")
    assert event["data"] == '{"hi":1}'


async def test_interest_off_unsubscribes_the_topic(
    make_cluster: MakeCluster, clients: Any, shared_redis: aioredis.Redis, prefix: str
) -> None:
    (a,) = await make_cluster(1, prefix=prefix)
    client = await clients(a)
    name = topic(prefix, "fleeting")
    await client.subscribed("fleeting")
    await until(lambda: _equals(numsub(shared_redis, name), 1))
    await client.send({"event": "pusher:unsubscribe", "data": {"channel": "fleeting"}})
    await until(lambda: _equals(numsub(shared_redis, name), 0))
    await client.subscribed("fleeting")  # and back
    await until(lambda: _equals(numsub(shared_redis, name), 1))


async def test_a_forged_message_is_not_delivered_and_is_counted_and_audited(
    make_cluster: MakeCluster, clients: Any, shared_redis: aioredis.Redis, prefix: str
) -> None:
    (a,) = await make_cluster(1, prefix=prefix)
    client = await clients(a)
    await client.subscribed("target")
    name = topic(prefix, "target")
    await until(lambda: _equals(numsub(shared_redis, name), 1))
    body = json.dumps(
        {
            "v": 1,
            "o": "evil",
            "i": uuid4().hex,
            "t": 0,
            "a": APP_ID,
            "c": "target",
            "e": "injected",
            "d": "pwned",
            "x": None,
            "u": None,
            "k": "s",
        },
        separators=(",", ":"),
    ).encode()
    assert await shared_redis.publish(name, b"0" * 64 + b"." + body) == 1
    assert await shared_redis.publish(name, b"garbage") == 1
    await until(lambda: sum(a.metrics.bus_forged.values()) == 2)
    assert a.metrics.bus_forged == {"bad_mac": 1, "malformed": 1}
    await client.barrier()  # nothing was delivered
    assert a.metrics.bus_received[APP_ID] == 0
    audit_path = a.settings.audit.path
    await client.close()  # so the drain does not wait for it
    await a.stop()  # flushes the audit log
    events = query_audit(audit_path, type="bus_message_forged")
    assert {event.metadata["reason"] for event in events} == {"bad_mac", "malformed"}
    assert all(event.severity == "warning" and "pwned" not in event.message for event in events)


async def test_other_prefixes_and_unknown_apps_are_ignored(
    make_cluster: MakeCluster, clients: Any, shared_redis: aioredis.Redis, prefix: str
) -> None:
    (a,) = await make_cluster(1, prefix=prefix)
    (other,) = await make_cluster(1, prefix=f"{prefix}-other")
    client = await clients(a)
    await client.subscribed("shared-name")
    await until(lambda: _equals(numsub(shared_redis, topic(prefix, "shared-name")), 1))
    await trigger(other, "shared-name", "elsewhere", "1")
    await trigger(a, "shared-name", "here", "2")
    await client.expect("here", "shared-name")
    await client.barrier()
    # An authentic message for an app this node does not have is dropped quietly.
    a.hub.receive(ChannelEvent("no-such-app", "shared-name", "x", "1"))
    await client.barrier()


async def test_node_survives_a_redis_outage_and_resubscribes(
    make_cluster: MakeCluster, clients: Any, prefix: str, logs: LogCheck
) -> None:
    with RedisServer() as server:
        a, b = await make_cluster(
            2, url=server.url, prefix=prefix, heartbeat_seconds=0.5, reconnect_max_seconds=0.5
        )
        private = aioredis.from_url(server.url)
        try:
            on_a, on_b = await clients(a), await clients(b)
            await on_a.subscribed("live")
            await on_b.subscribed("live")
            await until(lambda: _equals(numsub(private, topic(prefix, "live")), 2))
            await private.aclose()

            server.kill()
            await until(lambda: not a.hub.bus.healthy and not b.hub.bus.healthy)
            assert a.metrics.bus_connected == 0
            # Local delivery still works; the bus copy is dropped and counted.
            await trigger(a, "live", "local-only", "1")
            await on_a.expect("local-only", "live")
            assert a.metrics.bus_dropped["disconnected"] >= 1

            server.start()  # same port
            await until(lambda: a.hub.bus.healthy and b.hub.bus.healthy, 15)
            private = aioredis.from_url(server.url)
            await until(lambda: _equals(numsub(private, topic(prefix, "live")), 2))
            await trigger(b, "live", "after-outage", "2")
            await on_a.expect("after-outage", "live")
            await on_b.expect("after-outage", "live")
            await on_b.barrier()  # "local-only" never reached B, even late
            assert a.metrics.bus_connects >= 2 and a.metrics.bus_connected == 1
            await on_a.close()
            await on_b.close()
        finally:
            await private.aclose()
            for node in (a, b):
                await node.stop()
    logs.assert_clean()


async def test_a_hung_redis_is_detected_by_the_heartbeat(
    make_cluster: MakeCluster, clients: Any, prefix: str, logs: LogCheck
) -> None:
    with RedisServer() as server:
        a, b = await make_cluster(
            2, url=server.url, prefix=prefix, heartbeat_seconds=0.2, reconnect_max_seconds=0.5
        )
        on_a, on_b = await clients(a), await clients(b)
        await on_a.subscribed("pulse")
        await on_b.subscribed("pulse")
        server.pause()
        try:
            # The TCP connections stay open: only the unanswered heartbeat tells.
            await until(lambda: not a.hub.bus.healthy and not b.hub.bus.healthy, 10)
        finally:
            server.resume()
        await until(lambda: a.hub.bus.healthy and b.hub.bus.healthy, 15)
        private = aioredis.from_url(server.url)
        try:
            await until(lambda: _equals(numsub(private, topic(prefix, "pulse")), 2))
        finally:
            await private.aclose()
        await trigger(a, "pulse", "beat", "1")
        await on_b.expect("beat", "pulse")
        await on_a.close()
        await on_b.close()
        for node in (a, b):
            await node.stop()
    logs.assert_clean()


async def test_a_node_starts_without_redis_and_connects_when_it_comes_up(
    make_cluster: MakeCluster, clients: Any, prefix: str, logs: LogCheck
) -> None:
    server = RedisServer()  # a free port, nothing listening yet
    try:
        (a,) = await make_cluster(
            1, url=server.url, prefix=prefix, heartbeat_seconds=0.5, reconnect_max_seconds=0.5
        )
        assert not a.hub.bus.healthy
        client = await clients(a)
        await client.subscribed("early")
        await trigger(a, "early", "works", "1")  # local traffic is served meanwhile
        await client.expect("works", "early")
        server.start()
        await until(lambda: a.hub.bus.healthy, 15)
        private = aioredis.from_url(server.url)
        try:
            # Interest gained while disconnected is subscribed on connect.
            await until(lambda: _equals(numsub(private, topic(prefix, "early")), 1))
        finally:
            await private.aclose()
        await client.close()
        await a.stop()
    finally:
        server.stop()
    logs.assert_clean()
    warnings = [r.getMessage() for r in logs.caplog.records if r.name == "bastion.bus"]
    assert any("unreachable at start" in text for text in warnings)
    assert not any("@" in text for text in warnings)  # never a URL's credentials


async def test_subscribed_means_events_from_other_nodes_arrive(
    make_cluster: MakeCluster, clients: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No waiting for PUBSUB NUMSUB here: subscription_succeeded itself must mean
    # that the node listens on the bus, so an event triggered on another node the
    # moment the client is told it is subscribed is never missed. The fallback is
    # pushed out of reach: every answer here must come from a Redis confirmation.
    monkeypatch.setattr("bastion.adapters.redis.topics.READY_WAIT", 3600.0)
    a, b = await make_cluster(2, prefix=prefix)
    on_a = await clients(a)
    for n in range(20):
        channel = f"fresh-{n}"
        await on_a.subscribed(channel)
        await trigger(b, channel, "first", str(n))
        assert (await on_a.expect("first", channel))["data"] == str(n)


async def test_nodes_talk_over_tls_redis_with_a_password(
    make_cluster: MakeCluster, clients: Any, prefix: str, tmp_path: Path, logs: LogCheck
) -> None:
    password = "redis-password-0123456789abcdef"
    with RedisServer(password=password, tls=make_pki(tmp_path)) as server:
        assert server.url.startswith("rediss://")
        a, b = await make_cluster(2, url=server.url, prefix=prefix)
        assert a.hub.bus.healthy and b.hub.bus.healthy
        listener = await clients(b)
        await listener.subscribed("secure-news")
        private = aioredis.from_url(server.url)
        try:
            await until(lambda: _equals(numsub(private, topic(prefix, "secure-news")), 1))
            # The cluster's shared state is there too (over the same TLS connection).
            assert await private.smembers(f"{prefix}:chans:{APP_ID}") == {b"secure-news"}
        finally:
            await private.aclose()
        await trigger(a, "secure-news", "hello", '{"tls":true}')
        event = await listener.expect("hello", "secure-news")
        assert event["data"] == '{"tls":true}'
    logs.assert_clean()
    assert not any(password in record.getMessage() for record in logs.caplog.records)
