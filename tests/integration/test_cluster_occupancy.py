"""channel_occupied / channel_vacated decided once for a cluster over a real Redis (#5).

Every node's hub reports to a listener the test attaches; the assertions are over
the whole cluster. Each test uses its own key ``prefix``. "Nothing more happens"
is checked after a barrier: each node's occupancy changes run in order on one
task, so once a later channel's ``occupied`` is seen on that node, every earlier
change of that node has been decided.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from support.clients import APP_ID, APP_KEY, APP_SECRET, PusherClient, open_client
from support.server import BastionProcess
from support.timeouts import scaled, until

from bastion.core import events as ev
from bastion.server.runtime import Node

from .conftest import SHARED_REDIS, TEST_SECURITY, MakeCluster, cluster_server_toml

Clients = Callable[[Node], Awaitable[PusherClient]]
HEARTBEAT = 0.2


class Recorder:
    """Collects the occupancy events of every node of a cluster."""

    def __init__(self, nodes: list[Node]) -> None:
        self.events: list[tuple[int, ev.HubEvent]] = []
        for index, node in enumerate(nodes):
            node.hub.listeners.append(lambda event, index=index: self._record(index, event))

    def _record(self, index: int, event: ev.HubEvent) -> None:
        if isinstance(event, ev.ChannelOccupied | ev.ChannelVacated):
            self.events.append((index, event))

    def of(self, kind: type[Any], channel: str) -> list[int]:
        """The nodes (by index) that reported ``kind`` for ``channel``, in order."""
        return [
            index
            for index, event in self.events
            if isinstance(event, kind) and event.channel == channel
        ]

    async def occupied(self, channel: str, count: int = 1) -> None:
        await until(lambda: len(self.of(ev.ChannelOccupied, channel)) >= count)

    async def vacated(self, channel: str, count: int = 1) -> None:
        await until(lambda: len(self.of(ev.ChannelVacated, channel)) >= count)


@pytest.fixture
async def cluster(make_cluster: MakeCluster, prefix: str) -> AsyncIterator[list[Node]]:
    """Three nodes with a fast heartbeat."""
    yield await make_cluster(3, prefix=prefix, heartbeat_seconds=HEARTBEAT)


async def holders(redis: aioredis.Redis, space: str, channel: str) -> set[str]:
    fields = await redis.hkeys(f"{space}:occ:{APP_ID}:{channel}")
    return {field.decode() for field in fields}


async def unsubscribe(client: PusherClient, channel: str) -> None:
    await client.send({"event": "pusher:unsubscribe", "data": {"channel": channel}})
    await client.barrier()


async def settle(recorder: Recorder, client: PusherClient, marker: str) -> None:
    """Wait until the client's node has decided everything asked of it before."""
    await client.subscribed(marker)
    await recorder.occupied(marker)


async def test_occupied_and_vacated_once_for_the_cluster(
    cluster: list[Node],
    clients: Clients,
    shared_redis: aioredis.Redis,
    prefix: str,
) -> None:
    a, b, _ = cluster
    recorder = Recorder(cluster)
    on_a, on_b = await clients(a), await clients(b)
    await on_a.subscribed("news")
    await recorder.occupied("news")
    await on_b.subscribed("news")
    await until(lambda: holders(shared_redis, prefix, "news"))
    await until(
        lambda: _equals(
            holders(shared_redis, prefix, "news"), {a.hub.bus.node_id, b.hub.bus.node_id}
        )
    )
    await unsubscribe(on_b, "news")
    await until(lambda: _equals(holders(shared_redis, prefix, "news"), {a.hub.bus.node_id}))
    await settle(recorder, on_b, "marker-b")
    assert recorder.of(ev.ChannelOccupied, "news") == [0]
    assert recorder.of(ev.ChannelVacated, "news") == []
    await unsubscribe(on_a, "news")
    await recorder.vacated("news")
    await settle(recorder, on_a, "marker-a")
    assert recorder.of(ev.ChannelOccupied, "news") == [0]
    assert recorder.of(ev.ChannelVacated, "news") == [0]
    assert await shared_redis.exists(f"{prefix}:occ:{APP_ID}:news") == 0


