"""Channel history on a real ``bastion serve``: positions and resumes over WebSocket.

One node (the ``local`` adapter, history in memory); the REST triggers are signed
like an SDK's. What the hub does in every case is in tests/unit/test_hub_history.py;
here the real listener, codec and refusal path carry it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from support.clients import PusherClient, http_request, open_client, rest, signed_target
from support.server import DEFAULT_APP, BastionProcess

HISTORY_APP: dict[str, Any] = {
    **DEFAULT_APP,
    # Counts would interleave with the frames these tests read in order.
    "enable_subscription_count": False,
    "history": {"channel_prefixes": ["chat-"], "max_events": 5},
}


@pytest.fixture
def node(make_bastion: Any) -> BastionProcess:
    server: BastionProcess = make_bastion(apps=[HISTORY_APP])
    return server


async def trigger(port: int, channel: str, data: str, socket_id: str | None = None) -> None:
    body: dict[str, Any] = {"name": "message", "channels": [channel], "data": data}
    if socket_id is not None:
        body["socket_id"] = socket_id
    result = await rest(port, "POST", "/apps/12345/events", body)
    assert result.status == 200, result.body


async def resume(client: PusherClient, channel: str, resume: Any) -> None:
    await client.send(
        {"event": "pusher:subscribe", "data": {"channel": channel, "bastion_resume": resume}}
    )
    await client.expect("pusher_internal:subscription_succeeded", channel)


def recovery(message: dict[str, Any]) -> dict[str, Any]:
    assert message["event"] == "bastion:recovery", message
    answer: dict[str, Any] = json.loads(message["data"])
    return answer


async def test_a_reconnecting_client_gets_what_it_missed_exactly_once(node: BastionProcess) -> None:
    async with await open_client(node.port) as first:
        await resume(first, "chat-1", {})
        start = recovery(await first.recv())
        assert start["recovered"] is True and start["position"].endswith(":0")
        await trigger(node.port, "chat-1", "seen")
        seen = await first.expect("message", "chat-1")
        position = seen["bastion_position"]
        assert position.split(":")[0] == start["position"].split(":")[0]
    for text in ("a", "b", "c"):
        await trigger(node.port, "chat-1", text)
    async with await open_client(node.port) as again:
        await resume(again, "chat-1", {"position": position, "socket_id": first.socket_id})
        replay = [await again.expect("message", "chat-1") for _ in range(3)]
        assert [m["data"] for m in replay] == ["a", "b", "c"]
        answer = recovery(await again.recv())
        assert answer == {
            "recovered": True,
            "replayed": 3,
            "position": replay[-1]["bastion_position"],
        }
        await trigger(node.port, "chat-1", "live")
        assert (await again.expect("message", "chat-1"))["data"] == "live"
        await again.barrier()  # nothing else: no event twice


async def test_more_missed_than_kept_is_false_with_nothing_replayed(node: BastionProcess) -> None:
    async with await open_client(node.port) as first:
        await resume(first, "chat-1", {})
        position = recovery(await first.recv())["position"]
    for index in range(7):  # max_events is 5
        await trigger(node.port, "chat-1", str(index))
    async with await open_client(node.port) as again:
        await resume(again, "chat-1", {"position": position})
        answer = recovery(await again.recv())
        assert answer["recovered"] is False
        assert answer["reason"] == "too_old"
        assert answer["position"].endswith(":7")
        await again.barrier()


async def test_plain_clients_and_other_channels_see_nothing_new(node: BastionProcess) -> None:
    async with await open_client(node.port) as client:
        await client.subscribed("chat-1")
        await client.subscribed("news")
        await trigger(node.port, "news", "n")
        news = await client.expect("message", "news")
        assert set(news) == {"event", "channel", "data"}
        await trigger(node.port, "chat-1", "c")
        chat = await client.expect("message", "chat-1")
        assert set(chat) == {"event", "channel", "data", "bastion_position"}
        await client.barrier()  # no bastion:recovery without bastion_resume


@pytest.mark.parametrize(
    "bad",
    [
        "e:1",
        {"position": "not a position"},
        {"position": "e:" + "9" * 40},
        {"position": "e:1", "socket_id": "x"},
    ],
)
async def test_a_bad_resume_is_answered_false_and_the_subscribe_stands(
    node: BastionProcess, bad: Any
) -> None:
    async with await open_client(node.port) as client:
        await resume(client, "chat-1", bad)
        assert recovery(await client.recv()) == {
            "recovered": False,
            "reason": "invalid_position",
        }
        await trigger(node.port, "chat-1", "still here")
        assert (await client.expect("message", "chat-1"))["data"] == "still here"
    metrics = await http_request(node.port, "GET", "/metrics")
    assert b'bastion_refusals_total{app="12345",reason="resume_invalid"}' in metrics.body


async def test_a_forged_position_is_refused_as_such(node: BastionProcess) -> None:
    async with await open_client(node.port) as client:
        await resume(client, "chat-1", {})
        epoch = recovery(await client.recv())["position"].split(":")[0]
        await resume(client, "chat-2", {})
        await client.recv()
        await client.send({"event": "pusher:unsubscribe", "data": {"channel": "chat-1"}})
        await resume(client, "chat-1", {"position": f"{epoch}:1000"})
        answer = recovery(await client.recv())
        assert answer == {"recovered": False, "reason": "invalid_position"}
    metrics = await http_request(node.port, "GET", "/metrics")
    assert b'reason="resume_future_position"' in metrics.body


# --- backfill over REST -----------------------------------------------------------------


async def backfill(port: int, channel: str, since: str | None = None) -> Any:
    params = [] if since is None else [("since", since)]
    return await rest(port, "GET", f"/apps/12345/channels/{channel}/history", params=params)


async def test_backfill_returns_every_event_since_a_position(node: BastionProcess) -> None:
    start = await backfill(node.port, "chat-1")
    assert start.status == 200
    assert start.json() == {"recovered": True, "position": start.json()["position"], "events": []}
    epoch, _, offset = start.json()["position"].partition(":")
    assert offset == "0"
    for text in ("a", "b", "c"):
        await trigger(node.port, "chat-1", text)
    since = await backfill(node.port, "chat-1", f"{epoch}:1")
    assert since.status == 200
    assert since.json() == {
        "recovered": True,
        "position": f"{epoch}:3",
        "events": [
            {"event": "message", "data": "b", "position": f"{epoch}:2"},
            {"event": "message", "data": "c", "position": f"{epoch}:3"},
        ],
    }


async def test_backfill_is_never_partial(node: BastionProcess) -> None:
    epoch = (await backfill(node.port, "chat-1")).json()["position"].split(":")[0]
    for index in range(7):  # max_events is 5
        await trigger(node.port, "chat-1", str(index))
    found = await backfill(node.port, "chat-1", f"{epoch}:0")
    assert found.status == 200
    assert found.json() == {
        "recovered": False,
        "reason": "too_old",
        "position": f"{epoch}:7",
        "events": [],
    }
    other = await backfill(node.port, "chat-1", "elsewhere:3")
    assert other.json()["reason"] == "epoch_changed" and other.json()["events"] == []
    off = await backfill(node.port, "news")
    assert off.json() == {"recovered": False, "reason": "history_off", "events": []}


@pytest.mark.parametrize("since", ["nope", "e:01", "e:-1", "a" * 40 + ":1", "__FUTURE__"])
async def test_backfill_refuses_what_is_not_a_reached_position(
    node: BastionProcess, since: str
) -> None:
    if since == "__FUTURE__":
        epoch = (await backfill(node.port, "chat-1")).json()["position"].split(":")[0]
        since = f"{epoch}:5"
    refused = await backfill(node.port, "chat-1", since)
    assert refused.status == 400
    assert refused.json()["reason"] == "invalid_position"


async def test_backfill_keeps_the_rest_apis_signing_rules(node: BastionProcess) -> None:
    # The route goes through the REST API's one door: signature, replay guard and
    # buckets are checked before it is reached (tests/integration/test_replay_rotation.py).
    path = "/apps/12345/channels/chat-1/history"
    unsigned = await http_request(node.port, "GET", path)
    assert unsigned.status == 401
    assert unsigned.json()["reason"] == "auth_missing"
    forged = await http_request(node.port, "GET", signed_target("GET", path, secret="nope"))
    assert forged.status == 401
    assert forged.json()["reason"] == "auth_signature"
    tampered = signed_target("GET", path, params=[("since", "e:0")]).replace("e%3A0", "e%3A1")
    assert (await http_request(node.port, "GET", tampered)).status == 401
    user = await rest(node.port, "GET", "/apps/12345/channels/%23server-to-user-1/history")
    assert user.status == 400
    posted = await rest(node.port, "POST", path, {})
    assert posted.status == 405
