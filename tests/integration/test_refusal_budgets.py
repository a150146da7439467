"""Refusals are not free (issue #11, item 1): budgets per connection.

On a real node over real sockets:

* the message budget (``max_messages_per_second``) covers every frame a client
  sends, before it is decoded; past it, ``pusher:error`` 4301 ``message_rate``;
* the refusal budget (``refusals_per_connection``) closes a connection whose
  frames keep being refused with 4100 ``refusal_limit``.

Waits are bounded by :mod:`.timeouts`.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from .clients import (
    APP_ID,
    APP_KEY,
    DEFAULT_QUERY,
    OTHER_APP_KEY,
    RawFrame,
    RawWebSocket,
    build_frame,
)
from .conftest import MakeNode

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
PATH = f"/app/{APP_KEY}?{DEFAULT_QUERY}"
PING = json.dumps({"event": "pusher:ping", "data": {}}).encode()
#: Refused on arrival: neither a system event nor a ``client-`` name.
BAD = b'{"event":"x"}'


def text_frames(payload: bytes, count: int) -> bytes:
    return b"".join(build_frame(OP_TEXT, payload) for _ in range(count))


def events(frames: list[RawFrame]) -> list[Any]:
    return [frame.json() for frame in frames if frame.opcode == OP_TEXT]


def codes(frames: list[RawFrame], event: str) -> list[int | None]:
    return [message["data"].get("code") for message in events(frames) if message["event"] == event]


async def test_a_burst_of_pings_is_answered_only_up_to_the_message_burst(
    make_node: MakeNode,
) -> None:
    node = await make_node()  # defaults: 50 messages/s, burst 100; 20 refusals
    raw = await RawWebSocket.open(node.port)
    started = time.monotonic()
    raw.write(text_frames(PING, 2000))  # one burst: 2,000 pings
    code, frames = await raw.read_close()
    elapsed = time.monotonic() - started
    answered = [message for message in events(frames) if message["event"] == "pusher:pong"]
    # At most the burst, plus what the bucket refilled while the burst was read.
    assert 100 <= len(answered) <= 100 + math.ceil(50 * elapsed)
    rate_errors = codes(frames, "pusher:error")
    assert rate_errors[:-1] == [4301] * (len(rate_errors) - 1)
    assert 20 <= len(rate_errors) - 1 <= 20 + math.ceil(0.2 * elapsed)
    assert rate_errors[-1] == 4100 and code == 4100  # closed: refusal_limit
    assert node.metrics.refusals[("refusal_limit", APP_ID)] == 1
    assert node.metrics.refusals[("message_rate", APP_ID)] == len(rate_errors)
    await raw.close()


async def test_every_kind_of_frame_spends_the_message_budget(make_node: MakeNode) -> None:
    node = await make_node(app={"max_messages_per_second": {"rate": 0.001, "burst": 6}})
    raw = await RawWebSocket.open(node.port)
    subscribe = {"event": "pusher:subscribe", "data": {"channel": "a"}}
    raw.send_text(PING)  # 1
    raw.send_text(json.dumps(subscribe))  # 2
    raw.send_text(json.dumps({"event": "pusher:unsubscribe", "data": {"channel": "a"}}))  # 3
    raw.send_frame(OP_PING, b"ws")  # 4: a WebSocket ping (the library answers it)
    raw.send_text(BAD)  # 5: refused, 4300
    raw.send_frame(OP_TEXT, PING[:10], fin=False)  # 6: a fragment counts ...
    raw.send_frame(OP_CONT, PING[10:])  # ... and so does the next: over the budget
    raw.send_frame(OP_PONG, b"")  # over the budget too
    raw.send_text(PING)
    seen = [await raw.read_frame() for _ in range(7)]
    # The WebSocket pong may come before or after the text frames read with its ping.
    assert [frame.opcode for frame in seen].count(OP_PONG) == 1
    answers = events(seen)
    assert [message["event"] for message in answers] == [
        "pusher:pong",
        "pusher_internal:subscription_succeeded",
        *["pusher:error"] * 4,
    ]
    assert [message["data"]["code"] for message in answers[2:]] == [4300, 4301, 4301, 4301]
    assert node.metrics.refusals[("message_rate", APP_ID)] == 3
    assert node.metrics.messages_in[APP_ID] == 4  # the dropped ones were never decoded
    await raw.close()


async def test_a_connection_whose_frames_keep_being_refused_is_closed(
    make_node: MakeNode,
) -> None:
    node = await make_node()
    raw = await RawWebSocket.open(node.port)
    raw.write(text_frames(BAD, 30))
    code, frames = await raw.read_close()
    errors = codes(frames, "pusher:error")
    # Twenty refusals are answered; the next one is answered with the close.
    assert errors == [4300] * 20 + [4100] and code == 4100
    last = events(frames)[-1]["data"]["message"]
    assert "Too many refused messages" in last
    assert node.metrics.refusals[("client_event_name", APP_ID)] == 21
    assert node.metrics.refusals[("refusal_limit", APP_ID)] == 1

    # The budget is the app's setting; the other app keeps the default.
    small = await make_node(app={"refusals_per_connection": {"rate": 0.001, "burst": 3}})
    raw = await RawWebSocket.open(small.port)
    raw.write(text_frames(BAD, 10))
    code, frames = await raw.read_close()
    assert codes(frames, "pusher:error") == [4300] * 3 + [4100] and code == 4100
    other = await RawWebSocket.open(small.port, f"/app/{OTHER_APP_KEY}?{DEFAULT_QUERY}")
    other.write(text_frames(BAD, 5))
    for _ in range(5):
        assert (await other.read_json())["data"]["code"] == 4300
    await raw.close()
    await other.close()