async def test_a_quick_subscribe_unsubscribe_subscribe_ends_occupied(
    cluster: list[Node],
    clients: Clients,
    shared_redis: aioredis.Redis,
    prefix: str,
) -> None:
    a = cluster[0]
    recorder = Recorder(cluster)
    client = await clients(a)
    subscribe = {"event": "pusher:subscribe", "data": {"channel": "flicker"}}
    leave = {"event": "pusher:unsubscribe", "data": {"channel": "flicker"}}
    # One write: the node handles all three before its syncer runs once.
    for message in (subscribe, leave, subscribe):
        await client.send(message)
    while (await client.recv())["event"] != "pusher_internal:subscription_succeeded":
        pass
    await settle(recorder, client, "marker")
    occupied = recorder.of(ev.ChannelOccupied, "flicker")
    vacated = recorder.of(ev.ChannelVacated, "flicker")
    assert len(occupied) - len(vacated) == 1 and len(occupied) <= 2
    assert await holders(shared_redis, prefix, "flicker") == {a.hub.bus.node_id}
    members = await shared_redis.smembers(f"{prefix}:nodeocc:{a.hub.bus.node_id}")
    assert {member.decode() for member in members} == {f"{APP_ID}:flicker", f"{APP_ID}:marker"}


async def test_a_node_that_dies_is_reaped_by_one_survivor(
    cluster: list[Node],
    clients: Clients,
    shared_redis: aioredis.Redis,
    prefix: str,
) -> None:
    a, b, _ = cluster
    recorder = Recorder(cluster)
    on_a, on_b = await clients(a), await clients(b)
    await on_a.subscribed("lonely")
    await on_a.subscribed("shared")
    await on_b.subscribed("shared")
    await recorder.occupied("lonely")
    dead = a.hub.bus.node_id
    await until(lambda: _equals(holders(shared_redis, prefix, "shared"), {dead, b.hub.bus.node_id}))
    await _crash(a)
    await recorder.vacated("lonely")
    await until(lambda: _not(shared_redis.sismember(f"{prefix}:nodes", dead)))
    # The reap script unregistered it in the step that decided the vacated, so no
    # other survivor can report it again; the markers flush each survivor's own work.
    await settle(recorder, on_b, "marker")
    await settle(recorder, await clients(cluster[2]), "marker-2")
    vacated = recorder.of(ev.ChannelVacated, "lonely")
    assert len(vacated) == 1 and vacated[0] in (1, 2)
    assert recorder.of(ev.ChannelVacated, "shared") == []
    assert await holders(shared_redis, prefix, "shared") == {b.hub.bus.node_id}
    assert await shared_redis.exists(f"{prefix}:nodeocc:{dead}") == 0


async def test_a_clean_stop_vacates_what_only_it_held(
    cluster: list[Node],
    clients: Clients,
    shared_redis: aioredis.Redis,
    prefix: str,
) -> None:
    a, b, _ = cluster
    recorder = Recorder(cluster)
    on_a, on_b = await clients(a), await clients(b)
    await on_a.subscribed("lonely")
    await on_a.subscribed("shared")
    await on_b.subscribed("shared")
    await recorder.occupied("lonely")
    gone = a.hub.bus.node_id
    await until(lambda: _equals(holders(shared_redis, prefix, "shared"), {gone, b.hub.bus.node_id}))
    await a.stop()
    assert recorder.of(ev.ChannelVacated, "lonely") == [0]
    assert recorder.of(ev.ChannelVacated, "shared") == []
    assert await shared_redis.exists(f"{prefix}:node:{gone}", f"{prefix}:nodeocc:{gone}") == 0
    assert not await shared_redis.sismember(f"{prefix}:nodes", gone)
    # Unregistered in the same step: no survivor can take it for dead and reap it.
    await settle(recorder, on_b, "marker")
    assert recorder.of(ev.ChannelVacated, "lonely") == [0]


