"""Live reload (SIGHUP, ``PUT /api/security/config``) on a real node: connections stay.

In-process nodes apply new settings through the same engine the signal and the
admin API use (:mod:`bastion.server.reload`); ``test_sighup_*`` drive a real
``bastion serve`` process with a config file and SIGHUP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    DEFAULT_QUERY,
    OTHER_APP_ID,
    OTHER_APP_KEY,
    OTHER_APP_SECRET,
    PusherClient,
    RawWebSocket,
    data_of,
    hmac_hex,
    http_request,
    make_sdk,
    open_client,
    rest,
)
from support.server import config_toml, run_bastion
from support.timeouts import scaled, until, within
from support.webhook_receiver import WebhookReceiver
from websockets.asyncio.client import connect as ws_connect

from bastion.config import Settings, settings_from_mapping
from bastion.server.reload import RestartRequired
from bastion.server.runtime import Node, _on_sighup
from bastion.store.audit import query

from .conftest import Connect, RunNode
from .test_workers import (
    MakeBastion,
    _clients_on_every_worker,
    _close,
    _redis_config,
    _worker_pids,
    needs_redis,
)

ROTATED = "rotated-secret-0123456789abcdefghijkl"
TOKEN = "admin-token-0123456789abcdefghijklmnopq"
BEARER = f"Authorization: Bearer {TOKEN}"
ALLOWED = "https://app.example.com"


def document(state: Path, **changes: Any) -> dict[str, Any]:
    """A node's configuration as a mapping; ``changes`` replace whole sections."""
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "audit": {"path": str(state / "audit.sqlite3")},
        "webhooks": {"queue_path": str(state / "webhooks.sqlite3"), "batch_max_ms": 0},
        "admin": {"token": TOKEN},
        "security": {
            "new_connections_per_ip": {"rate": 1000, "burst": 10000},
            "auth_failures_per_ip": {"rate": 1000, "burst": 10000},
            "reputation": {"store_path": str(state / "blocks.sqlite3")},
        },
        "apps": [
            {"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET, "enable_client_messages": True},
            {"id": OTHER_APP_ID, "key": OTHER_APP_KEY, "secret": OTHER_APP_SECRET},
        ],
    }
    doc.update(changes)
    return doc


def load(doc: dict[str, Any]) -> Settings:
    return settings_from_mapping(doc, environ={})


@pytest.fixture
async def reload_node(tmp_path: Path, run_node: RunNode) -> Node:
    return await run_node(load(document(tmp_path)))


async def audit_types(node: Node, wanted: str) -> list[Any]:
    rows: list[Any] = []

    async def seen() -> bool:
        nonlocal rows
        rows = query(node.settings.audit.path, type=wanted, limit=10)
        return bool(rows)

    await until(seen)
    return rows


async def test_reload_keeps_connections_subscriptions_and_presence(
    reload_node: Node, tmp_path: Path, connect: Connect
) -> None:
    node = reload_node
    sdk = make_sdk(node.port)
    alice, watcher = await connect(node), await connect(node)
    auth = sdk.authenticate(
        channel="presence-room", socket_id=alice.socket_id, custom_data={"user_id": "alice"}
    )
    await alice.subscribed("presence-room", auth["auth"], auth["channel_data"])
    await watcher.subscribed("news")

    apps = document(tmp_path)["apps"]
    apps[0] = {
        **apps[0],
        "secret": ROTATED,
        "previous_secrets": [{"secret": APP_SECRET}],
        "allowed_origins": [ALLOWED],
        "max_presence_members": 50,
    }
    new = load(document(tmp_path, apps=apps))
    result = node.apply_config(new)
    assert result.changed == (
        "apps.12345.secret",
        "apps.12345.max_presence_members",
        "apps.12345.previous_secrets",
        "apps.12345.allowed_origins",
    )
    assert result.closed == 0
    assert node.settings is new and node.ctx.settings is new

    # The open connections, their subscriptions and the presence member all stay.
    await asyncio.to_thread(sdk.trigger, "news", "after-reload", {"n": 1})
    assert (await watcher.expect("after-reload", "news"))["data"] == '{"n": 1}'
    await alice.barrier()
    users = await rest(node.port, "GET", f"/apps/{APP_ID}/channels/presence-room/users")
    assert users.json() == {"users": [{"id": "alice"}]}  # signed with the retiring secret
    rotated = make_sdk(node.port, secret=ROTATED)
    await asyncio.to_thread(rotated.trigger, "news", "rotated", {})
    await watcher.expect("rotated", "news")
    assert node.hub.connections == 2

    # The new origin rule applies to the next handshake.
    raw = await RawWebSocket.connect(node.port)
    try:
        status, _ = await raw.handshake(
            f"/app/{APP_KEY}?{DEFAULT_QUERY}", extra_headers=("Origin: https://evil.example",)
        )
        assert status == 403
    finally:
        await raw.close()

    (row,) = await audit_types(node, "config_changed")
    assert row.metadata["source"] == "api"
    assert "apps.12345.secret" in str(row.metadata["changed"])
    assert ROTATED not in json.dumps(row.metadata) and ROTATED not in row.message
    assert node.metrics.config_reloads["applied"] == 1


