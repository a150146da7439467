"""Per-app client event rules on a real node: allow-list, JSON Schema, app-wide bucket.

Each refusal is a ``pusher:error`` frame; the connection stays open, nothing is
relayed, and the refusal is counted under its own slug.
"""

from __future__ import annotations

from typing import Any

from support.clients import APP_ID, PusherClient, make_sdk

from bastion.server.runtime import Node

from .test_protocol import subscribe_with_sdk

POINT = {
    "type": "object",
    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
    "required": ["x", "y"],
}


async def _pair(node: Node, connect: Any) -> tuple[PusherClient, PusherClient]:
    sdk = make_sdk(node.port)
    sender, receiver = await connect(node), await connect(node)
    for client in (sender, receiver):
        await subscribe_with_sdk(sdk, client, "private-room")
    return sender, receiver


def _event(name: str, data: Any) -> dict[str, Any]:
    return {"event": name, "channel": "private-room", "data": data}


async def test_allowlist_relays_listed_names_and_refuses_the_rest(make_node, connect) -> None:
    node = await make_node(app={"client_event_allowlist": ["client-typing", "client-cursor-*"]})
    sender, receiver = await _pair(node, connect)
    await sender.send(_event("client-chat", {"text": "hi"}))
    error = await sender.expect("pusher:error")
    assert error["data"]["code"] == 4300
    assert error["data"]["message"] == "Client event name is not on the app's allow-list"
    await sender.send(_event("client-cursor-move", {"x": 1}))
    await sender.send(_event("client-typing", True))
    assert (await receiver.expect("client-cursor-move", "private-room"))["data"] == {"x": 1}
    assert (await receiver.expect("client-typing", "private-room"))["data"] is True
    await receiver.barrier()  # client-chat never arrived
    assert node.metrics.refusals[("client_event_not_allowed", APP_ID)] == 1


async def test_schema_refuses_mismatched_data_without_echoing_it(make_node, connect) -> None:
    node = await make_node(app={"client_event_schemas": {"client-point": POINT}})
    sender, receiver = await _pair(node, connect)
    await sender.send(_event("client-point", {"x": "leaked-value-123", "y": 2}))
    error = await sender.expect("pusher:error")
    assert error["data"]["code"] == 4300
    message = error["data"]["message"]
    assert "'type' rule failed at $.x" in message
    assert "leaked-value-123" not in message
    await sender.send(_event("client-point", {"x": 1.5, "y": 2}))
    await sender.send(_event("client-free", ["no", "schema"]))
    assert (await receiver.expect("client-point", "private-room"))["data"] == {"x": 1.5, "y": 2}
    assert (await receiver.expect("client-free", "private-room"))["data"] == ["no", "schema"]
    await receiver.barrier()
    assert node.metrics.refusals[("client_event_schema", APP_ID)] == 1


async def test_app_wide_bucket_spans_connections(make_node, connect) -> None:
    # Per connection 10/s, but only 3 for the whole app (refilling once in ~17 minutes).
    node = await make_node(app={"client_events_per_app": {"rate": 0.001, "burst": 3}})
    first, receiver = await _pair(node, connect)
    second = await connect(node)
    await subscribe_with_sdk(make_sdk(node.port), second, "private-room")
    for sender, other in ((first, second), (second, first), (first, second)):
        await sender.send(_event("client-ok", 1))
        assert (await receiver.expect("client-ok", "private-room"))["data"] == 1
        assert (await other.expect("client-ok", "private-room"))["data"] == 1
    await second.send(_event("client-over", 2))
    error = await second.expect("pusher:error")
    assert error["data"]["code"] == 4301
    assert error["data"]["message"] == "Client event rejected because of the app's rate limit"
    await receiver.barrier()
    assert node.metrics.refusals[("client_event_app_rate", APP_ID)] == 1