async def test_a_sigkilled_server_is_reaped_by_one_survivor(
    make_cluster: MakeCluster,
    make_bastion: Callable[..., BastionProcess],
    tmp_path: Path,
    clients: Clients,
    shared_redis: aioredis.Redis,
    prefix: str,
) -> None:
    survivors = await make_cluster(2, prefix=prefix, heartbeat_seconds=HEARTBEAT)
    recorder = Recorder(survivors)
    text = cluster_server_toml(prefix, tmp_path, HEARTBEAT)
    server = await asyncio.to_thread(make_bastion, text)
    doomed = await open_client(server.port)
    try:
        await doomed.subscribed("doomed")
        await until(lambda: holders(shared_redis, prefix, "doomed"))
        assert recorder.events == []  # the server decided occupied, not the survivors
        server.process.kill()
        await asyncio.to_thread(server.process.wait)
        await recorder.vacated("doomed")
        await settle(recorder, await clients(survivors[0]), "marker-0")
        await settle(recorder, await clients(survivors[1]), "marker-1")
        assert len(recorder.of(ev.ChannelVacated, "doomed")) == 1
        assert recorder.of(ev.ChannelOccupied, "doomed") == []
        assert await holders(shared_redis, prefix, "doomed") == set()
    finally:
        with contextlib.suppress(Exception):
            await doomed.ws.close()


async def _crash(node: Node) -> None:
    """Stop a node's bus like a SIGKILL would: no clean-up, heartbeats stop."""
    session: Any = node.hub.bus._session  # type: ignore[attr-defined]
    task, session._task = session._task, None
    task.cancel()
    await asyncio.wait([task])


async def _equals(values: Awaitable[set[str]], expected: set[str]) -> bool:
    return await values == expected


async def _not(value: Awaitable[Any]) -> bool:
    return not await value


async def test_a_clean_stop_sends_the_vacated_webhook(
    tmp_path: Path,
    run_node: Any,
    prefix: str,
) -> None:
    # The vacated of a channel only this node held is decided in Redis after the
    # drain; the node must keep its webhooks until then, so it is queued (and sent
    # before the stop ends, or by the next start from the same queue).
    from support.webhook_receiver import WebhookReceiver

    from bastion.config import settings_from_mapping

    with WebhookReceiver() as receiver:
        settings = settings_from_mapping(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "adapter": {
                    "driver": "redis",
                    "url": SHARED_REDIS,
                    "prefix": prefix,
                    "heartbeat_seconds": HEARTBEAT,
                },
                "audit": {"path": str(tmp_path / "audit.sqlite3")},
                "security": {**TEST_SECURITY, "reputation": {"store_path": str(tmp_path / "b")}},
                "webhooks": {
                    "queue_path": str(tmp_path / "webhooks.sqlite3"),
                    "vacated_delay_seconds": 0,
                    "batch_max_ms": 0,
                },
                "apps": [
                    {
                        "id": APP_ID,
                        "key": APP_KEY,
                        "secret": APP_SECRET,
                        "webhooks": [
                            {
                                "url": receiver.url,
                                "event_types": ["channel_occupied", "channel_vacated"],
                            }
                        ],
                    }
                ],
            },
            environ={},
        )
        node = await run_node(settings)
        client = await open_client(node.port)
        await client.subscribed("leaving")
        await asyncio.to_thread(
            receiver.wait_for,
            lambda got: any(b'"channel_occupied"' in r.body for r in got),
            scaled(5),
        )
        await node.stop()  # drains the client: "leaving" vacates during the stop
        # Written to the durable queue during the stop; sent then, or by the next start.
        await run_node(settings)
        got = await asyncio.to_thread(
            receiver.wait_for,
            lambda got: any(b'"channel_vacated"' in r.body for r in got),
            scaled(5),
        )
        names = [e["name"] for r in got for e in r.json()["events"] if e["channel"] == "leaving"]
        assert names == ["channel_occupied", "channel_vacated"]
