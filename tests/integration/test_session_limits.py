"""Session limits on a real node: the sign-in deadline (authorised connections), the
cap on connections that have not signed in, and the subscribe-attempt bucket.
"""

from __future__ import annotations

import json

from support.clients import (
    APP_KEY,
    APP_SECRET,
    OTHER_APP_KEY,
    PusherClient,
    hmac_hex,
    open_ws,
    read_until_closed,
)

from .conftest import Connect, LogCheck, MakeNode

#: Ticks of the node's heartbeat every 0.25 s (deadlines are checked on that tick).
FAST_TICK = {"pong_timeout": 1}


async def hmac_signin(client: PusherClient, user_id: str) -> None:
    user_data = json.dumps({"id": user_id})
    signature = hmac_hex(APP_SECRET, f"{client.socket_id}::user::{user_data}")
    auth = {"auth": f"{APP_KEY}:{signature}", "user_data": user_data}
    await client.send({"event": "pusher:signin", "data": auth})
    await client.expect("pusher:signin_success")


async def test_signin_deadline_closes_unsigned_and_spares_signed(
    make_node: MakeNode, connect: Connect, logs: LogCheck
) -> None:
    node = await make_node(server=FAST_TICK, app={"signin_deadline_seconds": 0.3})
    lazy = await connect(node)
    prompt = await connect(node)
    await hmac_signin(prompt, "prompt-user")
    closed = await lazy.closed()
    assert closed.code == 4009
    assert closed.frames[-1]["data"]["message"] == "Connection did not sign in within the deadline"
    # Opened at the same time as the one just closed: past its deadline too, and open.
    await prompt.barrier()
    logs.assert_refusal_logged("signin_deadline")


async def test_no_deadline_by_default(make_node: MakeNode, connect: Connect) -> None:
    node = await make_node(server=FAST_TICK)
    client = await connect(node)
    await client.subscribed("public-news")
    await client.barrier()


async def test_unsigned_connections_cap(
    make_node: MakeNode, connect: Connect, logs: LogCheck
) -> None:
    node = await make_node(app={"max_unsigned_connections": 1})
    first = await connect(node)
    ws = await open_ws(node.port)
    closed = await read_until_closed(ws)
    assert closed.code == 4100
    assert closed.frames == [
        {
            "event": "pusher:error",
            "data": {
                "message": "Too many connections of this app have not signed in",
                "code": 4100,
            },
        }
    ]
    logs.assert_refusal_logged("unsigned_over_quota")
    # Signing in frees the slot; the signed-in connection does not count.
    await hmac_signin(first, "first-user")
    second = await connect(node)
    await second.barrier()
    # The other app is not affected by this app's cap.
    await (await connect(node, key=OTHER_APP_KEY)).barrier()


async def test_closing_an_unsigned_connection_frees_its_slot(
    make_node: MakeNode, connect: Connect
) -> None:
    node = await make_node(app={"max_unsigned_connections": 1})
    first = await connect(node)
    # The server forgets the connection while answering the close handshake, that
    # is before the client's close() returns.
    await first.close()
    second = await connect(node)
    await second.barrier()


async def test_subscribe_flood_gets_limit_reached(
    make_node: MakeNode, connect: Connect, logs: LogCheck
) -> None:
    # One channel at a time: the burst in force is never below a reconnect's
    # subscribes (max_channels_per_connection + 5), so the cap is 1 for a burst of 6.
    node = await make_node(
        app={"subscribe_attempts": {"rate": 0.5, "burst": 6}, "max_channels_per_connection": 1}
    )
    client = await connect(node)
    for n in range(6):
        await client.subscribed(f"flood-{n}")
        await client.send({"event": "pusher:unsubscribe", "data": {"channel": f"flood-{n}"}})
    refused = await client.subscribe("flood-5")
    assert refused == {
        "event": "pusher:subscription_error",
        "channel": "flood-5",
        "data": {
            "type": "LimitReached",
            "error": "Too many subscribe attempts; slow down",
            "status": 429,
        },
    }
    # Refused without a subscription, and the connection stays open.
    await client.barrier()
    logs.assert_refusal_logged("subscribe_rate")
