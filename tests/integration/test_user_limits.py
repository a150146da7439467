"""Limits that follow users, across two real nodes over the real Redis (issue #15).

Every test uses its own key ``prefix`` on the shared Redis at 127.0.0.1:6379; the
outage test runs a private ``redis-server`` (:mod:`support.redis_server`) it can
kill and restart. Waits are on observable state (a frame, a close, a Redis key,
the bus's health), bounded by :mod:`support.timeouts`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis
from support.clients import APP_ID, APP_KEY, APP_SECRET, PusherClient, hmac_hex, rest
from support.redis_server import RedisServer
from support.timeouts import until

from bastion.server.runtime import Node
from bastion.store.audit import query as query_audit

from .conftest import LogCheck, MakeCluster
from .test_redis_cluster import private_auth


async def signin(client: PusherClient, user: dict[str, Any]) -> None:
    """Send an HMAC ``pusher:signin`` as the app's auth endpoint would sign it."""
    user_data = json.dumps(user)
    auth = f"{APP_KEY}:{hmac_hex(APP_SECRET, f'{client.socket_id}::user::{user_data}')}"
    await client.signin(auth, user_data)


async def signed_in(client: PusherClient, user: dict[str, Any]) -> None:
    await signin(client, user)
    await client.expect("pusher:signin_success")


async def counted(redis: aioredis.Redis, prefix: str, user_id: str) -> list[str]:
    """The socket ids Redis counts for ``user_id``, oldest first."""
    members = await redis.zrange(f"{prefix}:uconn:{APP_ID}:{user_id}", 0, -1)
    return [member.decode().partition("\n")[2] for member in members]


async def counts(redis: aioredis.Redis, prefix: str, user_id: str, expected: list[str]) -> bool:
    return await counted(redis, prefix, user_id) == expected


async def test_a_user_over_the_cap_is_refused_whichever_node_they_reach(
    make_cluster: MakeCluster,
    clients: Any,
    shared_redis: aioredis.Redis,
    prefix: str,
    logs: LogCheck,
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app={"max_connections_per_user": 2})
    first, second = await clients(a), await clients(b)
    await signed_in(first, {"id": "alice"})
    await signed_in(second, {"id": "alice"})
    for node in (a, b):  # a third connection is refused on either node
        extra = await clients(node)
        await signin(extra, {"id": "alice"})
        error = await extra.expect("pusher:error")
        assert error["data"]["code"] == 4303, error
        await extra.barrier()  # still open, and anonymous
        await extra.subscribed("public-news")
        assert node.metrics.refusals[("user_connection_limit", APP_ID)] == 1
    assert await counted(shared_redis, prefix, "alice") == [first.socket_id, second.socket_id]
    # One of alice's connections closes (on A): a new one on B has room again.
    await first.close()
    await until(lambda: counts(shared_redis, prefix, "alice", [second.socket_id]))
    again = await clients(b)
    await signed_in(again, {"id": "alice"})
    assert await counted(shared_redis, prefix, "alice") == [second.socket_id, again.socket_id]
    logs.assert_clean()


async def test_one_session_per_user_closes_the_old_one_on_the_other_node(
    make_cluster: MakeCluster,
    clients: Any,
    shared_redis: aioredis.Redis,
    prefix: str,
    logs: LogCheck,
) -> None:
    a, b = await make_cluster(
        2,
        prefix=prefix,
        app={"max_connections_per_user": 1, "user_connection_policy": "close_oldest"},
    )
    old = await clients(a)
    await signed_in(old, {"id": "alice"})
    new = await clients(b)
    await signed_in(new, {"id": "alice"})
    closed = await old.closed()
    assert closed.code == 4009, closed
    assert [f["data"]["code"] for f in closed.frames if f["event"] == "pusher:error"] == [4009]
    assert a.metrics.refusals[("session_replaced", APP_ID)] == 1
    await new.barrier()  # the new one is untouched
    assert await counted(shared_redis, prefix, "alice") == [new.socket_id]
    # And back the other way: a newer sign-in on A replaces the one on B.
    newer = await clients(a)
    await signed_in(newer, {"id": "alice"})
    assert (await new.closed()).code == 4009
    await until(lambda: counts(shared_redis, prefix, "alice", [newer.socket_id]))
    logs.assert_clean()


