"""The fast path for plain text frames hands everything else to the sans-I/O parser intact.

Complete, masked, final text frames are handled without websockets' parser while it
holds nothing; any other frame, a frame cut across reads, and everything after them
go to that parser from a frame boundary. Each test writes exact bytes in chosen
chunks and checks the answers a client sees, in order.
"""

from __future__ import annotations

import asyncio
import json

from support.clients import RawWebSocket, build_frame

from bastion.server.runtime import Node

from .conftest import MakeNode

OP_CONT, OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x8, 0x9, 0xA
PING = json.dumps({"event": "pusher:ping", "data": {}}).encode()


def text(payload: bytes, **kwargs: object) -> bytes:
    return build_frame(OP_TEXT, payload, **kwargs)  # type: ignore[arg-type]


async def pongs(raw: RawWebSocket, count: int) -> list[str]:
    seen = []
    for _ in range(count):
        frame = await raw.read_frame()
        seen.append("ws-pong" if frame.opcode == OP_PONG else frame.json()["event"])
    return seen


async def test_many_frames_in_one_read_are_answered_in_order(node: Node) -> None:
    raw = await RawWebSocket.open(node.port)
    raw.write(text(PING) * 20)
    assert await pongs(raw, 20) == ["pusher:pong"] * 20
    await raw.close()


async def test_a_frame_cut_across_reads_and_the_frames_after_it(node: Node) -> None:
    raw = await RawWebSocket.open(node.port)
    stream = text(PING) + text(PING) + text(PING)
    cut = len(text(PING)) + 3  # the second frame's header is split
    raw.write(stream[:cut])
    assert await pongs(raw, 1) == ["pusher:pong"]
    raw.write(stream[cut:])
    assert await pongs(raw, 2) == ["pusher:pong", "pusher:pong"]
    # The parser holds nothing again: the next plain frames take the fast path.
    raw.write(text(PING) * 3)
    assert await pongs(raw, 3) == ["pusher:pong"] * 3
    await raw.close()


async def test_control_and_fragmented_frames_between_plain_ones(node: Node) -> None:
    raw = await RawWebSocket.open(node.port)
    raw.write(
        text(PING)
        + build_frame(OP_PING, b"hi")
        + text(PING[:8], fin=False)
        + build_frame(OP_CONT, PING[8:])
        + text(PING)
    )
    seen = await pongs(raw, 4)
    # The WebSocket pong is the library's; the three Pusher pongs keep their order.
    assert [event for event in seen if event != "ws-pong"] == ["pusher:pong"] * 3
    assert seen.count("ws-pong") == 1
    await raw.close()


async def test_a_length_in_16_bits_and_non_ascii_text(node: Node) -> None:
    raw = await RawWebSocket.open(node.port)
    subscribe = {"event": "pusher:subscribe", "data": {"channel": "cache-" + "é" * 60}}
    payload = json.dumps(subscribe, ensure_ascii=False).encode()
    assert len(payload) >= 126
    raw.write(text(payload))
    answer = (await raw.read_frame()).json()
    assert answer["event"] == "pusher:subscription_error"  # é is not a channel character
    assert answer["data"]["type"] == "InvalidChannel"
    await raw.close()


async def test_an_unmasked_oversized_or_invalid_frame_still_fails_as_before(
    make_node: MakeNode,
) -> None:
    node = await make_node(app={"max_event_payload_kb": 1})
    unmasked = await RawWebSocket.open(node.port)
    unmasked.write(text(PING) + text(PING, mask=False))
    assert (await unmasked.read_frame()).json()["event"] == "pusher:pong"
    code, _ = await unmasked.read_close()
    assert code == 1002
    oversized = await RawWebSocket.open(node.port)
    oversized.write(text(b"x" * 100_000))
    code, _ = await oversized.read_close()
    assert code == 1009
    invalid = await RawWebSocket.open(node.port)
    invalid.write(text(b'{"event":"\xff"}'))
    code, _ = await invalid.read_close()
    assert code == 1007
    await asyncio.gather(unmasked.close(), oversized.close(), invalid.close())


async def test_a_client_close_is_echoed_byte_for_byte_and_ends_the_tcp_side(node: Node) -> None:
    # The closing handshake is answered without websockets' parser: the payload the
    # client sent comes back as is (an empty one too), after the answers queued
    # before it, and nothing after the close frame is acted on.
    for payload in (b"", (1000).to_bytes(2, "big"), (4321).to_bytes(2, "big") + "bye é".encode()):
        raw = await RawWebSocket.open(node.port)
        raw.write(text(PING) + build_frame(OP_CLOSE, payload) + text(PING))
        assert await pongs(raw, 1) == ["pusher:pong"]
        frame = await raw.read_frame()
        assert (frame.opcode, frame.payload) == (OP_CLOSE, payload)
        assert await raw.read_eof() == b""
        await raw.close()
    assert not node.ctx.connections