async def test_removed_and_disabled_apps_lose_their_connections(
    reload_node: Node, tmp_path: Path, connect: Connect
) -> None:
    node = reload_node
    main, other = await connect(node), await connect(node, key=OTHER_APP_KEY)
    await main.subscribed("lobby")
    await other.subscribed("lobby")
    apps = document(tmp_path)["apps"]
    result = node.apply_config(load(document(tmp_path, apps=[{**apps[0], "enabled": False}])))
    assert set(result.changed) == {"apps.12345.enabled", f"-apps.{OTHER_APP_ID}"}
    assert result.closed == 2
    closed_main, closed_other = await main.closed(), await other.closed()
    assert (closed_main.code, closed_other.code) == (4003, 4001)
    assert closed_other.frames[-1]["data"]["message"] == (
        "Application removed from the configuration"
    )
    assert node.hub.connections == 0
    assert node.metrics.refusal_count("app_removed") == 1
    # The removed key is unknown from now on; the REST API forgets the app too.
    ws = await ws_connect(f"ws://127.0.0.1:{node.port}/app/{OTHER_APP_KEY}?{DEFAULT_QUERY}")
    try:
        first = json.loads(await within(ws.recv()))
        assert data_of(first)["code"] == 4001
    finally:
        await ws.close()
    answer = await rest(
        node.port,
        "GET",
        f"/apps/{OTHER_APP_ID}/channels",
        key=OTHER_APP_KEY,
        secret=OTHER_APP_SECRET,
    )
    assert answer.status == 404


async def test_added_app_accepts_connections_at_once(
    reload_node: Node, tmp_path: Path, connect: Connect
) -> None:
    node = reload_node
    apps = [*document(tmp_path)["apps"], {"id": "777", "key": "new-key", "secret": ROTATED}]
    assert node.apply_config(load(document(tmp_path, apps=apps))).changed == ("+apps.777",)
    client = await connect(node, key="new-key")
    await client.subscribed("fresh")
    sdk = make_sdk(node.port, app_id="777", key="new-key", secret=ROTATED)
    await asyncio.to_thread(sdk.trigger, "fresh", "hello", {})
    await client.expect("hello", "fresh")


async def test_an_unreadable_jwt_key_file_applies_nothing(
    reload_node: Node, tmp_path: Path
) -> None:
    node = reload_node
    before = node.settings
    jwt = {"algorithms": ["RS256"], "public_key_file": str(tmp_path / "missing.pem")}
    patch = {"apps": [{"id": APP_ID, "jwt": jwt}], "server": {"max_connections": 3}}
    answer = await http_request(
        node.port, "PUT", "/api/security/config", json.dumps(patch).encode(), (BEARER,)
    )
    assert (answer.status, answer.json()["fields"]) == (400, [f"apps[{APP_ID}].jwt"])
    assert node.settings is before and node.hub.max_connections is None
    (row,) = await audit_types(node, "config_change_refused")
    assert row.metadata["result"] == "invalid"