async def test_while_redis_is_down_each_node_counts_its_own_and_says_so(
    make_cluster: MakeCluster, clients: Any, prefix: str, logs: LogCheck
) -> None:
    with RedisServer() as server:
        a, b = await make_cluster(
            2,
            url=server.url,
            prefix=prefix,
            app={"max_connections_per_user": 1},
            reconnect_max_seconds=0.2,
        )
        assert a.ctx.ops is not None
        assert a.ctx.ops.checks()["user_limits"] == "ok"
        server.kill()
        await until(lambda: not a.hub.bus.healthy and not b.hub.bus.healthy)
        assert a.ctx.ops.checks()["user_limits"] == "per_node"
        # The cap now holds per node: one connection of alice on each.
        on_a, on_b = await clients(a), await clients(b)
        await signed_in(on_a, {"id": "alice"})
        await signed_in(on_b, {"id": "alice"})
        extra = await clients(a)
        await signin(extra, {"id": "alice"})
        assert (await extra.expect("pusher:error"))["data"]["code"] == 4303
        assert a.metrics.user_limits_per_node == 2 and b.metrics.user_limits_per_node == 1
        # Back: each node records its connection, and the cluster counts both.
        server.start()
        await until(lambda: a.hub.bus.healthy and b.hub.bus.healthy, 15)
        private = aioredis.from_url(server.url)
        try:
            await until(lambda: _count_is(private, prefix, "alice", 2), 15)
            assert a.ctx.ops.checks()["user_limits"] == "ok"
            late = await clients(b)
            await signin(late, {"id": "alice"})
            assert (await late.expect("pusher:error"))["data"]["code"] == 4303
            assert b.metrics.user_limits_per_node == 1  # decided in Redis this time
        finally:
            await private.aclose()
        for node in (a, b):
            await node.stop()
    logs.assert_clean()


async def _count_is(redis: aioredis.Redis, prefix: str, user_id: str, expected: int) -> bool:
    return len(await counted(redis, prefix, user_id)) == expected


async def test_a_stopped_node_uncounts_its_connections(
    make_cluster: MakeCluster, clients: Any, shared_redis: aioredis.Redis, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app={"max_connections_per_user": 1})
    on_a = await clients(a)
    await signed_in(on_a, {"id": "alice"})
    await b.stop()  # B held nothing; A stops next with alice counted
    await a.stop()
    assert await counted(shared_redis, prefix, "alice") == []
    assert not await shared_redis.exists(f"{prefix}:nodeuconn:{_node_id(a)}")


def _node_id(node: Node) -> str:
    return node.hub.bus.node_id


# --- roles ---------------------------------------------------------------------------------

ROLES: dict[str, Any] = {
    "max_channels_per_connection": 2,
    "anonymous": {"max_channels_per_connection": 1},
    "roles": {"staff": {"max_channels_per_connection": 4, "max_client_events_per_second": 3}},
}


async def channels_accepted(client: PusherClient, count: int) -> int:
    """Subscribe to ``count`` public channels; how many were accepted before a 403."""
    for index in range(count):
        reply = await client.subscribe(f"room-{index}")
        if reply["event"] != "pusher_internal:subscription_succeeded":
            assert reply["event"] == "pusher:subscription_error", reply
            assert reply["data"]["status"] == 403, reply
            return index
    return count


async def test_a_roles_limits_apply_and_an_anonymous_connections_differ_on_any_node(
    make_cluster: MakeCluster, clients: Any, prefix: str, logs: LogCheck
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app=ROLES)
    for node in (a, b):
        anonymous, plain, staff = await clients(node), await clients(node), await clients(node)
        await signed_in(plain, {"id": "paul"})
        await signed_in(staff, {"id": "sara", "role": "staff"})
        assert await channels_accepted(anonymous, 3) == 1
        assert await channels_accepted(plain, 3) == 2
        assert await channels_accepted(staff, 5) == 4
    # The staff role's client-event rate (3) over the app's (10 by default).
    sender = await clients(a)
    await signed_in(sender, {"id": "sara", "role": "staff"})
    await sender.subscribed("private-room", auth=private_auth(sender, "private-room"))
    for n in range(4):
        await sender.send({"event": "client-n", "channel": "private-room", "data": {"n": n}})
    error = await sender.expect("pusher:error")
    assert error["data"]["code"] == 4301
    logs.assert_clean()


