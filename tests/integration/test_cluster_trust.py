"""What Redis feeds back to clients is authenticated; one bad entry cannot stop the bus.

Issue #11, items 4, 5 and 8, over the real Redis: someone who can write to Redis
but does not hold the cluster key cannot add a presence member or a cached event
that clients would see; a captured bus message is not delivered twice however
fast the cluster publishes; a user id that cannot be written to Redis is dropped
and counted without taking the bus session down; a node that leaves a channel
another node still holds forgets its count state for it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from support.clients import APP_ID, PusherClient, data_of, rest
from support.timeouts import until

from bastion.server.runtime import Node
from bastion.store.audit import query as query_audit

from .conftest import MakeCluster
from .test_redis_cluster import numsub, private_auth, topic, trigger

Clients = Callable[[Node], Awaitable[PusherClient]]
ROOM = "presence-room"


async def _join(client: PusherClient, user: str) -> dict[str, object]:
    data = json.dumps({"user_id": user, "user_info": {"name": user}})
    reply = await client.subscribed(ROOM, auth=private_auth(client, ROOM, data), channel_data=data)
    presence: dict[str, object] = data_of(reply)["presence"]["hash"]
    return presence


async def test_a_member_written_into_redis_without_the_key_is_never_shown(
    make_cluster: MakeCluster, clients: Clients, shared_redis: aioredis.Redis, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix)
    await _join(await clients(a), "alice")
    members_key = f"{prefix}:pu:{APP_ID}:{ROOM}"
    await until(lambda: shared_redis.hexists(members_key, "alice"))
    # A fake member, and alice's sealed value copied under another user id.
    await shared_redis.hset(members_key, "mallory", '{"name":"M"}')
    await shared_redis.hincrby(f"{prefix}:pn:{APP_ID}:{ROOM}", "mallory", 1)
    sealed = await shared_redis.hget(members_key, "alice")
    assert sealed is not None and not sealed.startswith(b"{")
    await shared_redis.hset(members_key, "eve", sealed)
    assert await _join(await clients(b), "bob") == {
        "alice": {"name": "alice"},
        "bob": {"name": "bob"},
    }
    users = await rest(b.port, "GET", f"/apps/{APP_ID}/channels/{ROOM}/users")
    assert sorted(user["id"] for user in users.json()["users"]) == ["alice", "bob"]
    assert b.metrics.bus_forged["forged_member"] >= 2
    audit_path = b.settings.audit.path
    await b.stop()  # flushes the audit log
    events = query_audit(audit_path, type="bus_message_forged")
    assert {event.metadata["reason"] for event in events} == {"forged_member"}


async def test_a_cache_event_written_into_redis_without_the_key_is_a_miss(
    make_cluster: MakeCluster, clients: Clients, shared_redis: aioredis.Redis, prefix: str
) -> None:
    (a,) = await make_cluster(1, prefix=prefix)
    await shared_redis.set(f"{prefix}:cache:{APP_ID}:cache-scores", '["goal","{}"]', px=60_000)
    client = await clients(a)
    await client.subscribed("cache-scores")
    miss = await client.expect("pusher:cache_miss", "cache-scores")
    assert miss["channel"] == "cache-scores"
    # What a node did record is served, and only on the channel it was recorded for.
    await trigger(a, "cache-real", "update", '{"n":1}')
    await until(lambda: shared_redis.exists(f"{prefix}:cache:{APP_ID}:cache-real"))
    recorded = await shared_redis.get(f"{prefix}:cache:{APP_ID}:cache-real")
    await shared_redis.set(f"{prefix}:cache:{APP_ID}:cache-moved", recorded, px=60_000)
    moved = await clients(a)
    await moved.subscribed("cache-moved")
    await moved.expect("pusher:cache_miss", "cache-moved")
    real = await clients(a)
    await real.subscribed("cache-real")
    assert (await real.expect("update", "cache-real"))["data"] == '{"n":1}'
    assert a.metrics.bus_forged["forged_cache"] == 2


async def test_a_captured_bus_message_is_not_delivered_twice(
    make_cluster: MakeCluster, clients: Clients, shared_redis: aioredis.Redis, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix)
    receiver = await clients(b)
    await receiver.subscribed("news")
    name = topic(prefix, "news")
    await until(lambda: _equals(numsub(shared_redis, name), 1))
    # Listen on the topic like an attacker with Redis access, capture one message.
    spy = shared_redis.pubsub()
    await spy.subscribe(name)
    await spy.get_message(timeout=1)
    await trigger(a, "news", "once", "1")
    await receiver.expect("once", "news")
    captured = None
    while captured is None:
        message = await spy.get_message(timeout=1)
        if message is not None and message["type"] == "message":
            captured = message["data"]
    await spy.aclose()
    # Far more traffic than the old id set held would have evicted it by count; the
    # sequence window does not forget.
    for index in range(3):
        await trigger(a, "news", "later", str(index))
    await shared_redis.publish(name, captured)
    await trigger(a, "news", "marker", "end")
    for index in range(3):
        assert (await receiver.expect("later", "news"))["data"] == str(index)
    await receiver.expect("marker", "news")
    assert b.metrics.bus_dropped["replayed"] == 1


async def test_an_unwritable_user_id_is_dropped_and_the_bus_stays_up(
    make_cluster: MakeCluster, clients: Clients, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix)
    # Straight to the cluster state (the hub's validators refuse such ids first).
    a.hub.state.member_on(APP_ID, ROOM, "\ud800x", None, "1.1")
    a.hub.state.user_on(APP_ID, "\udfffy")
    assert a.metrics.bus_dropped["unencodable"] == 2
    watcher = await clients(b)
    await watcher.subscribed("news")
    await trigger(a, "news", "still", "up")
    await watcher.expect("still", "news")
    assert a.hub.bus.healthy and a.metrics.bus_connects == 1


async def test_leaving_a_channel_another_node_holds_forgets_its_count_state(
    make_cluster: MakeCluster, clients: Clients, shared_redis: aioredis.Redis, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app={"enable_subscription_count": True})
    stays = await clients(b)
    await stays.subscribed("busy")
    for _ in range(20):  # a joins and leaves the channel b still holds, again and again
        client = await clients(a)
        await client.subscribed("busy")
        await client.close()
    state = a.hub.state
    await until(lambda: _settled(state))
    assert state._throttle.tracked == 0  # type: ignore[attr-defined]
    assert state._counts == {}  # type: ignore[attr-defined]


async def _settled(state: object) -> bool:
    return not state._occ_held  # type: ignore[attr-defined]


async def _equals(awaitable: Awaitable[int], expected: int) -> bool:
    return await awaitable == expected