async def test_apps_may_swap_keys_in_one_reload(
    reload_node: Node, tmp_path: Path, connect: Connect
) -> None:
    node = reload_node
    main, other = document(tmp_path)["apps"]
    swapped = [{**main, "key": OTHER_APP_KEY}, {**other, "key": APP_KEY}]
    changed = node.apply_config(load(document(tmp_path, apps=swapped))).changed
    assert changed == (f"apps.{APP_ID}.key", f"apps.{OTHER_APP_ID}.key")
    assert node.hub.apps_by_key[APP_KEY].id == OTHER_APP_ID
    assert node.hub.apps_by_key[OTHER_APP_KEY].id == APP_ID
    await connect(node, key=APP_KEY)
    assert node.metrics.connections_opened[OTHER_APP_ID] == 1


async def test_restart_only_change_is_refused_and_nothing_applies(
    reload_node: Node, tmp_path: Path
) -> None:
    node = reload_node
    before = node.settings
    apps = document(tmp_path)["apps"]
    apps[0] = {**apps[0], "allowed_origins": [ALLOWED]}
    new = load(document(tmp_path, apps=apps, server={"host": "127.0.0.1", "port": 1}))
    with pytest.raises(RestartRequired) as refused:
        node.apply_config(new)
    assert refused.value.fields == ("server.port",)
    assert node.settings is before
    assert node.hub.apps_by_id[APP_ID].settings.allowed_origins is None
    (row,) = await audit_types(node, "config_change_refused")
    assert row.metadata["fields"] == "server.port"
    assert node.metrics.config_reloads["restart_required"] == 1


async def test_security_limits_apply_live(reload_node: Node, tmp_path: Path) -> None:
    node = reload_node
    path = f"/apps/{APP_ID}/channels"
    assert (await rest(node.port, "GET", path)).status == 200
    security = document(tmp_path)["security"]
    tight = {**security, "rest_requests_per_ip": {"rate": 0.001, "burst": 1}}
    node.apply_config(load(document(tmp_path, security=tight)))
    assert (await rest(node.port, "GET", path)).status == 200
    limited = await rest(node.port, "GET", path)
    assert limited.status == 429
    node.apply_config(load(document(tmp_path)))
    assert (await rest(node.port, "GET", path)).status == 200


async def test_a_webhook_endpoint_added_live_receives_events(
    reload_node: Node, tmp_path: Path, connect: Connect
) -> None:
    node = reload_node
    assert node.webhook_queue is None  # no app had webhooks at start
    with WebhookReceiver() as receiver:
        apps = document(tmp_path)["apps"]
        apps[0] = {**apps[0], "webhooks": [{"url": receiver.url, "event_types": ["client_event"]}]}
        node.apply_config(load(document(tmp_path, apps=apps)))
        await until(lambda: node.webhook_producer is not None)
        sender, listener = await connect(node), await connect(node)
        sdk = make_sdk(node.port)
        for client in (sender, listener):
            auth = sdk.authenticate(channel="private-chat", socket_id=client.socket_id)
            await client.subscribed("private-chat", auth["auth"])
        await sender.send({"event": "client-hi", "channel": "private-chat", "data": {}})
        await listener.expect("client-hi", "private-chat")
        received = await asyncio.to_thread(receiver.wait_for, lambda got: len(got) >= 1, scaled(10))
        events = received[0].json()["events"]
        assert [event["name"] for event in events] == ["client_event"]


