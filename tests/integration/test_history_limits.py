"""Bad input and limits of channel history on a real in-process node (#16).

Every bad resume is a documented refusal (the refusal table: counted, logged and
audited, scored, spending the connection's refusal budget) answered
``recovered: false`` without breaking the subscribe; resumes spend the subscribe
and message budgets; a backfill flood is held by the REST API's buckets; what
one resume replays is capped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from support.clients import APP_ID, PusherClient, http_request, rest

from bastion.server.runtime import Node
from bastion.store.audit import query

from .conftest import Connect, MakeNode

HISTORY: dict[str, Any] = {
    "enable_subscription_count": False,
    "history": {"channel_prefixes": ["chat-"], "max_replay_events": 3},
}


async def bad_resume(client: PusherClient, channel: str, value: Any) -> dict[str, Any]:
    await client.send(
        {"event": "pusher:subscribe", "data": {"channel": channel, "bastion_resume": value}}
    )
    await client.expect("pusher_internal:subscription_succeeded", channel)
    answer = await client.expect("bastion:recovery", channel)
    data: dict[str, Any] = json.loads(answer["data"])
    return data


async def test_bad_resumes_are_counted_audited_and_bounded(
    make_node: MakeNode, connect: Connect
) -> None:
    node = await make_node(app={**HISTORY, "refusals_per_connection": {"rate": 0.001, "burst": 3}})
    client = await connect(node)
    bad = [{"position": "x"}, "e:1", {"position": "e:1", "socket_id": "no"}]
    for index, value in enumerate(bad):
        answer = await bad_resume(client, f"chat-{index}", value)
        assert answer == {"recovered": False, "reason": "invalid_position"}
    # The budget is spent: the next bad resume closes the connection instead.
    await client.send(
        {"event": "pusher:subscribe", "data": {"channel": "chat-9", "bastion_resume": []}}
    )
    closed = await client.closed()
    assert closed.code == 4100
    assert node.metrics.refusals[("resume_invalid", APP_ID)] == 4
    assert node.metrics.refusals[("refusal_limit", APP_ID)] == 1
    await node.stop()  # flushes the audit writer
    audit_path = Path(node.settings.audit.path)
    rows = query(audit_path, type="resume_invalid")
    # The first refusal is written at once; its repeats aggregated with their count.
    assert rows and sum(row.metadata.get("count", 1) for row in rows) == 4
    assert all(row.app_id == APP_ID and row.ip == "127.0.0.1" for row in rows)


async def test_a_forged_position_scores_the_address(make_node: MakeNode, connect: Connect) -> None:
    node = await make_node(app=HISTORY)
    client = await connect(node)
    start = await bad_resume(client, "chat-1", {})
    epoch = start["position"].split(":")[0]
    await client.send({"event": "pusher:unsubscribe", "data": {"channel": "chat-1"}})
    answer = await bad_resume(client, "chat-1", {"position": f"{epoch}:99"})
    assert answer == {"recovered": False, "reason": "invalid_position"}
    assert node.metrics.refusals[("resume_future_position", APP_ID)] == 1


async def test_resumes_spend_the_subscribe_budget(make_node: MakeNode, connect: Connect) -> None:
    # A burst in force of 2 + 5 subscribes (max_channels_per_connection + margin).
    node = await make_node(
        app={
            **HISTORY,
            "max_channels_per_connection": 2,
            "subscribe_attempts": {"rate": 0.001, "burst": 1},
        }
    )
    client = await connect(node)
    for _ in range(7):
        await bad_resume(client, "chat-1", {})
        await client.send({"event": "pusher:unsubscribe", "data": {"channel": "chat-1"}})
    await client.send(
        {"event": "pusher:subscribe", "data": {"channel": "chat-1", "bastion_resume": {}}}
    )
    refused = await client.expect("pusher:subscription_error", "chat-1")
    assert refused["data"]["status"] == 429
    await client.barrier()  # and no replay, no recovery answer


async def test_one_resume_replays_at_most_the_cap(make_node: MakeNode, connect: Connect) -> None:
    node = await make_node(app=HISTORY)
    client = await connect(node)
    start = await bad_resume(client, "chat-1", {})
    await client.close()
    for index in range(4):  # one more than max_replay_events
        body = {"name": "m", "channel": "chat-1", "data": str(index)}
        assert (await rest(node.port, "POST", f"/apps/{APP_ID}/events", body)).status == 200
    again = await connect(node)
    answer = await bad_resume(again, "chat-1", {"position": start["position"]})
    assert answer["recovered"] is False and answer["reason"] == "too_many"
    await again.barrier()  # nothing replayed


async def test_a_backfill_flood_is_held_by_the_rest_buckets(make_node: MakeNode) -> None:
    node: Node = await make_node(
        app=HISTORY, security={"rest_requests_per_ip": {"rate": 0.001, "burst": 3}}
    )
    path = f"/apps/{APP_ID}/channels/chat-1/history"
    statuses = [(await rest(node.port, "GET", path)).status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    flooded = await http_request(node.port, "GET", path)
    assert flooded.status == 429
    assert flooded.json()["reason"] == "ip_rate_limited"
    assert "retry-after" in flooded.headers
    assert node.metrics.refusal_count("ip_rate_limited") == 3
