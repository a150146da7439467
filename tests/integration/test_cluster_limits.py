"""Cluster-wide rate limits and blocks over a real Redis (issue #5: #3's state shared).

Two in-process nodes share one Redis under a key prefix no other test uses. Waits
are on observable state (a node's view of a bucket, the limits' health), polled
and bounded by :func:`timeouts.within`; outage tests run a private
``redis-server`` (:mod:`support.redis_server`) they can kill and restart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    OTHER_APP_ID,
    OTHER_APP_KEY,
    OTHER_APP_SECRET,
    PusherClient,
    rest,
    served,
)
from support.redis_server import RedisServer
from support.timeouts import until

from bastion.config import settings_from_mapping
from bastion.security.limits import RateLimiter
from bastion.security.reputation import Block
from bastion.server.runtime import Node
from bastion.store.redis_blocks import RedisBlockStore

from .conftest import SHARED_REDIS, TEST_SECURITY, LogCheck, RunNode
from .test_redis_cluster import _equals, numsub, private_auth, topic

CHANNEL = "private-room"


async def start_cluster(
    run_node: RunNode,
    state: Path,
    count: int,
    *,
    prefix: str,
    app: dict[str, Any],
    url: str = SHARED_REDIS,
    reputation: dict[str, Any] | None = None,
    **adapter: Any,
) -> list[Node]:
    """``count`` nodes on the redis adapter whose main app carries ``app``."""
    nodes = []
    for index in range(count):
        directory = state / f"node-{index}"
        directory.mkdir()
        document: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": 0},
            "adapter": {"driver": "redis", "url": url, "prefix": prefix, **adapter},
            "audit": {"path": str(directory / "audit.sqlite3")},
            "security": {
                **TEST_SECURITY,
                "reputation": {
                    "store_path": str(directory / "blocks.sqlite3"),
                    **(reputation or {}),
                },
            },
            "apps": [
                {
                    "id": APP_ID,
                    "key": APP_KEY,
                    "secret": APP_SECRET,
                    "enable_client_messages": True,
                    **app,
                },
                {"id": OTHER_APP_ID, "key": OTHER_APP_KEY, "secret": OTHER_APP_SECRET},
            ],
        }
        nodes.append(await run_node(settings_from_mapping(document, environ={})))
    return nodes


def client_event_view(node: Node) -> float:
    """Tokens ``node`` believes the app's client event bucket holds now."""
    bucket: RateLimiter | None = node.hub.apps_by_id[APP_ID].client_event_bucket
    assert bucket is not None
    return bucket.available(APP_ID, node.ctx.loop.time())


def rest_view(node: Node) -> float:
    """Tokens ``node`` believes the app's REST bucket holds now."""
    return node.rest.app_limiters[APP_ID][1].available(APP_ID, time.time())


async def joined(node: Node, clients: Any) -> PusherClient:
    client: PusherClient = await clients(node)
    await client.subscribed(CHANNEL, auth=private_auth(client, CHANNEL))
    return client


async def send(client: PusherClient, n: int) -> None:
    await client.send({"event": "client-n", "channel": CHANNEL, "data": {"n": n}})


async def received(client: PusherClient, n: int) -> None:
    assert (await client.expect("client-n", CHANNEL))["data"] == {"n": n}


async def refused(client: PusherClient) -> None:
    error = await client.expect("pusher:error")
    assert error["data"]["code"] == 4301, error


async def test_the_client_event_budget_of_an_app_is_shared_across_nodes(
    run_node: RunNode, tmp_path: Path, clients: Any, prefix: str, logs: LogCheck
) -> None:
    # 4 events at once for the whole app, one more a second; 10/s per connection.
    a, b = await start_cluster(
        run_node, tmp_path, 2, prefix=prefix, app={"client_events_per_app": {"rate": 1, "burst": 4}}
    )
    assert a.cluster_limits is not None and b.cluster_limits is not None
    on_a, on_b = await joined(a, clients), await joined(b, clients)
    await send(on_b, 0)  # B's view of the bucket exists (and is synced) from now on
    await received(on_a, 0)
    for n in (1, 2, 3):  # A spends the rest of the app's budget
        await send(on_a, n)
    for n in (1, 2, 3):  # all accepted, and relayed to B
        await received(on_b, n)
    await on_a.barrier()
    # Without a single event of its own since, B learns that the bucket is empty.
    await until(lambda: client_event_view(b) < 0.5)
    await send(on_b, 4)
    await refused(on_b)
    assert b.metrics.refusals[("client_event_app_rate", APP_ID)] == 1
    # Per node alone B would have had 3 left: the refusal is the cluster's.
    assert a.metrics.refusals[("client_event_app_rate", APP_ID)] == 0
    # The budget refills (1/s) for the whole cluster.
    await until(lambda: client_event_view(b) >= 1)
    await send(on_b, 5)
    await received(on_a, 5)
    await on_b.barrier()
    assert b.metrics.refusals[("client_event_app_rate", APP_ID)] == 1
    assert a.cluster_limits.healthy and b.cluster_limits.healthy
    logs.assert_clean()