async def test_an_unconfigured_role_gets_the_defaults_and_is_audited_once(
    make_cluster: MakeCluster, clients: Any, prefix: str
) -> None:
    (a,) = await make_cluster(1, prefix=prefix, app=ROLES)
    for user in ("ann", "bob"):
        client = await clients(a)
        await signed_in(client, {"id": user, "role": "admin"})
        assert await channels_accepted(client, 3) == 2  # the signed-in defaults
    assert a.audit is not None
    await until(lambda: len(query_audit(a.settings.audit.path, type="role_unknown")) == 1)
    [row] = query_audit(a.settings.audit.path, type="role_unknown")
    assert (row.app_id, row.user_id, row.metadata["role"]) == (APP_ID, "ann", "admin")


# --- limits by event name -------------------------------------------------------------------

EVENT_LIMITS: dict[str, Any] = {
    "client_event_limits": {
        "client-typing": {"rate": 0.01, "burst": 2},
        "client-cursor-*": {"rate": 0.01, "burst": 3, "per_user": True},
    },
    "rest_event_limits": {"price-*": {"rate": 0.01, "burst": 2}},
}


async def in_room(node: Node, clients: Any, user: str | None = None) -> PusherClient:
    client: PusherClient = await clients(node)
    if user is not None:
        await signed_in(client, {"id": user})
    await client.subscribed("private-room", auth=private_auth(client, "private-room"))
    return client


async def client_event(client: PusherClient, name: str) -> None:
    await client.send({"event": name, "channel": "private-room", "data": {}})


async def test_a_names_bucket_refuses_client_typing_while_client_message_passes(
    make_cluster: MakeCluster, clients: Any, prefix: str, logs: LogCheck
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app=EVENT_LIMITS)
    sender, listener = await in_room(a, clients), await in_room(b, clients)
    await until(lambda: a.hub.bus.healthy and b.hub.bus.healthy)
    for _ in range(3):
        await client_event(sender, "client-typing")
    await client_event(sender, "client-message")
    error = await sender.expect("pusher:error")
    assert error["data"]["code"] == 4301 and "its name" in error["data"]["message"], error
    await sender.barrier()
    received = [await listener.wait_for(channel="private-room") for _ in range(3)]
    assert [m["event"] for m in received] == ["client-typing", "client-typing", "client-message"]
    assert a.metrics.refusals[("client_event_type_rate", APP_ID)] == 1
    logs.assert_clean()


async def test_a_per_user_bucket_holds_across_nodes(
    make_cluster: MakeCluster, clients: Any, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app=EVENT_LIMITS)
    on_a, on_b = await in_room(a, clients, "alice"), await in_room(b, clients, "alice")
    await client_event(on_b, "client-cursor-move")  # B's view of alice's bucket, synced
    await on_b.ping()  # (each also receives the other's events: ping passes over them)
    for _ in range(2):
        await client_event(on_a, "client-cursor-move")
    await on_a.ping()
    assert a.cluster_limits is not None
    # Without sending again, B learns that alice's cursor bucket is empty.
    bucket = b.hub.apps_by_id[APP_ID].user_event_buckets["client-cursor-*"]
    key = f"{APP_ID}\nclient-cursor-*\nalice"
    await until(lambda: bucket.available(key, b.ctx.loop.time()) < 0.5)
    await client_event(on_b, "client-cursor-move")
    assert (await on_b.wait_for("pusher:error"))["data"]["code"] == 4301
    # Per node alone B would still hold 2 of alice's 3: the refusal is the cluster's.
    assert b.metrics.refusals[("client_event_type_rate", APP_ID)] == 1


async def test_rest_event_limits_refuse_one_name_for_the_whole_app(
    make_cluster: MakeCluster, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app=EVENT_LIMITS)
    path = f"/apps/{APP_ID}/events"

    async def trigger(node: Node, name: str) -> Any:
        return await rest(node.port, "POST", path, {"name": name, "channel": "c", "data": "1"})

    assert (await trigger(b, "price-up")).status == 200  # B's view exists (and syncs)
    assert (await trigger(a, "price-down")).status == 200  # the same rule: empty now
    await until(lambda: _rest_view(b) < 0.5)
    over = await trigger(b, "price-up")
    assert over.status == 429 and int(over.headers["retry-after"]) >= 1, over
    assert over.json()["reason"] == "event_rate_limited"
    assert (await trigger(b, "news")).status == 200  # other names pass
    assert b.metrics.refusals[("event_rate_limited", APP_ID)] == 1
    assert a.metrics.refusals[("event_rate_limited", APP_ID)] == 0


