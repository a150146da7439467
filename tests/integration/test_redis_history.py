"""Channel history across in-process nodes over a real Redis (issue #16, step 5).

Each test has its own key ``prefix`` on the shared Redis at 127.0.0.1:6379; the
outage test runs a private ``redis-server`` it stops and starts again. A client
that reconnects to *another* node recovers what it missed; Redis unreachable is
``recovered: false``, never a wrong replay; a forged entry is refused.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from support.clients import APP_ID, PusherClient, rest
from support.redis_server import RedisServer
from support.timeouts import until

from bastion.server.runtime import Node

from .conftest import MakeCluster

HISTORY = {"history": {"channel_prefixes": ["chat-"], "max_events": 20}}


async def trigger(node: Node, channel: str, data: str) -> None:
    body = {"name": "message", "channel": channel, "data": data}
    result = await rest(node.port, "POST", f"/apps/{APP_ID}/events", body)
    assert result.status == 200, result


async def resume(client: PusherClient, channel: str, resume: Any) -> dict[str, Any]:
    """Subscribe with ``bastion_resume``; the frames up to the recovery answer's data."""
    await client.send(
        {"event": "pusher:subscribe", "data": {"channel": channel, "bastion_resume": resume}}
    )
    await client.wait_for("pusher_internal:subscription_succeeded", channel)
    answer = await client.wait_for("bastion:recovery", channel)
    data: dict[str, Any] = json.loads(answer["data"])
    return data


async def messages(client: PusherClient, channel: str, count: int) -> list[dict[str, Any]]:
    return [await client.wait_for("message", channel) for _ in range(count)]


async def test_a_client_reconnecting_to_another_node_recovers_in_order(
    make_cluster: MakeCluster, clients: Any, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app=HISTORY)
    first = await clients(a)
    start = await resume(first, "chat-1", {})
    assert start["recovered"] is True and start["position"].endswith(":0")
    await trigger(b, "chat-1", "one")
    seen = (await messages(first, "chat-1", 1))[0]
    assert seen["bastion_position"] == start["position"].replace(":0", ":1")
    await first.close()
    for index, node in enumerate((a, b, a, b)):
        await trigger(node, "chat-1", f"missed-{index}")
    again = await clients(b)
    await again.send(
        {
            "event": "pusher:subscribe",
            "data": {
                "channel": "chat-1",
                "bastion_resume": {"position": seen["bastion_position"]},
            },
        }
    )
    await again.wait_for("pusher_internal:subscription_succeeded", "chat-1")
    replay = await messages(again, "chat-1", 4)
    # In publishing order, whichever node took each trigger.
    assert [m["data"] for m in replay] == [f"missed-{i}" for i in range(4)]
    epoch = start["position"].split(":")[0]
    assert [m["bastion_position"] for m in replay] == [f"{epoch}:{n}" for n in (2, 3, 4, 5)]
    answer = json.loads((await again.wait_for("bastion:recovery", "chat-1"))["data"])
    assert answer == {"recovered": True, "replayed": 4, "position": f"{epoch}:5"}
    await trigger(a, "chat-1", "live")
    assert (await again.wait_for("message", "chat-1"))["data"] == "live"
    await again.barrier()


async def test_every_node_delivers_in_position_order(
    make_cluster: MakeCluster, clients: Any, prefix: str
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app=HISTORY)
    on_a, on_b = await clients(a), await clients(b)
    await resume(on_a, "chat-2", {})
    await resume(on_b, "chat-2", {})
    for index in range(10):
        await trigger((a, b)[index % 2], "chat-2", str(index))
    for client in (on_a, on_b):
        got = await messages(client, "chat-2", 10)
        offsets = [int(m["bastion_position"].split(":")[1]) for m in got]
        assert offsets == list(range(1, 11))
        assert [m["data"] for m in got] == [str(i) for i in range(10)]
        await client.barrier()  # each once: the publishing node's own included


