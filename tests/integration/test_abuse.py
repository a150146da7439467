"""End-to-end abuse scenarios that cross several controls on one real node.

* A connection flood from one address is first capped (429 with Retry-After), and
  the refusals it collects then get the address blocked: its open WebSockets are
  closed with 4100 and its next TCP connections are dropped at accept.
* A flood of client events gets 4301 and never reaches the other subscribers,
  while the flooding connection stays open and its address is scored.

Limits are tiny with a negligible refill rate, so outcomes depend on counts only.
"""

from __future__ import annotations

from support.clients import APP_ID, RawWebSocket, make_sdk, open_client, served

from bastion.server.runtime import Node

from .conftest import MakeNode
from .test_admission import upgrade
from .test_protocol import subscribe_with_sdk

SLOW = {"rate": 0.001}  # tokens per second: nothing refills during a test


async def test_connection_flood_is_capped_then_blocked(make_node: MakeNode) -> None:
    node = await make_node(
        security={
            "new_connections_per_ip": {**SLOW, "burst": 3},
            # connection_rate weighs 5: the fourth 429 reaches 20 and blocks.
            "reputation": {"never_block": [], "threshold": 20},
        }
    )
    sockets: list[RawWebSocket] = []
    try:
        admitted = [await upgrade(node.port, sockets) for _ in range(3)]
        assert [answer.status for answer in admitted] == [101, 101, 101]

        refused = [await upgrade(node.port, sockets) for _ in range(4)]
        assert [answer.status for answer in refused] == [429] * 4
        for answer in refused:
            assert int(answer.headers["retry-after"]) >= 1
            assert answer.json()["reason"] == "connection_rate"

        # Blocked now: the admitted sockets are closed with 4100 ...
        for answer in admitted:
            code, _frames = await answer.raw.read_close()
            assert code == 4100
        # ... and new TCP connections get no answer at all.
        assert not await served(node.port)
        assert not await served(node.port)
    finally:
        for raw in sockets:
            await raw.close()
    assert node.metrics.refusals[("connection_rate", APP_ID)] == 4
    assert node.metrics.refusals[("ip_blocked", "")] == 2


async def test_client_event_flood_gets_4301_and_goes_nowhere(make_node: MakeNode) -> None:
    node: Node = await make_node(app={"max_client_events_per_second": 3})
    sdk = make_sdk(node.port)
    sender, receiver = await open_client(node.port), await open_client(node.port)
    try:
        for client in (sender, receiver):
            await subscribe_with_sdk(sdk, client, "private-flood")
        event = {"event": "client-x", "channel": "private-flood", "data": {}}
        for _ in range(10):
            await sender.send(event)
        errors = [await sender.expect("pusher:error") for _ in range(7)]
        assert {error["data"]["code"] for error in errors} == {4301}
        for _ in range(3):
            await receiver.expect("client-x", "private-flood")
        await receiver.barrier()  # nothing else was relayed
        await sender.barrier()  # and the flooding connection is still open
    finally:
        await sender.close()
        await receiver.close()
    assert node.metrics.refusals[("client_event_rate", APP_ID)] == 7
