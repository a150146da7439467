"""Identity strings through a real node: a presence user_id must be text a store can keep.

A JSON ``\\ud800`` escape decodes to a lone UTF-16 surrogate, which no UTF-8 encoder
(Redis, SQLite, a log line) accepts; a C1 control such as ``\\u0085`` breaks log
lines. Either in a presence ``channel_data.user_id``, correctly signed, gets the
documented ``pusher:subscription_error`` (``InvalidChannelData`` / 400,
``subscribe_channel_data``), and the connection keeps working.
"""

from __future__ import annotations

import json

import pytest
from support.clients import APP_KEY, APP_SECRET, data_of, hmac_hex

from bastion.server.runtime import Node


@pytest.mark.parametrize(
    "user_id_json",
    [
        pytest.param("\\ud800x", id="lone-high-surrogate"),
        pytest.param("x\\udfff", id="lone-low-surrogate"),
        pytest.param("nel\\u0085", id="c1-control"),
        pytest.param("esc\\u001b[2J", id="c0-control"),
    ],
)
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
