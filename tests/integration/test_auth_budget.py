"""The failed-authentication budget refuses authentication attempts, not connections.

``[security] auth_failures_per_ip`` on a real in-process node: once an address
spent it, its signed REST calls, ``?token=`` upgrades, channel auths and sign-ins
are refused before anything is verified, while plain connections and public
subscriptions go on; ``never_block`` addresses (loopback by default) are outside
it. Every test connects from 127.0.0.1; other client addresses are named by
``X-Forwarded-For`` through ``trusted_proxies = ["127.0.0.1/32"]``.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    DEFAULT_QUERY,
    RawWebSocket,
    data_of,
    hmac_hex,
    http_request,
    rest,
    signed_target,
)
from support.timeouts import within

from bastion.config import settings_from_mapping
from bastion.server.refusals import RefusalRecord
from bastion.server.runtime import Node

from .conftest import Connect, MakeNode, RunNode

EXAMPLE = Path(__file__).resolve().parents[2] / "bastion.example.toml"
CHANNELS = f"/apps/{APP_ID}/channels"
EVENTS = f"/apps/{APP_ID}/events"
SLOW = 0.001  # tokens per second: nothing refills during a test
TRUST_LOOPBACK = {"trusted_proxies": ["127.0.0.1/32"]}
JWT_SECRET = "edge-jwt-secret-0123456789abcdefghijklmnop"


def capture(node: Node) -> list[RefusalRecord]:
    records: list[RefusalRecord] = []
    node.refusals.listeners.append(records.append)
    return records


def slugs(records: Sequence[RefusalRecord]) -> list[str]:
    return [record.reason.value.slug for record in records]


def xff(address: str) -> list[str]:
    return [f"X-Forwarded-For: {address}"]


def channel_auth(socket_id: str, channel: str, secret: str = APP_SECRET) -> str:
    return f"{APP_KEY}:{hmac_hex(secret, f'{socket_id}:{channel}')}"


def subscribe(channel: str, auth: str | None = None) -> str:
    data: dict[str, Any] = {"channel": channel}
    if auth is not None:
        data["auth"] = auth
    return json.dumps({"event": "pusher:subscribe", "data": data})


class Socket:
    """A raw WebSocket opened with chosen headers (a forwarded client address)."""

    def __init__(self, raw: RawWebSocket, socket_id: str) -> None:
        self.raw = raw
        self.socket_id = socket_id

    async def send(self, text: str) -> dict[str, Any]:
        """Send one message and return the next frame, parsed."""
        self.raw.send_text(text)
        return await self.raw.read_json()


async def open_socket(
    port: int, sockets: list[RawWebSocket], headers: Sequence[str] = ()
) -> Socket:
    raw = await RawWebSocket.connect(port)
    sockets.append(raw)
    status, _ = await raw.handshake(f"/app/{APP_KEY}?{DEFAULT_QUERY}", extra_headers=headers)
    assert status == 101
    first = await raw.read_json()
    assert first["event"] == "pusher:connection_established", first
    return Socket(raw, data_of(first)["socket_id"])


async def upgrade_status(
    port: int, sockets: list[RawWebSocket], path: str, headers: Sequence[str] = ()
) -> tuple[int, dict[str, Any] | None]:
    """The status of one handshake, and the JSON body of a refusal."""
    raw = await RawWebSocket.connect(port)
    sockets.append(raw)
    status, head = await raw.handshake(path, extra_headers=headers)
    if status == 101:
        return status, None
    body = await within(raw.reader.readexactly(int(head.get("content-length", "0"))))
    return status, json.loads(body)


def example_settings(state: Path) -> Any:
    """bastion.example.toml as shipped, with a test app and its files under ``state``."""
    document = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    public_app = dict(document["apps"][0])
    assert (public_app["id"], public_app["key"]) == (APP_ID, APP_KEY)
    public_app["secret"] = APP_SECRET
    document["apps"] = [public_app]
    document["server"]["port"] = 0
    document["audit"]["path"] = str(state / "audit.sqlite3")
    document["security"]["reputation"]["store_path"] = str(state / "blocks.sqlite3")
    document["webhooks"]["queue_path"] = str(state / "webhooks.sqlite3")
    return settings_from_mapping(document, environ={})


async def test_a_conformance_run_on_loopback_is_never_locked_out(
    run_node: RunNode, tmp_path: Path, connect: Connect
) -> None:
    # The Pusher-compatibility suite on a developer's machine: every client on
    # 127.0.0.1, some tests sending bad signatures on purpose, the example config.
    settings = example_settings(tmp_path)
    assert settings.security.auth_failures_per_ip.burst == 20
    node = await run_node(settings)
    records = capture(node)
    for _ in range(15):
        assert (await rest(node.port, "GET", CHANNELS, secret="not-the-secret")).status == 401
    guesser = await connect(node)
    for index in range(12):
        reply = await guesser.subscribe(f"private-guess-{index}", auth=channel_auth("1.1", "x"))
        assert reply["event"] == "pusher:subscription_error", reply
        assert reply["data"]["status"] == 401
    assert slugs(records).count("subscribe_auth_invalid") == 12
    assert len(records) == 27
    # Plain connections, public subscriptions and correctly signed private and
    # presence subscriptions all still work, on a new connection and on the old one.
    client = await connect(node)
    await client.subscribed("public-room")
    await client.subscribed("private-room", auth=channel_auth(client.socket_id, "private-room"))
    member = json.dumps({"user_id": "u1"})
    presence_auth = f"{APP_KEY}:" + hmac_hex(
        APP_SECRET, f"{client.socket_id}:presence-room:{member}"
    )
    await client.subscribed("presence-room", auth=presence_auth, channel_data=member)
    await guesser.subscribed("private-later", auth=channel_auth(guesser.socket_id, "private-later"))
    # Signed REST still works, and reaches the subscribers.
    event = {"name": "after-guesses", "channel": "public-room", "data": "{}"}
    assert (await rest(node.port, "POST", EVENTS, event)).status == 200
    await client.expect("after-guesses", "public-room")
    assert "auth_failure_limit" not in slugs(records)
    assert len(records) == 27


async def test_a_spent_budget_refuses_authentication_attempts_not_connections(
    make_node: MakeNode, raw_sockets: list[RawWebSocket]
) -> None:
    node = await make_node(
        security={"auth_failures_per_ip": {"rate": SLOW, "burst": 3}, **TRUST_LOOPBACK},
        extra_apps=(
            {
                "id": "jwt-app",
                "key": "jwt-key",
                "secret": "jwt-app-secret",
                "jwt": {
                    "algorithms": ["HS256"],
                    "secret": JWT_SECRET,
                    "allow_query_token": True,
                },
            },
        ),
    )
    records = capture(node)
    guesser = xff("198.51.100.20")
    for _ in range(3):
        target = signed_target("GET", CHANNELS, secret="not-the-secret")
        answer = await http_request(node.port, "GET", target, headers=guesser)
        assert answer.status == 401
    del records[:]

    # Connecting and public subscriptions are not authentication attempts.
    socket = await open_socket(node.port, raw_sockets, guesser)
    reply = await socket.send(subscribe("public-room"))
    assert reply["event"] == "pusher_internal:subscription_succeeded", reply
    # A subscription with a missing auth is a client bug, not an attempt: answered as ever.
    reply = await socket.send(subscribe("private-room"))
    assert reply["event"] == "pusher:subscription_error", reply
    assert slugs(records) == ["subscribe_auth_missing"]
    # A correctly signed private subscription is refused without being verified:
    # the connection that attempts it is closed (reconnect with back-off).
    socket.raw.send_text(subscribe("private-room", channel_auth(socket.socket_id, "private-room")))
    code, frames = await socket.raw.read_close()
    assert code == 4100
    assert frames[-1].json()["data"]["code"] == 4100
    assert slugs(records) == ["subscribe_auth_missing", "auth_failure_limit"]
    # A sign-in too.
    socket = await open_socket(node.port, raw_sockets, guesser)
    user_data = json.dumps({"id": "u1"})
    signature = hmac_hex(APP_SECRET, f"{socket.socket_id}::user::{user_data}")
    socket.raw.send_text(
        json.dumps(
            {
                "event": "pusher:signin",
                "data": {"auth": f"{APP_KEY}:{signature}", "user_data": user_data},
            }
        )
    )
    assert (await socket.raw.read_close())[0] == 4100
    # A token in the URL, and a correctly signed REST call: 429 before anything is checked.
    status, body = await upgrade_status(
        node.port, raw_sockets, f"/app/jwt-key?{DEFAULT_QUERY}&token=a.b.c", guesser
    )
    assert (status, body and body["reason"]) == (429, "auth_failure_limit")
    answer = await http_request(node.port, "GET", signed_target("GET", CHANNELS), headers=guesser)
    assert (answer.status, answer.json()["reason"]) == (429, "auth_failure_limit")
    assert slugs(records)[1:] == ["auth_failure_limit"] * 4
    assert {record.ip for record in records} == {"198.51.100.20"}
    # Another address behind the same proxy is not affected.
    other = await open_socket(node.port, raw_sockets, xff("198.51.100.21"))
    reply = await other.send(
        subscribe("private-room", channel_auth(other.socket_id, "private-room"))
    )
    assert reply["event"] == "pusher_internal:subscription_succeeded", reply


async def test_never_block_addresses_are_outside_the_budget(
    make_node: MakeNode, connect: Connect
) -> None:
    node = await make_node(
        security={
            "auth_failures_per_ip": {"rate": SLOW, "burst": 2},
            "reputation": {"never_block": ["127.0.0.1/32"]},
        }
    )
    client = await connect(node)
    for index in range(5):
        reply = await client.subscribe(f"private-{index}", auth=channel_auth("1.1", "x"))
        assert reply["data"]["type"] == "AuthError", reply
    await client.subscribed("private-ok", auth=channel_auth(client.socket_id, "private-ok"))
    assert (await rest(node.port, "GET", CHANNELS)).status == 200
    assert node.ctx.auth_failures.available("127.0.0.1", time.time()) == 2
