"""Slow consumers against a live node over TCP: cut with a 4100 the client can read.

A client that stops reading is owed at most ``max_write_buffer_kb``: the node's
transport keeps a small buffer (64 KiB) and holds the rest as whole frames. Past
the bound the frames held are dropped (``frames_discarded`` / ``bytes_discarded``)
and the ``pusher:error`` 4100 and close frame go behind the small buffer only, so a
client that reads again finds them at the end of what it was sent. A client that
pauses and reads again before the bound loses nothing.

Events go through the REST API (``batch_events``, ten 8 KB events a call) as a
back end sends them; every event carries its sequence number, so what the client
reads shows order and gaps. The reading client is a raw socket with a 4 KiB
receive buffer that reads only when the test asks.
"""

from __future__ import annotations

import pytest
from support.clients import APP_ID, OP_CLOSE, RawFrame, RawWebSocket, http_request, rest
from support.timeouts import scaled, until

from bastion.server import websocket
from bastion.server.runtime import Node
from bastion.server.state import ConnectionState
from bastion.server.websocket import WebSocketConnection

CHANNEL = "firehose"
PAYLOAD = "x" * 8000
BATCH = 10


async def publish_batch(node: Node, first: int) -> None:
    """Ten events, numbered from ``first``, in one REST call."""
    batch = [
        {"name": "big", "channel": CHANNEL, "data": f"{n:06d}:{PAYLOAD}"}
        for n in range(first, first + BATCH)
    ]
    response = await rest(node.port, "POST", f"/apps/{APP_ID}/batch_events", {"batch": batch})
    assert response.status == 200, response.body


async def stalled_subscriber(node: Node) -> tuple[RawWebSocket, WebSocketConnection]:
    """A subscribed client that reads only when asked, and its connection on the node."""
    slow = await RawWebSocket.open_stalled(node.port)
    slow.send_text(f'{{"event":"pusher:subscribe","data":{{"channel":"{CHANNEL}"}}}}')
    assert (await slow.read_json())["event"] == "pusher_internal:subscription_succeeded"
    (connection,) = node.ctx.connections
    assert isinstance(connection, WebSocketConnection)
    return slow, connection


def sequence_numbers(frames: list[RawFrame]) -> list[int]:
    """The numbers of the ``big`` events among ``frames``, in the order read."""
    return [
        int(message["data"][:6])
        for message in (frame.json() for frame in frames)
        if message["event"] == "big"
    ]