async def test_the_rest_budget_of_an_app_is_shared_across_nodes(
    run_node: RunNode, tmp_path: Path, prefix: str, logs: LogCheck
) -> None:
    a, b = await start_cluster(
        run_node, tmp_path, 2, prefix=prefix, app={"rest_requests": {"rate": 0.5, "burst": 3}}
    )
    path = f"/apps/{APP_ID}/events"
    body = {"name": "e", "channel": "news", "data": "1"}
    assert (await rest(b.port, "POST", path, body)).status == 200
    for _ in range(2):
        assert (await rest(a.port, "POST", path, body)).status == 200
    await until(lambda: rest_view(b) < 0.5)
    over = await rest(b.port, "POST", path, body)
    assert over.status == 429, over
    assert over.headers["retry-after"] in {"1", "2"}
    assert b.metrics.refusals[("app_rate_limited", APP_ID)] == 1
    assert a.metrics.refusals[("app_rate_limited", APP_ID)] == 0
    logs.assert_clean()


async def test_without_redis_each_node_still_limits_on_its_own(
    run_node: RunNode, tmp_path: Path, clients: Any, prefix: str, logs: LogCheck
) -> None:
    with RedisServer() as server:
        a, b = await start_cluster(
            run_node,
            tmp_path,
            2,
            prefix=prefix,
            url=server.url,
            app={"client_events_per_app": {"rate": 0.001, "burst": 2}},
            reconnect_max_seconds=0.2,
        )
        assert a.cluster_limits is not None and b.cluster_limits is not None
        await until(lambda: a.cluster_limits.healthy and b.cluster_limits.healthy)
        on_a, on_b = await joined(a, clients), await joined(b, clients)
        # The bus settled first (it is not under test here).
        private = aioredis.from_url(server.url)
        try:
            await until(lambda: _equals(numsub(private, topic(prefix, CHANNEL)), 2))
        finally:
            await private.aclose()
        server.kill()
        await until(lambda: not a.cluster_limits.healthy and not b.cluster_limits.healthy)
        for client in (on_a, on_b):  # each node: its own burst, then refusals
            await send(client, 1)
            await send(client, 2)
            await send(client, 3)
            await refused(client)
            await client.barrier()
        assert a.cluster_limits.failures >= 1
        # Back: the limits sync again (and the bus reconnects) without a restart.
        server.start()
        await until(lambda: a.cluster_limits.healthy and b.cluster_limits.healthy, 15)
        syncs = a.cluster_limits.syncs
        await until(lambda: a.cluster_limits.syncs > syncs)
        # Settled before the stop (the bus's own reconnection is not under test here).
        await until(lambda: a.hub.bus.healthy and b.hub.bus.healthy, 15)
        for node in (a, b):
            await node.stop()
    logs.assert_clean()
    warnings = [r.getMessage() for r in logs.caplog.records if r.name == "bastion.limits"]
    assert any("limiting per node" in text for text in warnings)
    assert not any("@" in text for text in warnings)  # never a URL's credentials


# --- cluster-wide blocks ---------------------------------------------------------------

#: Loopback blockable (every test client is 127.0.0.1), and a quick sync.
BLOCKABLE = {"never_block": [], "sync_seconds": 0.05}


def blocked_on(node: Node, ip: str = "127.0.0.1") -> bool:
    assert node.blocklist is not None
    return node.blocklist.blocks.get(ip, time.time()) is not None


async def test_a_manual_block_on_one_node_refuses_connections_on_another(
    run_node: RunNode, tmp_path: Path, prefix: str, logs: LogCheck
) -> None:
    a, b = await start_cluster(run_node, tmp_path, 2, prefix=prefix, app={}, reputation=BLOCKABLE)
    assert a.blocklist is not None and b.blocklist is not None
    assert await served(b.port)
    # What the admin API calls (POST /admin/blocks) on node A.
    a.blocklist.block_manual("127.0.0.1", 60, "test")
    await until(lambda: blocked_on(b))
    assert not await served(b.port)  # dropped at accept, no HTTP answer
    assert b.metrics.refusals[("ip_blocked", "")] >= 1
    a.blocklist.unblock_manual("127.0.0.1")
    await until(lambda: not blocked_on(b))
    assert await served(b.port)
    logs.assert_clean()