async def test_backfill_on_another_node(make_cluster: MakeCluster, prefix: str) -> None:
    a, b = await make_cluster(2, prefix=prefix, app=HISTORY)
    path = f"/apps/{APP_ID}/channels/chat-3/history"
    start = (await rest(b.port, "GET", path)).json()["position"]
    await trigger(a, "chat-3", "x")
    await trigger(a, "chat-3", "y")

    async def recorded() -> bool:
        found = (await rest(b.port, "GET", path, params=[("since", start)])).json()
        return [e["data"] for e in found["events"]] == ["x", "y"]

    # Recorded by A's writer a moment after its REST answer.
    await until(recorded)


async def test_a_forged_entry_is_refused_never_replayed(
    make_cluster: MakeCluster, clients: Any, prefix: str, shared_redis: aioredis.Redis
) -> None:
    (a,) = await make_cluster(1, prefix=prefix, app=HISTORY)
    watcher = await clients(a)
    start = await resume(watcher, "chat-4", {})
    await trigger(a, "chat-4", "genuine")
    await messages(watcher, "chat-4", 1)
    stream = f"{prefix}:hs:{APP_ID}:chat-4"
    await shared_redis.xadd(stream, {"v": "0" * 32 + '.["evil","x",null]', "t": 0, "s": 1}, "2-0")
    await shared_redis.hset(f"{prefix}:hm:{APP_ID}:chat-4", "o", 2)
    again = await clients(a)
    answer = await resume(again, "chat-4", {"position": start["position"]})
    assert answer["recovered"] is False
    assert answer["reason"] == "unavailable"
    await again.barrier()  # nothing replayed, not even the genuine event
    assert a.metrics.bus_forged["forged_history"] == 1


async def test_a_redis_outage_is_false_never_a_wrong_replay(
    make_cluster: MakeCluster, clients: Any, prefix: str
) -> None:
    with RedisServer() as server:
        a, b = await make_cluster(
            2,
            url=server.url,
            prefix=prefix,
            app=HISTORY,
            heartbeat_seconds=0.5,
            reconnect_max_seconds=0.5,
        )
        on_a = await clients(a)
        start = await resume(on_a, "chat-5", {})
        await trigger(b, "chat-5", "before")
        before = (await messages(on_a, "chat-5", 1))[0]["bastion_position"]
        server.kill()
        await until(lambda: not a.hub.bus.healthy and not b.hub.bus.healthy)
        # Delivered on the publishing node, unrecorded, without a position.
        await trigger(a, "chat-5", "during")
        during = (await messages(on_a, "chat-5", 1))[0]
        assert during["data"] == "during" and "bastion_position" not in during
        assert a.metrics.bus_dropped["history_unrecorded"] == 1
        down = await clients(b)
        answer = await resume(down, "chat-5", {"position": before})
        assert answer == {"recovered": False, "reason": "unavailable"}
        server.start()  # same port, no data
        await until(lambda: a.hub.bus.healthy and b.hub.bus.healthy, 15)
        back = await clients(b)
        answer = await resume(back, "chat-5", {"position": before})
        assert answer["recovered"] is False
        assert answer["reason"] == "epoch_changed"
        assert answer["position"].split(":")[0] != start["position"].split(":")[0]
        for node in (a, b):
            await node.stop()


async def test_a_restart_of_the_apps_history_reaches_every_node(
    make_cluster: MakeCluster, clients: Any, prefix: str, shared_redis: aioredis.Redis
) -> None:
    a, b = await make_cluster(2, prefix=prefix, app=HISTORY)
    watcher = await clients(a)
    await resume(watcher, "chat-6", {})
    await trigger(a, "chat-6", "kept")
    kept = (await messages(watcher, "chat-6", 1))[0]["bastion_position"]
    # What a live reload that stops recording does (and a node that delivered
    # events unrecorded, once Redis is back): every history of the app restarts.
    a.hub.history.restart(APP_ID)
    await until(lambda: shared_redis.exists(f"{prefix}:hg:{APP_ID}"))
    again = await clients(b)
    answer = await resume(again, "chat-6", {"position": kept})
    assert answer["recovered"] is False
    assert answer["reason"] == "epoch_changed"