async def test_put_config_applies_live_and_round_trips(reload_node: Node, connect: Connect) -> None:
    node = reload_node
    client = await connect(node)
    await client.subscribed("news")

    async def call(method: str, body: Any = None) -> Any:
        data = b"" if body is None else json.dumps(body).encode()
        return await http_request(node.port, method, "/api/security/config", data, (BEARER,))

    current = (await call("GET")).json()
    unchanged = await call("PUT", current)
    assert (unchanged.status, unchanged.json()) == (200, {"changed": [], "closed_connections": 0})

    patch = {"apps": [{"id": APP_ID, "allowed_origins": [ALLOWED]}]}
    answer = await call("PUT", patch)
    assert answer.status == 200
    assert answer.json()["changed"] == ["apps.12345.allowed_origins", f"-apps.{OTHER_APP_ID}"]
    assert APP_SECRET.encode() not in answer.body
    shown = (await call("GET")).json()
    assert shown["apps"][0]["allowed_origins"] == [ALLOWED]
    assert shown["apps"][0]["secret"] == "[redacted]"
    assert node.hub.apps_by_id[APP_ID].settings.secret.get_secret_value() == APP_SECRET
    await client.barrier()  # still connected

    bad = await call("PUT", {"server": {"pong_timeout": -1}})
    assert (bad.status, bad.json()["fields"]) == (400, ["server.pong_timeout"])
    restart = await call("PUT", {"audit": {"path": "elsewhere.sqlite3"}})
    assert (restart.status, restart.json()["fields"]) == (409, ["audit.path"])
    rows = await audit_types(node, "config_change_refused")
    await until(lambda: len(query(node.settings.audit.path, type=rows[0].type)) >= 2)
    results = {row.metadata["result"] for row in query(node.settings.audit.path, type=rows[0].type)}
    assert results == {"invalid", "restart_required"}


async def test_put_config_rotates_the_admin_token_and_metrics_access(
    reload_node: Node,
) -> None:
    node = reload_node
    new_token = "rotated-admin-token-0123456789abcdefghij"
    patch = {"admin": {"token": new_token}, "metrics": {"allow_from": ["10.0.0.0/8"]}}
    answer = await http_request(
        node.port, "PUT", "/api/security/config", json.dumps(patch).encode(), (BEARER,)
    )
    assert answer.status == 200
    assert answer.json()["changed"] == ["metrics.allow_from", "admin.token"]
    assert new_token.encode() not in answer.body
    old = await http_request(node.port, "GET", "/api/security/health", b"", (BEARER,))
    assert old.status == 401
    fresh = (f"Authorization: Bearer {new_token}",)
    assert (await http_request(node.port, "GET", "/api/security/health", b"", fresh)).status == 200
    # 127.0.0.1 is no longer in [metrics] allow_from, and no metrics token is set.
    assert (await http_request(node.port, "GET", "/metrics")).status == 403


# --- a real process: SIGHUP -------------------------------------------------------------


async def still_open(client: PusherClient) -> None:
    """Ping; the pong arrives (after any subscription_count the server had queued)."""
    await client.send({"event": "pusher:ping", "data": {}})
    while (await client.recv())["event"] != "pusher:pong":
        pass


def test_sighup_reloads_the_file_and_keeps_connections(tmp_path: Path) -> None:
    state = {
        "audit": {"path": str(tmp_path / "audit.sqlite3")},
        "security": {"reputation": {"store_path": str(tmp_path / "blocks.sqlite3")}},
    }
    with run_bastion(config_toml(**state), tmp_path) as server:

        async def scenario() -> None:
            client = await open_client(server.port)
            await client.subscribed("news")
            allowed = config_toml(**state).replace(
                'key = "app-key"', f'key = "app-key"\nallowed_origins = ["{ALLOWED}"]'
            )
            server.config_path.write_text(allowed, encoding="utf-8")
            os.kill(server.pid, signal.SIGHUP)
            await asyncio.to_thread(
                server.wait_for_output, r"configuration reloaded \(sighup\): apps\.12345"
            )
            raw = await RawWebSocket.connect(server.port)
            try:
                status, _ = await raw.handshake(
                    f"/app/app-key?{DEFAULT_QUERY}", extra_headers=("Origin: https://evil.example",)
                )
                assert status == 403
            finally:
                await raw.close()
            await still_open(client)

            # An invalid file and a restart-only change are refused, by field name.
            server.config_path.write_text(
                allowed.replace("activity_timeout = 120", 'activity_timeout = "x"'),
                encoding="utf-8",
            )
            os.kill(server.pid, signal.SIGHUP)
            await asyncio.to_thread(
                server.wait_for_output,
                r"configuration not reloaded \(sighup, invalid\): server\.activity_timeout",
            )
            server.config_path.write_text(allowed.replace("port = 0", "port = 1"), encoding="utf-8")
            os.kill(server.pid, signal.SIGHUP)
            await asyncio.to_thread(
                server.wait_for_output, r"not reloaded \(sighup, restart_required\): server\.port"
            )
            await still_open(client)
            await client.close()

        asyncio.run(scenario())
        assert server.is_running()
    assert "app-secret" not in server.stderr_text