async def test_a_slow_consumer_reads_the_4100_close_after_what_it_was_sent(
    make_node, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client below reads only after the cut; it must not race the close grace
    # (2 s), which the next test and the pusher-js interop test are about.
    monkeypatch.setattr(websocket, "CLOSE_GRACE_SECONDS", scaled(60))
    node = await make_node()  # max_write_buffer_kb = 1024, the default
    slow, _ = await stalled_subscriber(node)

    published = 0
    for _ in range(1000):  # bounded: ~80 MB; loopback buffers hold a few MB at most
        await publish_batch(node, published)
        published += BATCH
        if node.metrics.refusal_count("slow_consumer"):
            break
    assert node.metrics.refusal_count("slow_consumer") == 1, f"not cut after {published}"
    assert node.metrics.connections_closed[(APP_ID, 4100)] == 1
    assert not node.ctx.connections

    code, frames = await slow.read_close()
    assert code == 4100
    assert frames[-1].json() == {
        "event": "pusher:error",
        "data": {"message": "Write buffer limit exceeded; reconnect with back-off", "code": 4100},
    }
    # What it read: the events from the first on, in order, without a gap; every
    # later one was dropped (the cut came after the last call's events reached it).
    received = sequence_numbers(frames)
    assert received == list(range(len(received)))
    dropped = published - len(received)
    assert dropped > 0
    frame_size = 4 + len(frames[0].payload)  # FIN/opcode, 126, a 16-bit length
    assert node.metrics.frames_discarded[APP_ID] == dropped
    assert node.metrics.bytes_discarded[APP_ID] == dropped * frame_size
    # ... and an operator sees it.
    scrape = (await http_request(node.port, "GET", "/metrics")).body.decode()
    assert f'bastion_frames_discarded_total{{app="{APP_ID}"}} {float(dropped)}' in scrape
    await slow.close()


async def test_a_client_that_never_reads_again_is_aborted_after_the_grace(
    make_node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(websocket, "CLOSE_GRACE_SECONDS", 0.05)
    node = await make_node(server={"max_write_buffer_kb": 256})
    slow, connection = await stalled_subscriber(node)
    published = 0
    while not node.metrics.refusal_count("slow_consumer") and published < 10_000:
        await publish_batch(node, published)
        published += BATCH
    assert node.metrics.refusal_count("slow_consumer") == 1
    # Its buffers stay full and it never reads: the abort ends the connection...
    await until(lambda: connection.state is ConnectionState.CLOSED)
    # ... and what the client finds when it finally looks ends without a close frame.
    code, _ = await slow.read_close()
    assert code == 1006
    await slow.close()


async def test_a_consumer_that_pauses_below_the_limit_loses_nothing_and_stays_open(
    make_node,
) -> None:
    node = await make_node()  # max_write_buffer_kb = 1024
    slow, connection = await stalled_subscriber(node)

    # It stops reading until the node holds frames for it (its transport's 64 KiB
    # and the kernel buffers are full), and a little longer: far below 1 MiB.
    published = 0
    while connection.held_bytes == 0 and published < 10_000:
        await publish_batch(node, published)
        published += BATCH
    assert connection.held_bytes > 0
    for _ in range(2):
        await publish_batch(node, published)
        published += BATCH
    assert connection.held_bytes < 512 * 1024
    assert node.metrics.frames_discarded[APP_ID] == 0

    # It reads again: every event, in order, and the connection is still open.
    for sequence in range(published):
        message = await slow.read_json()
        assert (message["event"], message["data"][:6]) == ("big", f"{sequence:06d}")
    slow.send_text('{"event":"pusher:ping","data":{}}')
    assert (await slow.read_json())["event"] == "pusher:pong"
    assert connection.held_bytes == 0
    assert node.ctx.connections == {connection}
    assert node.metrics.refusal_count("slow_consumer") == 0
    assert node.metrics.frames_discarded[APP_ID] == 0
    await slow.close()


async def test_a_close_behind_unread_bytes_waits_on_a_grace_deadline_and_none_is_left_behind(
    make_node, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection whose client closes leaves no deadline behind. One that closes
    # behind bytes its client does not read waits on one (which aborts it: the test
    # above) until its TCP ends, and then that one is gone too.
    monkeypatch.setattr(websocket, "CLOSE_GRACE_SECONDS", scaled(60))
    node = await make_node(server={"max_write_buffer_kb": 256})
    deadlines = node.ctx.deadlines

    reader = await RawWebSocket.open(node.port)  # (connection_established read)
    (quick,) = node.ctx.connections
    reader.send_frame(OP_CLOSE, (1000).to_bytes(2, "big"))  # the client's close frame
    code, _ = await reader.read_close()  # answered by the node, which then closes
    assert code == 1000
    await until(lambda: quick.state is ConnectionState.CLOSED)
    assert len(deadlines) == 0
    await reader.close()

    slow, connection = await stalled_subscriber(node)
    published = 0
    while not node.metrics.refusal_count("slow_consumer") and published < 10_000:
        await publish_batch(node, published)
        published += BATCH
    await until(lambda: connection.state is ConnectionState.CLOSING)
    assert len(deadlines) == 1  # its grace: the client still holds the buffers full
    await slow.close()  # the client goes: the grace is no longer needed
    await until(lambda: connection.state is ConnectionState.CLOSED)
    assert len(deadlines) == 0
