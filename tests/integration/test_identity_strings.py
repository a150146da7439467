"""Identity strings through a real node: a user id must be text a store can keep.

A JSON ``\\ud800`` escape decodes to a lone UTF-16 surrogate, which no UTF-8 encoder
(Redis, SQLite, a log line) accepts; a C1 control such as ``\\u0085`` breaks log
lines. Either in a presence ``channel_data.user_id``, correctly signed, gets the
documented ``pusher:subscription_error`` (``InvalidChannelData`` / 400,
``subscribe_channel_data``), and the connection keeps working. Either in a
``pusher:signin``'s ``user_data`` id or watchlist, correctly signed, gets the
documented close **4009** ``signin_data_invalid`` on a node of a Redis cluster,
and nothing of it reaches Redis: the bus stays up and sign-ins and watchlists keep
working across the nodes.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
from support.clients import APP_KEY, APP_SECRET, PusherClient, data_of, hmac_hex

from bastion.protocol.refusals import Reason
from bastion.server.runtime import Node

from .conftest import MakeCluster

#: JSON string contents (escapes kept as escapes, so the signed text is ASCII).
NOT_CLEAN_TEXT = [
    pytest.param("\\ud800x", id="lone-high-surrogate"),
    pytest.param("x\\udfff", id="lone-low-surrogate"),
    pytest.param("nel\\u0085", id="c1-control"),
    pytest.param("esc\\u001b[2J", id="c0-control"),
]


@pytest.mark.parametrize("user_id_json", NOT_CLEAN_TEXT)
async def test_a_presence_user_id_that_is_not_clean_text_is_refused(
    node: Node, connect, logs, user_id_json: str
) -> None:
    client = await connect(node)
    channel = "presence-lobby"
    # The escape stays an escape in channel_data, which is what gets signed.
    channel_data = '{"user_id":"' + user_id_json + '"}'
    assert channel_data.isascii()
    auth = f"{APP_KEY}:{hmac_hex(APP_SECRET, f'{client.socket_id}:{channel}:{channel_data}')}"
    reply = await client.subscribe(channel, auth, channel_data)
    assert reply == {
        "event": "pusher:subscription_error",
        "channel": channel,
        "data": {
            "type": "InvalidChannelData",
            "error": "channel_data must be a JSON object with a user_id",
            "status": 400,
        },
    }
    assert node.metrics.refusal_count("subscribe_channel_data") == 1
    logs.assert_refusal_logged("subscribe_channel_data")
    # The connection keeps working: the same client joins with a clean user_id.
    await client.barrier()
    good = json.dumps({"user_id": "alice", "user_info": {"name": "Zo\u00eb"}})
    auth = f"{APP_KEY}:{hmac_hex(APP_SECRET, f'{client.socket_id}:{channel}:{good}')}"
    joined = await client.subscribed(channel, auth, good)
    assert data_of(joined)["presence"]["ids"] == ["alice"]
    members = node.hub.apps_by_id["12345"].channels[channel].members
    assert list(members) == ["alice"]
    logs.assert_clean()


def _signin(client: PusherClient, user_data: str) -> dict[str, object]:
    auth = f"{APP_KEY}:{hmac_hex(APP_SECRET, f'{client.socket_id}::user::{user_data}')}"
    return {"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}


@pytest.mark.parametrize("where", ["id", "watchlist"])
@pytest.mark.parametrize("text_json", NOT_CLEAN_TEXT)
async def test_a_signin_whose_ids_are_not_clean_text_is_refused_and_the_bus_stays_up(
    make_cluster: MakeCluster,
    clients: Callable[[Node], Awaitable[PusherClient]],
    prefix: str,
    logs,
    text_json: str,
    where: str,
) -> None:
    a, b = await make_cluster(2, prefix=prefix)
    client = await clients(a)
    if where == "id":
        user_data = '{"id":"' + text_json + '"}'
    else:
        user_data = '{"id":"walt","watchlist":["erin","' + text_json + '"]}'
    assert user_data.isascii()
    await client.send(_signin(client, user_data))
    closed = await client.closed()
    rule = Reason.SIGNIN_DATA_INVALID.value
    assert closed.code == 4009
    assert closed.frames == [
        {"event": "pusher:error", "data": {"code": 4009, "message": rule.message}}
    ]
    assert a.metrics.refusal_count("signin_data_invalid") == 1
    logs.assert_refusal_logged("signin_data_invalid")

    # Nothing reached Redis, and the bus session never dropped.
    assert a.metrics.bus_dropped["unencodable"] == 0
    assert a.hub.bus.healthy and a.metrics.bus_connects == 1
    # Sign-ins and watchlists still work across the nodes.
    walt = await clients(a)
    await walt.send(_signin(walt, '{"id":"walt","watchlist":["erin"]}'))
    await walt.expect("pusher:signin_success")
    erin = await clients(b)
    await erin.send(_signin(erin, '{"id":"erin"}'))
    await erin.expect("pusher:signin_success")

    def online(message: dict[str, object]) -> bool:
        events = data_of(message)["events"]
        return {"name": "online", "user_ids": ["erin"]} in events

    await walt.wait_for("pusher_internal:watchlist_events", where=online)
    assert a.hub.bus.healthy and b.hub.bus.healthy and a.metrics.bus_connects == 1
    logs.assert_clean()