async def test_sighup_without_a_file_has_nothing_to_reload(
    reload_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bastion")
    before = reload_node.settings
    _on_sighup(reload_node, None, "sighup")  # `bastion serve --dev` without --config
    assert "SIGHUP: nothing to reload (started without --config)" in caplog.text
    assert reload_node.settings is before


@needs_redis
async def test_sighup_to_the_supervisor_reloads_every_worker(make_bastion: MakeBastion) -> None:
    server = make_bastion(_redis_config(), extra_args=("--workers", "2"))
    pids = _worker_pids(server, 2)
    clients, _ = await _clients_on_every_worker(server, pids, channel="news")
    try:
        text = server.config_path.read_text(encoding="utf-8")
        server.config_path.write_text(
            text.replace('key = "app-key"', f'key = "app-key"\nallowed_origins = ["{ALLOWED}"]'),
            encoding="utf-8",
        )
        os.kill(server.pid, signal.SIGHUP)
        for index in pids:
            await asyncio.to_thread(
                server.wait_for_output,
                rf"worker {index}\].*configuration reloaded \(supervisor\): "
                r"apps\.12345\.allowed_origins",
            )
        # The supervisor logs after sending: a worker may log its reload first.
        await asyncio.to_thread(
            server.wait_for_output, r"configuration reloaded, sent to 2 workers"
        )
        for client in clients:  # every worker kept its connections
            await client.ping()
        for _ in range(8):  # spread over both workers by the kernel
            raw = await RawWebSocket.connect(server.port)
            try:
                status, _ = await raw.handshake(
                    f"/app/app-key?{DEFAULT_QUERY}", extra_headers=("Origin: https://evil.example",)
                )
                assert status == 403
            finally:
                await raw.close()
    finally:
        await _close(clients)


async def test_roles_apply_live_and_a_bad_role_table_is_refused_naming_its_field(
    reload_node: Node, connect: Connect
) -> None:
    node = reload_node

    async def put(patch: dict[str, Any]) -> Any:
        body = json.dumps(patch).encode()
        return await http_request(node.port, "PUT", "/api/security/config", body, (BEARER,))

    bad_rate = {"roles": {"staff": {"subscribe_attempts": {"rate": 0, "burst": 5}}}}
    bad = await put({"apps": [{"id": APP_ID, **bad_rate}]})
    assert bad.status == 400, bad
    assert any("roles.staff.subscribe_attempts.rate" in field for field in bad.json()["fields"])
    unknown = await put({"apps": [{"id": APP_ID, "default_role": "boss"}]})
    assert unknown.status == 400 and "default_role" in unknown.json()["error"], unknown.json()
    good = {"roles": {"staff": {"max_channels_per_connection": 1}}, "default_role": "staff"}
    assert (await put({"apps": [{"id": APP_ID, **good}]})).status == 200
    client = await connect(node)
    user_data = json.dumps({"id": "alice"})
    auth = f"{APP_KEY}:{hmac_hex(APP_SECRET, f'{client.socket_id}::user::{user_data}')}"
    await client.signin(auth, user_data)
    await client.expect("pusher:signin_success")
    await client.subscribed("one")
    refused = await client.subscribe("two")
    assert refused["event"] == "pusher:subscription_error", refused
