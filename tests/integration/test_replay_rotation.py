"""Replay refusal and secret rotation against a real in-process node.

* A REST request replayed byte-for-byte after the repeat grace is refused with
  401 ``replayed_request`` and counted; within the grace (the official SDKs'
  whole-second timestamps) an identical request still goes through.
* During a rotation, signatures made with a previous secret verify (REST and
  channel auth) until its ``expires_at`` passes; the newest secret always does.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support.clients import (
    APP_ID,
    APP_KEY,
    PusherClient,
    hmac_hex,
    http_request,
    make_sdk,
    rest,
    signed_target,
)
from support.hubs import Clock

from bastion.adapters.replay import LocalReplayClaims
from bastion.protocol.signing import REPEAT_GRACE_SECONDS, REST_TIMESTAMP_WINDOW
from bastion.security.replay import ReplayGuard
from bastion.server.runtime import Node

from .conftest import RunNode, node_settings

EVENTS = f"/apps/{APP_ID}/events"


def _trigger_body(channel: str = "news", data: str = "{}") -> bytes:
    return json.dumps({"name": "update", "channels": [channel], "data": data}).encode()


def _guards(node: Node) -> dict[str, ReplayGuard]:
    """The node's replay guards by app id (one node: its own claims are the cluster's)."""
    claims = node.cluster.replay
    assert isinstance(claims, LocalReplayClaims)
    return claims.guards


def _strict_guard(node: Node) -> None:
    """No repeat grace for the default app, so an immediate replay is a replay."""
    _guards(node)[APP_ID] = ReplayGuard(window_seconds=REST_TIMESTAMP_WINDOW)


async def test_replayed_rest_request_is_refused_and_counted(node: Node, logs) -> None:
    _strict_guard(node)
    body = _trigger_body()
    target = signed_target("POST", EVENTS, body=body)
    first = await http_request(node.port, "POST", target, body)
    assert first.status == 200, first.body
    replay = await http_request(node.port, "POST", target, body)
    assert replay.status == 401
    assert replay.json()["reason"] == "replayed_request"
    assert node.metrics.refusal_count("replayed_request") == 1
    logs.assert_refusal_logged("replayed_request")
    # A fresh signature for the same content is a new request, not a replay.
    again = await rest(node.port, "POST", EVENTS, timestamp=time.time() - 5, raw_body=body)
    assert again.status == 200, again.body


async def test_replayed_get_is_refused_too(node: Node) -> None:
    _strict_guard(node)
    target = signed_target("GET", f"/apps/{APP_ID}/channels")
    assert (await http_request(node.port, "GET", target)).status == 200
    replay = await http_request(node.port, "GET", target)
    assert replay.status == 401
    assert replay.json()["reason"] == "replayed_request"


async def test_refused_signatures_are_not_remembered(node: Node) -> None:
    _strict_guard(node)
    body = _trigger_body()
    target = signed_target("POST", EVENTS, body=body, secret="wrong-secret")
    for _ in range(2):
        reply = await http_request(node.port, "POST", target, body)
        assert reply.json()["reason"] == "auth_signature"
    assert len(_guards(node)[APP_ID]) == 0
    assert node.metrics.refusal_count("replayed_request") == 0


async def test_identical_request_within_the_grace_is_accepted(node: Node, connect) -> None:
    """The SDKs sign with whole seconds: the same call twice in a second is byte-identical."""
    assert REPEAT_GRACE_SECONDS >= 1
    client = await connect(node)
    await client.subscribed("news")
    body = _trigger_body(data="same")
    target = signed_target("POST", EVENTS, body=body)
    for _ in range(2):
        reply = await http_request(node.port, "POST", target, body)
        assert reply.status == 200, reply.body
    for _ in range(2):
        assert (await client.expect("update", "news"))["data"] == "same"
    assert node.metrics.refusal_count("replayed_request") == 0


async def test_python_sdk_identical_triggers_in_a_row(node: Node, connect) -> None:
    client = await connect(node)
    await client.subscribed("news")
    sdk = make_sdk(node.port)
    for _ in range(3):
        assert await asyncio.to_thread(sdk.trigger, "news", "tick", {"n": 1}) == {}
    for _ in range(3):
        await client.expect("tick", "news")
    assert node.metrics.refusal_count("replayed_request") == 0


# --- rotation ---------------------------------------------------------------------------

NEW, OLD, EXPIRED = "new-secret", "old-secret", "expired-secret"
#: How long the old secret still verifies after the test starts, on the node's clock.
OLD_LIFETIME = 60.0


async def _channel_auth(client: PusherClient, secret: str, channel: str) -> dict[str, object]:
    auth = f"{APP_KEY}:{hmac_hex(secret, f'{client.socket_id}:{channel}')}"
    return await client.subscribe(channel, auth)


async def test_previous_secret_verifies_until_it_expires(make_node, connect) -> None:
    # The node reads the time from a clock the test moves: expiry is decided by
    # that clock, not by how fast this machine runs the first half.
    clock = Clock(time.time())
    old_expiry = clock() + OLD_LIFETIME
    node = await make_node(
        app={
            "secret": NEW,
            "previous_secrets": [
                {"secret": OLD, "expires_at": datetime.fromtimestamp(old_expiry, UTC)},
                {"secret": EXPIRED, "expires_at": datetime.fromtimestamp(clock() - 1, UTC)},
            ],
        },
        wall_clock=clock,
    )
    client = await connect(node)

    async def trigger(secret: str) -> str | None:
        reply = await rest(
            node.port,
            "POST",
            EVENTS,
            {"name": "e", "channel": "c", "data": "x"},
            secret=secret,
            timestamp=clock(),  # signed "now" on the node's clock: inside the window
        )
        return None if reply.status == 200 else reply.json()["reason"]

    # Before the old secret's expiry: newest and old verify, the expired one does not.
    assert await trigger(NEW) is None
    assert await trigger(OLD) is None
    assert await trigger(EXPIRED) == "auth_signature"
    assert (await _channel_auth(client, OLD, "private-a"))["event"] == (
        "pusher_internal:subscription_succeeded"
    )
    refused = await _channel_auth(client, EXPIRED, "private-b")
    assert refused["event"] == "pusher:subscription_error"

    clock.advance(old_expiry - clock() + 1)  # one second past the old secret's expiry

    # After it: only the newest verifies.
    assert await trigger(OLD) == "auth_signature"
    assert await trigger(NEW) is None
    refused = await _channel_auth(client, OLD, "private-c")
    assert refused["event"] == "pusher:subscription_error"
    assert refused["data"]["status"] == 401
    assert (await _channel_auth(client, NEW, "private-d"))["event"] == (
        "pusher_internal:subscription_succeeded"
    )


async def test_an_app_added_by_a_reload_reads_the_node_clock(
    run_node: RunNode, connect, tmp_path: Path
) -> None:
    # A reload builds the state of an added app: its channel auth must expire
    # secrets on the same clock as the apps built at start (REST reads the clock
    # per request).
    clock = Clock(time.time())
    node = await run_node(node_settings(state_dir=tmp_path), wall_clock=clock)
    expires_at = datetime.fromtimestamp(clock() + OLD_LIFETIME, UTC)
    added = {
        "id": "777",
        "key": "added-key",
        "secret": NEW,
        "previous_secrets": [{"secret": OLD, "expires_at": expires_at}],
    }
    node.reload(node_settings(extra_apps=[added], state_dir=tmp_path), "api")
    client = await connect(node, key="added-key")

    async def subscribe(secret: str, channel: str) -> object:
        auth = f"added-key:{hmac_hex(secret, f'{client.socket_id}:{channel}')}"
        return (await client.subscribe(channel, auth))["event"]

    assert await subscribe(OLD, "private-a") == "pusher_internal:subscription_succeeded"
    clock.advance(OLD_LIFETIME + 1)
    assert await subscribe(OLD, "private-b") == "pusher:subscription_error"
    assert await subscribe(NEW, "private-c") == "pusher_internal:subscription_succeeded"


@pytest.mark.parametrize("secret", [NEW, OLD])
async def test_official_sdk_signing_with_either_secret(make_node, connect, secret: str) -> None:
    node = await make_node(app={"secret": NEW, "previous_secrets": [{"secret": OLD}]})
    client = await connect(node)
    sdk = make_sdk(node.port, secret=secret)
    channel = "private-rotating"
    auth = json.loads(json.dumps(sdk.authenticate(channel=channel, socket_id=client.socket_id)))
    await client.subscribed(channel, auth["auth"])
    assert await asyncio.to_thread(sdk.trigger, channel, "rotated", {"ok": True}) == {}
    await client.expect("rotated", channel)


async def test_a_full_replay_guard_forgets_behind_a_horizon_and_keeps_serving(make_node) -> None:
    # With room for two signatures, each call past two forgets the oldest timestamp
    # (behind the horizon) instead of refusing every new call until old ones expire.
    node = await make_node(app={"replay_guard_max_entries": 2})
    body = _trigger_body()
    now = int(time.time())
    sent = []
    for seconds_ago in (50, 40, 30, 20, 10, 0):  # oldest first, as a publisher sends them
        target = signed_target("POST", EVENTS, body=body, timestamp=now - seconds_ago)
        reply = await http_request(node.port, "POST", target, body)
        assert reply.status == 200, reply.body
        sent.append(target)
    # Forgotten, yet never replayable: the replay of an evicted request is refused...
    replay = await http_request(node.port, "POST", sent[0], body)
    assert (replay.status, replay.json()["reason"]) == (401, "replayed_request")
    # ...and so is a request never seen but stamped at or before the newest timestamp
    # forgotten (now - 20), which may have been accepted before.
    stale = await rest(node.port, "POST", EVENTS, timestamp=now - 20, raw_body=_trigger_body("x"))
    assert (stale.status, stale.json()["reason"]) == (401, "replayed_request")
    # Current requests keep passing.
    for ahead in (1, 2, 3):
        fresh = await rest(node.port, "POST", EVENTS, timestamp=now + ahead, raw_body=body)
        assert fresh.status == 200, fresh.body
    assert node.metrics.refusal_count("replayed_request") == 2