async def test_a_batch_over_a_names_limit_delivers_nothing(make_node: Any, connect: Any) -> None:
    node = await make_node(app={"rest_event_limits": {"price-*": {"rate": 0.01, "burst": 2}}})
    listener = await connect(node)
    await listener.subscribed("c")
    batch = [{"name": "news", "channel": "c", "data": "1"}]
    batch += [{"name": "price-up", "channel": "c", "data": "1"}] * 3
    over = await rest(node.port, "POST", f"/apps/{APP_ID}/batch_events", {"batch": batch})
    assert over.status == 429, over
    two = await rest(node.port, "POST", f"/apps/{APP_ID}/batch_events", {"batch": batch[:3]})
    assert two.status == 200  # the refused batch took none of the two tokens
    assert [(await listener.recv())["event"] for _ in range(3)] == ["news", "price-up", "price-up"]
    await listener.barrier()


def _rest_view(node: Node) -> float:
    _, bucket = node.rest.event_limiters[(APP_ID, "price-*")]
    return bucket.available(f"{APP_ID}\nprice-*", time.time())


# --- the per-user error budget ------------------------------------------------------------------

#: Malformed JSON weighs 5 points: four of them spend a budget of 20.
BUDGET: dict[str, Any] = {
    "user_error_budget": {"rate": 0.001, "burst": 20, "cooldown_seconds": 300},
}


async def malformed(client: PusherClient) -> None:
    await client.send("{not json")
    assert (await client.wait_for("pusher:error"))["data"]["code"] == 4300


def budget_synced(node: Node, user_id: str) -> bool:
    _, bucket = node.user_budgets._buckets[APP_ID]
    synced: bool = bucket.synced(f"{APP_ID}\n{user_id}")  # type: ignore[attr-defined]
    return synced


async def budget_left(redis: aioredis.Redis, prefix: str, user_id: str) -> float:
    """The points the cluster's bucket of ``user_id`` holds, as Redis counts them."""
    tokens = await redis.hget(f"{prefix}:rl:user_errors:{APP_ID}\n{user_id}", "t")
    return 20.0 if tokens is None else float(tokens)


async def test_a_user_past_the_error_budget_is_terminated_on_both_nodes(
    make_cluster: MakeCluster,
    clients: Any,
    shared_redis: aioredis.Redis,
    prefix: str,
    logs: LogCheck,
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app=BUDGET)
    on_a, on_b = await clients(a), await clients(b)
    for client in (on_a, on_b):
        await signed_in(client, {"id": "mallory"})
    bystander = await clients(b)  # same address, not signed in as mallory
    await signed_in(bystander, {"id": "bob"})
    for _ in range(3):  # 15 of 20 points, on A
        await malformed(on_a)

    async def a_reported_all() -> bool:
        return await budget_left(shared_redis, prefix, "mallory") <= 5.5

    await until(a_reported_all)
    await malformed(on_b)  # the last 5, on B: B learns the cluster's bucket is empty
    await until(lambda: budget_synced(b, "mallory"))
    await on_b.send("{still not json")  # finds nothing left: suspended everywhere
    for client in (on_a, on_b):
        closed = await client.closed()
        assert closed.code == 4009, closed
    assert b.metrics.users_suspended[APP_ID] == 1 and a.metrics.users_suspended[APP_ID] == 0
    assert a.metrics.refusals[("user_suspended", APP_ID)] == 1
    # Per node alone neither would have spent its 20: the budget is the cluster's.
    retry = await clients(a)
    await signin(retry, {"id": "mallory"})
    assert (await retry.closed()).code == 4009
    assert a.metrics.refusals[("signin_suspended", APP_ID)] == 1
    # Not an address block: the same address still connects, bob is untouched.
    await bystander.barrier()
    other = await clients(a)
    await signed_in(other, {"id": "carol"})
    await until(lambda: len(query_audit(b.settings.audit.path, type="user_suspended")) >= 1)
    rows = [
        row
        for row in query_audit(b.settings.audit.path, type="user_suspended")
        if row.socket_id is None
    ]
    assert [(row.user_id, row.severity) for row in rows] == [("mallory", "warning")]
    logs.assert_clean()