async def test_a_reputation_block_on_one_node_reaches_every_node(
    run_node: RunNode, tmp_path: Path, prefix: str
) -> None:
    a, b = await start_cluster(
        run_node, tmp_path, 2, prefix=prefix, app={}, reputation={**BLOCKABLE, "threshold": 30}
    )
    path = f"/apps/{APP_ID}/events"
    body = {"name": "e", "channel": "news", "data": "1"}
    for _ in range(3):  # three bad signatures of 10 points each, on A only
        assert (await rest(a.port, "POST", path, body, secret="not-the-secret")).status == 401
    await until(lambda: blocked_on(b))
    assert b.blocklist is not None
    [block] = b.blocklist.active_blocks()
    assert (block.ip, block.source) == ("127.0.0.1", "auto")
    assert not await served(b.port)


async def test_the_redis_block_store_keeps_the_file_rules(
    shared_redis: aioredis.Redis, prefix: str
) -> None:
    store = RedisBlockStore(SHARED_REDIS, prefix)
    try:
        now = time.time()
        assert store.last_change_id() == 0 and store.changes(0) == []
        manual = Block("10.0.0.1", now + 100, "operator", "manual", now)
        assert store.block(manual, now=now)
        # An automatic block never shortens one in force; a longer one replaces it.
        assert not store.block(Block("10.0.0.1", now + 50, "score", "auto", now), now=now)
        longer = Block("10.0.0.1", now + 200, "score", "auto", now)
        assert store.block(longer, now=now)
        assert store.get("10.0.0.1", now=now) == longer
        first = store.last_change_id()
        assert [c.block for c in store.changes(0)] == [longer]  # latest state, once
        assert store.unblock("10.0.0.1", now=now) == longer
        assert store.unblock("10.0.0.1", now=now) is None  # nothing written
        [change] = store.changes(first)
        assert (change.ip, change.block) == ("10.0.0.1", None)
        assert store.active(now=now) == []
        assert store.block(Block("10.0.0.2", now + 10, "x", "manual", now), now=now)
        assert [block.ip for block in store.active(now=now)] == ["10.0.0.2"]
        assert store.active(now=now + 11) == []
        # Change numbers keep growing even if Redis loses the counter.
        await shared_redis.delete(f"{prefix}:blocks:seq")
        before = store.last_change_id()
        assert store.block(Block("10.0.0.3", now + 10, "x", "manual", now), now=now)
        assert store.last_change_id() > first and before == 0
        assert [c.ip for c in store.changes(first)][-1] == "10.0.0.3"
        # Pruned: the unblocked row and the expired ones, a day later.
        assert store.prune(now=now + 86_400 + 20) == 3
        assert await shared_redis.hlen(f"{prefix}:blocks") == 0
    finally:
        store.close()
        await shared_redis.delete(
            f"{prefix}:blocks", f"{prefix}:blocks:changes", f"{prefix}:blocks:seq"
        )


async def test_redis_down_at_start_does_not_fail_start_up_and_blocks_sync_later(
    run_node: RunNode, tmp_path: Path, prefix: str, logs: LogCheck
) -> None:
    server = RedisServer()  # a free port, nothing listening yet
    try:
        (a,) = await start_cluster(
            run_node,
            tmp_path,
            1,
            prefix=prefix,
            url=server.url,
            app={},
            reputation=BLOCKABLE,
            reconnect_max_seconds=0.2,
        )
        assert a.cluster_limits is not None and not a.cluster_limits.healthy
        assert await served(a.port)
        server.start()
        writer = RedisBlockStore(server.url, prefix)  # e.g. another node
        try:
            now = time.time()
            writer.block(Block("127.0.0.1", now + 60, "elsewhere", "manual", now), now=now)
        finally:
            writer.close()
        await until(lambda: blocked_on(a), 15)
        assert not await served(a.port)
        await until(lambda: a.cluster_limits is not None and a.cluster_limits.healthy, 15)
        await until(lambda: a.hub.bus.healthy, 15)
        await a.stop()
    finally:
        server.stop()
    logs.assert_clean()
    warnings = [r.getMessage() for r in logs.caplog.records if r.name == "bastion.blocks"]
    assert any("blocks not loaded at start" in text for text in warnings)
    assert not any("@" in text for text in warnings)
