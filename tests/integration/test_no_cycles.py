"""A connection leaves no reference cycle behind: it is freed the moment it is gone.

With ten thousand connections the cycle collector's full pass stops the server for
as long as it takes to scan every live object; the node therefore freezes what
survives (see :mod:`bastion.server.collector`), which is only safe if nothing the
server keeps per connection ever needs that collector to be freed. These tests run
real connections through their whole life with the collector off, then ask it
what it would have had to free: no object of Bastion's may be among it.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from support.clients import APP_ID, APP_KEY, APP_SECRET, RawWebSocket, hmac_hex, open_client, rest
from support.timeouts import until

from bastion.server.runtime import Node

from .conftest import node_settings

_SERVER_TYPES = ("bastion.", "httptools.", "websockets.", "uvloop.")


#: ``bastion serve`` runs on uvloop, whose transports are its own; tests run on asyncio's.
RUNNERS = {"asyncio": asyncio.run, "uvloop": uvloop.run}
Scenario = Callable[[Node], Awaitable[None]]


def _garbage_after(runner: str, tmp_path: Path, scenario: Scenario) -> collections.Counter[str]:
    """Run ``scenario`` on a node; what it left to the cycle collector (node still up)."""

    async def main() -> collections.Counter[str]:
        node = Node(node_settings(state_dir=tmp_path), asyncio.get_running_loop())
        await node.start()
        try:
            await scenario(node)
            await _all_gone(node)
            return _server_garbage()
        finally:
            await node.stop()

    return RUNNERS[runner](main())


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _server_garbage() -> collections.Counter[str]:
    """What the cycle collector finds unreachable now, of the server's own types."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = collections.Counter(
            f"{type(item).__module__}.{type(item).__qualname__}"
            for item in gc.garbage
            if type(item).__module__.startswith(_SERVER_TYPES)
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


async def _all_gone(node: Node) -> None:
    await until(lambda: not node.ctx.connections)


def _auth(socket_id: str, channel: str, channel_data: str | None = None) -> str:
    signed = f"{socket_id}:{channel}" + (f":{channel_data}" if channel_data else "")
    return f"{APP_KEY}:{hmac_hex(APP_SECRET, signed)}"


async def _whole_lives(node: Node) -> None:
    watcher = await open_client(node.port)
    room = "presence-room"
    watcher_data = json.dumps({"user_id": "watcher"})
    await watcher.subscribed(room, _auth(watcher.socket_id, room, watcher_data), watcher_data)
    for round_ in range(5):
        client = await open_client(node.port)
        channel = f"private-room-{round_}"
        await client.subscribed(channel, _auth(client.socket_id, channel))
        await client.subscribed("public-news")
        data = json.dumps({"user_id": f"user-{round_}", "user_info": {"n": round_}})
        await client.subscribed(room, _auth(client.socket_id, room, data), data)
        await watcher.expect("pusher_internal:member_added", room)
        await client.send({"event": "client-typing", "channel": room, "data": {"n": round_}})
        await watcher.expect("client-typing", room)
        await client.barrier()  # a ping, answered
        result = await rest(
            node.port,
            "POST",
            f"/apps/{APP_ID}/events",
            {"name": "news", "channel": "public-news", "data": json.dumps({"n": round_})},
        )
        assert result.status == 200, result.body
        await client.expect("news", "public-news")
        await client.close()
        await watcher.expect("pusher_internal:member_removed", room)
    await watcher.close()


async def _ends(node: Node) -> None:
    # Cut by the server (an invalid sign-in signature closes with 4009).
    client = await open_client(node.port)
    user_data = json.dumps({"id": "u1"})
    await client.send(
        {"event": "pusher:signin", "data": {"user_data": user_data, "auth": f"{APP_KEY}:bad"}}
    )
    assert (await client.closed()).code == 4009
    # A WebSocket-level ping and close handshake (the sans-I/O protocol's path).
    raw = await RawWebSocket.open(node.port)
    raw.send_frame(0x9, b"hi")
    assert (await raw.read_frame()).opcode == 0xA
    await raw.close()
    # An unknown app: refused right after the 101.
    refused = await RawWebSocket.connect(node.port)
    status, _ = await refused.handshake("/app/unknown-key?protocol=7")
    assert status == 101
    code, _ = await refused.read_close()
    assert code == 4001
    # A bad handshake and a plain HTTP request.
    bad = await RawWebSocket.connect(node.port)
    bad.write(
        b"GET /app/app-key HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: nope\r\n\r\n"
    )
    assert (await bad.read_eof()).startswith(b"HTTP/1.1 400 ")
    result = await rest(node.port, "GET", f"/apps/{APP_ID}/channels")
    assert result.status == 200


@pytest.mark.usefixtures("collector_off")
@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_connections_through_their_whole_life_leave_no_cycle(runner: str, tmp_path: Path) -> None:
    assert _garbage_after(runner, tmp_path, _whole_lives) == {}


@pytest.mark.usefixtures("collector_off")
@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_closed_refused_and_failed_connections_leave_no_cycle(runner: str, tmp_path: Path) -> None:
    assert _garbage_after(runner, tmp_path, _ends) == {}
