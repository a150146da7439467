"""An open connection's own buckets follow a live reload, on the same connection.

The client-event rate (``max_client_events_per_second``) and the message budget
(``max_messages_per_second``) are kept per connection as one float each, read
against the app's settings at every take (docs/decisions/0010). So a reload that
lowers a limit refuses the next frames at the new rate, and one that raises it
lets them through, without reconnecting.

A refusal keeps the bucket at worst empty at the current settings
(``settle_folded``), so a bucket drained at a much lower rate owes no debt of
tokens at a raised one.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

from support.clients import APP_ID, PusherClient, make_sdk
from support.timeouts import until

from bastion.core.state import Session
from bastion.server.runtime import Node

from .conftest import Connect
from .test_reload import document, load

CHANNEL = "private-chat"
PING = {"event": "pusher:ping", "data": {}}


def _with_app(state: Path, **app: Any) -> dict[str, Any]:
    """The reload test node's configuration, the first app's fields replaced by ``app``."""
    doc = document(state)
    doc["apps"][0] = {**doc["apps"][0], **app}
    return doc


async def _answers_until_pong(client: PusherClient) -> list[dict[str, Any]]:
    """The frames ``client`` gets before the pong of a ping sent now, in order."""
    await client.send(PING)
    answers = []
    while (message := await client.recv())["event"] != "pusher:pong":
        answers.append(message)
    return answers


def _session(node: Node, socket_id: str) -> Session:
    (session,) = [c.session for c in node.ctx.connections if c.session.socket_id == socket_id]
    return session


async def test_the_client_event_rate_follows_a_reload_on_an_open_connection(
    tmp_path: Path, run_node: Any, connect: Connect
) -> None:
    node: Node = await run_node(load(_with_app(tmp_path, max_client_events_per_second=10)))
    sdk = make_sdk(node.port)
    sender, listener = await connect(node), await connect(node)
    for client in (sender, listener):
        auth = sdk.authenticate(channel=CHANNEL, socket_id=client.socket_id)
        await client.subscribed(CHANNEL, auth["auth"])
    loop = asyncio.get_running_loop()

    async def send_events(count: int) -> tuple[list[int], int]:
        """Send ``count`` client events at once: the sender's error codes, deliveries."""
        for n in range(count):
            await sender.send({"event": "client-n", "channel": CHANNEL, "data": {"n": n}})
        refused = await _answers_until_pong(sender)
        # The deliveries were queued before the sender's pong: the listener's own
        # pong comes after them.
        delivered = await _answers_until_pong(listener)
        assert {message["event"] for message in delivered} <= {"client-n"}, delivered
        return [message["data"]["code"] for message in refused], len(delivered)

    # At 10 a second (burst 10), five at once all pass.
    assert await send_events(5) == ([], 5)

    node.apply_config(load(_with_app(tmp_path, max_client_events_per_second=1)))
    started = loop.time()
    codes, delivered = await send_events(5)
    elapsed = loop.time() - started
    # At 1 a second (burst 1): the rest of the five is refused, on the same connection.
    assert codes == [4301] * len(codes) and delivered + len(codes) == 5
    assert len(codes) >= 1 and delivered <= 1 + math.ceil(elapsed)
    assert node.metrics.refusals[("client_event_rate", APP_ID)] == len(codes)

    # Once the bucket is full again (1 token at 1 a second), raise the rate: five at
    # once pass, which a bucket of 1 would not allow.
    session = _session(node, sender.socket_id)
    await until(lambda: session.events_full_at <= loop.time())
    node.apply_config(load(_with_app(tmp_path, max_client_events_per_second=10)))
    assert await send_events(5) == ([], 5)
    assert node.metrics.refusals[("client_event_rate", APP_ID)] == len(codes)


#: One channel per connection: the message burst in force is then the setting's own
#: (never below a reconnect's frames, ``max_channels_per_connection`` + 5 = 6).
_BUDGET_APP = {
    "max_channels_per_connection": 1,
    # Every refused ping is a refusal: keep the connection open through all of them.
    "refusals_per_connection": {"rate": 1, "burst": 1000},
}


async def _ping_answers(client: PusherClient, count: int) -> tuple[int, list[int]]:
    """Send ``count`` pings at once: how many got a pong, and the other answers' codes."""
    for _ in range(count):
        await client.send(PING)
    answers = [await client.recv() for _ in range(count)]
    pongs = sum(message["event"] == "pusher:pong" for message in answers)
    codes = [message["data"]["code"] for message in answers if message["event"] != "pusher:pong"]
    return pongs, codes


async def test_the_message_budget_follows_a_reload_on_an_open_connection(
    tmp_path: Path, run_node: Any, connect: Connect
) -> None:
    def budget(rate: float, burst: int) -> dict[str, Any]:
        return _with_app(
            tmp_path, **_BUDGET_APP, max_messages_per_second={"rate": rate, "burst": burst}
        )

    node: Node = await run_node(load(budget(50, 100)))
    client = await connect(node)
    loop = asyncio.get_running_loop()
    assert await _ping_answers(client, 20) == (20, [])

    # Lowered to 1 a second, burst 6: the bucket keeps what it held (at least 5.6
    # tokens after 20 pings at 50 a second), the rest is refused unread.
    node.apply_config(load(budget(1, 6)))
    started = loop.time()
    pongs, codes = await _ping_answers(client, 12)
    elapsed = loop.time() - started
    assert codes == [4301] * len(codes) and len(codes) >= 1
    assert 5 <= pongs <= 6 + math.ceil(elapsed)
    assert node.metrics.refusals[("message_rate", APP_ID)] == len(codes)

    # Raised to 50 a second, burst 1,000: at most 6 s of the old budget were owed,
    # 300 tokens at the new rate, so twenty pings at once all pass again.
    node.apply_config(load(budget(50, 1000)))
    assert await _ping_answers(client, 20) == (20, [])
    assert node.metrics.refusals[("message_rate", APP_ID)] == len(codes)


async def test_raising_the_message_rate_relieves_a_connection_drained_at_a_lower_one(
    tmp_path: Path, run_node: Any, connect: Connect
) -> None:
    def budget(rate: float) -> dict[str, Any]:
        return _with_app(
            tmp_path, **_BUDGET_APP, max_messages_per_second={"rate": rate, "burst": 6}
        )

    # Drained at one message every 1,000 s: it would be full again in about 6,000 s.
    node: Node = await run_node(load(budget(0.001)))
    client = await connect(node)
    pongs, codes = await _ping_answers(client, 8)
    assert (pongs, codes) == (6, [4301, 4301])
    # At 50 a second the same bucket is full in 0.12 s, and at worst empty now: a
    # ping soon gets its pong again.
    node.apply_config(load(budget(50)))

    async def answered() -> bool:
        return (await _ping_answers(client, 1))[0] == 1

    await until(answered, message="still refused after the rate was raised")
