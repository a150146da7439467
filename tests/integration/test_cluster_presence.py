"""Cluster-wide presence, counts, queries, sign-ins and cache over a real Redis (#5).

Each test has its own key ``prefix``. Clients are read by a :class:`Watcher` that
keeps a presence view the way pusher-js does (the member list of
``subscription_succeeded``, then ``member_added`` / ``member_removed`` applied
idempotently), so assertions are about what a browser would show.
"Nothing else arrived" is checked with a marker event published after the change
by the same node: a node's bus messages on one topic keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    PusherClient,
    data_of,
    hmac_hex,
    open_client,
    rest,
)
from support.redis_server import RedisServer
from support.server import BastionProcess
from support.timeouts import until

from bastion.core import events as ev
from bastion.server.runtime import Node

from .conftest import MakeCluster, cluster_server_toml
from .test_redis_cluster import private_auth, trigger

Clients = Callable[[Node], Awaitable[PusherClient]]
HEARTBEAT = 0.2
ROOM = "presence-room"


class Watcher:
    """Reads every frame of one client in the background; keeps its presence view."""

    def __init__(self, client: PusherClient, *read: dict[str, Any]) -> None:
        self.client = client
        self.frames: list[dict[str, Any]] = []
        self.members: dict[str, dict[str, Any]] = {}
        self.closed: int | None = None
        for frame in read:  # frames the test read itself before watching
            self.frames.append(frame)
            self._apply(frame)
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in self.client.ws:
                frame = json.loads(raw)
                self.frames.append(frame)
                self._apply(frame)
        except ConnectionClosed:
            pass
        self.closed = self.client.ws.close_code

    def _apply(self, frame: dict[str, Any]) -> None:
        channel, event = frame.get("channel"), frame.get("event")
        if channel is None:
            return
        view = self.members.setdefault(channel, {})
        data = data_of(frame)
        if event == "pusher_internal:subscription_succeeded" and "presence" in data:
            view.clear()
            view.update(data["presence"]["hash"])
        elif event == "pusher_internal:member_added":
            view[data["user_id"]] = data["user_info"]
        elif event == "pusher_internal:member_removed":
            view.pop(data["user_id"], None)

    def of(self, event: str, channel: str | None = None) -> list[dict[str, Any]]:
        return [
            frame
            for frame in self.frames
            if frame.get("event") == event and (channel is None or frame.get("channel") == channel)
        ]

    async def sees(self, channel: str, users: set[str]) -> None:
        await until(lambda: set(self.members.get(channel, {})) == users)

    async def got(self, event: str, channel: str | None = None, count: int = 1) -> None:
        await until(lambda: len(self.of(event, channel)) >= count)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Recorder:
    """The member / occupancy hub events of every node (what webhooks are made of)."""

    def __init__(self, nodes: list[Node]) -> None:
        self.events: list[tuple[int, ev.HubEvent]] = []
        for index, node in enumerate(nodes):
            node.hub.listeners.append(lambda event, index=index: self.events.append((index, event)))

    def of(self, kind: type[Any], user_id: str) -> list[int]:
        return [
            index
            for index, event in self.events
            if isinstance(event, kind) and getattr(event, "user_id", None) == user_id
        ]


@pytest.fixture
async def cluster(make_cluster: MakeCluster, prefix: str) -> AsyncIterator[list[Node]]:
    yield await make_cluster(3, prefix=prefix, heartbeat_seconds=HEARTBEAT)


@pytest.fixture
async def watchers() -> AsyncIterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for watcher in made:
        await watcher.stop()


async def join(
    clients: Clients, node: Node, user: str, watchers: list[Watcher], channel: str = ROOM
) -> Watcher:
    """A client on ``node`` present in ``channel`` as ``user``, read by a watcher."""
    client = await clients(node)
    data = json.dumps({"user_id": user, "user_info": {"name": user.title()}})
    reply = await client.subscribed(
        channel, auth=private_auth(client, channel, data), channel_data=data
    )
    watcher = Watcher(client, reply)
    watchers.append(watcher)
    return watcher


async def node_count(redis: aioredis.Redis, prefix: str, user: str) -> int:
    """On how many nodes ``user`` is present in the room, as Redis records it."""
    value = await redis.hget(f"{prefix}:pn:{APP_ID}:{ROOM}", user)
    return int(value) if value is not None else 0


async def test_presence_members_are_the_whole_clusters(
    cluster: list[Node], clients: Clients, watchers: list[Watcher], shared_redis: aioredis.Redis
) -> None:
    a, b, c = cluster
    recorder = Recorder(cluster)
    alice = await join(clients, a, "alice", watchers)
    await until(lambda: node_count(shared_redis, cluster_prefix(a), "alice"))
    bob = await join(clients, b, "bob", watchers)
    carol = await join(clients, c, "carol", watchers)
    everyone = {"alice", "bob", "carol"}
    for watcher in (alice, bob, carol):
        await watcher.sees(ROOM, everyone)
    # Alice was recorded before bob joined: his member list names her, with her info.
    first = data_of(bob.of("pusher_internal:subscription_succeeded")[0])["presence"]
    assert first["hash"]["alice"] == {"name": "Alice"}
    assert alice.members[ROOM]["carol"] == {"name": "Carol"}
    # One member_added per user for the whole cluster (one webhook each).
    for user in everyone:
        assert len(recorder.of(ev.MemberAdded, user)) == 1, user
    # Nobody is told about themselves.
    assert not [f for f in alice.of("pusher_internal:member_added") if "alice" in f["data"]]
    await bob.client.close()
    for watcher in (alice, carol):
        await watcher.sees(ROOM, {"alice", "carol"})
    await until(lambda: len(recorder.of(ev.MemberRemoved, "bob")) == 1)


def cluster_prefix(node: Node) -> str:
    return node.settings.adapter.prefix


async def test_one_user_on_two_nodes_is_one_member(
    cluster: list[Node], clients: Clients, watchers: list[Watcher], shared_redis: aioredis.Redis
) -> None:
    a, b, c = cluster
    prefix = cluster_prefix(a)
    recorder = Recorder(cluster)
    observer = await join(clients, c, "carol", watchers)
    tab1 = await join(clients, a, "alice", watchers)
    tab2 = await join(clients, b, "alice", watchers)
    await until(lambda: _is(node_count(shared_redis, prefix, "alice"), 2))
    await observer.sees(ROOM, {"alice", "carol"})
    # The first tab leaves: alice is still present through the other node.
    await tab1.client.send({"event": "pusher:unsubscribe", "data": {"channel": ROOM}})
    await until(lambda: _is(node_count(shared_redis, prefix, "alice"), 1))
    await trigger(a, ROOM, "marker", "1")  # after any member_removed node A would send
    await observer.got("marker", ROOM)
    assert observer.of("pusher_internal:member_removed") == []
    assert len(observer.of("pusher_internal:member_added", ROOM)) == 1
    await tab2.client.close()
    await observer.sees(ROOM, {"carol"})
    await until(lambda: len(recorder.of(ev.MemberRemoved, "alice")) == 1)
    assert len(observer.of("pusher_internal:member_removed", ROOM)) == 1
    assert len(recorder.of(ev.MemberAdded, "alice")) == 1


async def test_rest_counts_and_queries_are_cluster_wide(
    cluster: list[Node], clients: Clients, watchers: list[Watcher]
) -> None:
    a, b, c = cluster
    for node in (a, a, b):
        client = await clients(node)
        await client.subscribed("news")
    await join(clients, a, "alice", watchers)
    await join(clients, b, "bob", watchers)
    await join(clients, b, "bob", watchers)  # a second connection of the same user

    async def get(path: str, **params: str) -> Any:
        result = await rest(c.port, "GET", f"/apps/{APP_ID}{path}", params=params.items())
        assert result.status == 200, result
        return result.json()

    async def counted() -> bool:
        body = await get("/channels", info="subscription_count")
        return bool(
            body["channels"].get("news") == {"subscription_count": 3}
            and body["channels"].get(ROOM) == {"subscription_count": 3}
        )

    await until(counted)  # node C has no subscriber at all: this is Redis answering
    presence = await get("/channels", filter_by_prefix="presence-", info="user_count")
    assert presence == {"channels": {ROOM: {"user_count": 2}}}
    news = await get("/channels/news", info="subscription_count")
    assert news == {"occupied": True, "subscription_count": 3}
    room = await get(f"/channels/{ROOM}", info="user_count,subscription_count")
    assert room == {"occupied": True, "user_count": 2, "subscription_count": 3}
    users = await get(f"/channels/{ROOM}/users")
    assert sorted(user["id"] for user in users["users"]) == ["alice", "bob"]
    assert await get("/channels/nobody-here") == {"occupied": False}
    # A trigger asking for info gets the cluster's counts too.
    body = {"name": "e", "channel": "news", "data": "{}", "info": "subscription_count"}
    result = await rest(c.port, "POST", f"/apps/{APP_ID}/events", body)
    assert result.json() == {"channels": {"news": {"subscription_count": 3}}}


async def test_a_sigkilled_servers_members_are_removed_once(
    make_cluster: MakeCluster,
    make_bastion: Callable[..., BastionProcess],
    tmp_path: Path,
    clients: Clients,
    watchers: list[Watcher],
    shared_redis: aioredis.Redis,
    prefix: str,
) -> None:
    survivors = await make_cluster(2, prefix=prefix, heartbeat_seconds=HEARTBEAT)
    recorder = Recorder(survivors)
    text = cluster_server_toml(prefix, tmp_path, HEARTBEAT)
    server = await asyncio.to_thread(make_bastion, text)
    doomed = await open_client(server.port)
    try:
        data = json.dumps({"user_id": "dora"})
        auth = private_auth(doomed, ROOM, data)
        await doomed.subscribed(ROOM, auth=auth, channel_data=data)
        observer = await join(clients, survivors[0], "olga", watchers)
        other = await join(clients, survivors[1], "oscar", watchers)
        await observer.sees(ROOM, {"dora", "olga", "oscar"})
        server.process.kill()
        await asyncio.to_thread(server.process.wait)
        # A survivor reaps the dead node: its member goes, once, for everyone.
        await observer.sees(ROOM, {"olga", "oscar"})
        await other.sees(ROOM, {"olga", "oscar"})
        await until(lambda: len(recorder.of(ev.MemberRemoved, "dora")) == 1)
        await trigger(survivors[0], ROOM, "marker", "1")
        await trigger(survivors[1], ROOM, "marker", "2")
        await observer.got("marker", ROOM, 2)
        assert len(recorder.of(ev.MemberRemoved, "dora")) == 1
        assert len(observer.of("pusher_internal:member_removed", ROOM)) == 1
        assert await shared_redis.hkeys(f"{prefix}:pu:{APP_ID}:{ROOM}") in (
            [b"olga", b"oscar"],
            [b"oscar", b"olga"],
        )
    finally:
        with contextlib.suppress(Exception):
            await doomed.ws.close()


def signin_frame(client: PusherClient, user: dict[str, Any]) -> dict[str, Any]:
    user_data = json.dumps(user)
    auth = f"{APP_KEY}:{hmac_hex(APP_SECRET, f'{client.socket_id}::user::{user_data}')}"
    return {"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}


async def test_terminate_connections_reaches_every_node(
    cluster: list[Node], clients: Clients
) -> None:
    a, b, _ = cluster
    user = await clients(b)
    await user.send(signin_frame(user, {"id": "mallory"}))
    await user.expect("pusher:signin_success")
    result = await rest(a.port, "POST", f"/apps/{APP_ID}/users/mallory/terminate_connections", {})
    assert result.status == 200, result
    closed = await user.closed()
    assert closed.code == 4009


async def test_watchlists_see_users_on_other_nodes(
    cluster: list[Node], clients: Clients, watchers: list[Watcher]
) -> None:
    a, b, c = cluster
    early = await clients(c)
    await early.send(signin_frame(early, {"id": "erin"}))
    await early.expect("pusher:signin_success")
    watching = await clients(a)
    await watching.send(signin_frame(watching, {"id": "walt", "watchlist": ["dave", "erin"]}))
    await watching.expect("pusher:signin_success")
    watcher = Watcher(watching)
    watchers.append(watcher)

    def statuses() -> list[tuple[str, list[str]]]:
        found = []
        for frame in watcher.of("pusher_internal:watchlist_events"):
            for item in data_of(frame)["events"]:
                found.append((item["name"], item["user_ids"]))
        return found

    def last(user: str) -> str | None:
        said = [name for name, ids in statuses() if user in ids]
        return said[-1] if said else None

    # erin is signed in on node C: after the first report (and any change that
    # raced it, which follows the report), she is online and dave offline.
    await until(lambda: last("dave") == "offline")
    await until(lambda: last("erin") == "online")
    dave = await clients(b)
    await dave.send(signin_frame(dave, {"id": "dave"}))
    await dave.expect("pusher:signin_success")
    await until(lambda: last("dave") == "online")
    await dave.close()
    await until(lambda: last("dave") == "offline")
    assert last("erin") == "online"


async def test_a_cache_channels_last_event_is_known_on_every_node(
    cluster: list[Node], clients: Clients
) -> None:
    a, b, c = cluster
    await trigger(a, "cache-scores", "update", '{"home":2}')  # nobody subscribed anywhere
    client = await clients(b)
    await client.subscribed("cache-scores")
    event = await client.expect("update", "cache-scores")
    assert event["data"] == '{"home":2}'
    result = await rest(
        c.port, "GET", f"/apps/{APP_ID}/channels/cache-scores", params=[("info", "cache")]
    )
    cache = result.json()["cache"]
    assert cache["event"] == "update" and cache["data"] == '{"home":2}' and cache["ttl"] > 0
    miss = await clients(c)
    await miss.subscribed("cache-empty")
    await miss.expect("pusher:cache_miss", "cache-empty")


async def test_queries_answer_503_while_redis_is_down_and_local_traffic_goes_on(
    make_cluster: MakeCluster, clients: Clients, prefix: str
) -> None:
    with RedisServer() as server:
        (node,) = await make_cluster(
            1, url=server.url, prefix=prefix, heartbeat_seconds=0.2, reconnect_max_seconds=0.2
        )
        client = await clients(node)
        await client.subscribed("news")
        ok = await rest(node.port, "GET", f"/apps/{APP_ID}/channels")
        assert ok.status == 200 and ok.json() == {"channels": {"news": {}}}
        server.stop()
        await until(lambda: not node.hub.bus.healthy)
        down = await rest(node.port, "GET", f"/apps/{APP_ID}/channels")
        assert down.status == 503
        assert down.json()["reason"] == "cluster_unavailable"
        assert node.ctx.metrics.refusals[("cluster_unavailable", APP_ID)] == 1
        await trigger(node, "news", "still", "1")  # publishing is local and goes on
        await client.expect("still", "news")
        server.start()
        await until(lambda: node.hub.bus.healthy, 15)
        again = await rest(node.port, "GET", f"/apps/{APP_ID}/channels")
        assert again.status == 200 and again.json() == {"channels": {"news": {}}}


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


async def test_a_signed_request_replayed_to_another_node_is_refused(
    cluster: list[Node], clients: Clients, shared_redis: aioredis.Redis
) -> None:
    a, b, _ = cluster
    prefix = cluster_prefix(a)
    listener = await clients(b)
    await listener.subscribed("orders")
    body = {"name": "paid", "channel": "orders", "data": "{}"}
    stamp = float(int(time.time()))
    first = await rest(a.port, "POST", f"/apps/{APP_ID}/events", body, timestamp=stamp)
    assert first.status == 200, first
    await listener.expect("paid", "orders")
    (key,) = [k async for k in shared_redis.scan_iter(match=f"{prefix}:replay:{APP_ID}:*")]
    # Make the first acceptance older than the SDKs' same-second repeat grace.
    ttl = await shared_redis.pttl(key)
    first_seen = int(await shared_redis.get(key))
    await shared_redis.set(key, first_seen - 10_000, px=ttl)
    again = await rest(b.port, "POST", f"/apps/{APP_ID}/events", body, timestamp=stamp)
    assert again.status == 401 and again.json()["reason"] == "replayed_request"
    assert b.ctx.metrics.refusals[("replayed_request", APP_ID)] == 1
    await listener.barrier()  # the replay was not delivered


async def test_subscription_count_events_carry_the_clusters_count(
    make_cluster: MakeCluster, clients: Clients, watchers: list[Watcher], prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app={"enable_subscription_count": True})
    recorder = Recorder([a, b])
    first = await clients(a)
    await first.subscribed("scores")
    watcher = Watcher(first)
    watchers.append(watcher)

    def counts() -> list[int]:
        return [
            data_of(frame)["subscription_count"]
            for frame in watcher.of("pusher_internal:subscription_count", "scores")
        ]

    await until(lambda: counts()[-1:] == [1])
    second = await clients(b)
    await second.subscribed("scores")
    await until(lambda: counts()[-1:] == [2])  # a subscriber on the other node counts
    third = await clients(b)
    await third.subscribed("scores")
    await until(lambda: counts()[-1:] == [3])
    await third.close()
    await second.close()  # node B leaves the channel: node A's subscriber hears of it
    await until(lambda: counts()[-1:] == [1])
    totals = [
        event.subscription_count
        for _, event in recorder.events
        if isinstance(event, ev.SubscriptionCountChanged) and event.channel == "scores"
    ]
    assert totals[:3] == [1, 2, 3] and totals[-1] == 1  # one webhook event per change


async def test_without_the_shared_replay_guard_each_node_guards_alone(
    make_cluster: MakeCluster, clients: Clients, shared_redis: aioredis.Redis, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix, shared_replay_guard=False)
    listener = await clients(b)
    await listener.subscribed("orders")
    body = {"name": "paid", "channel": "orders", "data": "{}"}
    stamp = float(int(time.time()))
    first = await rest(a.port, "POST", f"/apps/{APP_ID}/events", body, timestamp=stamp)
    assert first.status == 200, first
    await listener.expect("paid", "orders")
    assert [k async for k in shared_redis.scan_iter(match=f"{prefix}:replay:*")] == []
    # Node B never saw it: accepted there, the documented price of turning it off.
    other = await rest(b.port, "POST", f"/apps/{APP_ID}/events", body, timestamp=stamp)
    assert other.status == 200, other
    await listener.expect("paid", "orders")


async def test_subscribing_again_answers_with_the_clusters_members(
    cluster: list[Node], clients: Clients, watchers: list[Watcher]
) -> None:
    a, b, _ = cluster
    bob = await join(clients, b, "bob", watchers)
    alice = await join(clients, a, "alice", watchers)
    for watcher in (alice, bob):
        await watcher.sees(ROOM, {"alice", "bob"})  # both are recorded in Redis by now
    data = json.dumps({"user_id": "alice", "user_info": {"name": "Alice"}})
    auth = private_auth(alice.client, ROOM, data)
    subscribe = {"channel": ROOM, "auth": auth, "channel_data": data}
    await alice.client.send({"event": "pusher:subscribe", "data": subscribe})
    await alice.got("pusher_internal:subscription_succeeded", ROOM, 2)
    again = alice.of("pusher_internal:subscription_succeeded", ROOM)[-1]
    assert sorted(data_of(again)["presence"]["ids"]) == ["alice", "bob"]
