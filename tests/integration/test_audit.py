"""The audit log on a real node: refusals land in SQLite, the CLI reads them, no secrets.

Each test starts its own :class:`Node` with ``[audit] path`` under ``tmp_path``,
provokes refusals over real sockets, stops the node (which flushes the writer) and
then reads the file as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    OTHER_APP_ID,
    OTHER_APP_KEY,
    OTHER_APP_SECRET,
    hmac_hex,
    http_request,
    open_client,
    signed_target,
)

from bastion.config import settings_from_mapping
from bastion.server.runtime import Node
from bastion.store.audit import query

from .conftest import RunNode

EVENTS = f"/apps/{APP_ID}/events"
TRIGGER = json.dumps({"name": "e", "channels": ["c"], "data": "{}"}).encode()
TIMEOUT = 60


def audit_settings(db: Path, **audit: Any) -> Any:
    return settings_from_mapping(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "audit": {"path": str(db), **audit},
            "security": {"reputation": {"store_path": str(db.with_name("blocks.sqlite3"))}},
            "apps": [
                {"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET},
                {"id": OTHER_APP_ID, "key": OTHER_APP_KEY, "secret": OTHER_APP_SECRET},
            ],
        },
        environ={},
    )


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node(run_node: RunNode) -> AsyncIterator[StartNode]:

    async def factory(db: Path, **audit: Any) -> Node:
        return await run_node(audit_settings(db, **audit))

    yield factory


def file_bytes(db: Path) -> bytes:
    """The database and any WAL/shared-memory side files, as they are on disk."""
    return b"".join(
        path.read_bytes() for path in db.parent.iterdir() if path.name.startswith(db.name)
    )


async def test_refusals_are_persisted_and_secrets_never_are(
    tmp_path: Path, start_node: StartNode
) -> None:
    db = tmp_path / "audit.sqlite3"
    node = await start_node(db)
    sent: list[str] = []  # every credential that crossed the wire

    # 1. A malformed JSON frame: pusher:error 4300, connection stays open.
    client = await open_client(node.port)
    await client.send("{")
    error = await client.recv()
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4300

    # 2. A private subscription with a wrong signature, then one with a good one.
    channel = "private-room"
    bad_signature = hmac_hex("not-the-secret", f"{client.socket_id}:{channel}")
    good_signature = hmac_hex(APP_SECRET, f"{client.socket_id}:{channel}")
    for auth in (f"{APP_KEY}:{bad_signature}", f"{APP_KEY}:{good_signature}"):
        sent.append(auth)
        await client.subscribe(channel, auth)

    # 3. A REST call signed with the wrong secret, and a well-signed one.
    bad_target = signed_target("POST", EVENTS, body=TRIGGER, secret="wrong-secret")
    good_target = signed_target("POST", EVENTS, body=TRIGGER)
    sent += [bad_target, good_target]
    bad = await http_request(node.port, "POST", bad_target, TRIGGER)
    good = await http_request(node.port, "POST", good_target, TRIGGER)
    assert (bad.status, good.status) == (401, 200)
    await client.close()

    await node.stop()  # flushes the writer: nothing may be missing after this

    (config,) = query(db, type="config_loaded")  # the start, then the refusals
    events = [event for event in query(db) if event.id != config.id]
    by_type = {event.type: event for event in events}
    assert sorted(by_type) == ["auth_signature", "malformed_json", "subscribe_auth_invalid"]
    assert len(events) == 3
    for event in events:
        assert event.ip == "127.0.0.1"
        assert event.app_id == APP_ID
        assert event.severity == "warning"
        assert len(event.id) == 32
    assert by_type["malformed_json"].socket_id == client.socket_id
    assert by_type["subscribe_auth_invalid"].socket_id == client.socket_id
    assert by_type["auth_signature"].socket_id is None
    assert by_type["auth_signature"].metadata["http_status"] == 401
    assert by_type["malformed_json"].metadata["error_code"] == 4300

    raw = file_bytes(db)
    rest_signatures = [
        parse_qs(urlsplit(target).query)["auth_signature"][0]
        for target in (bad_target, good_target)
    ]
    secrets = [APP_SECRET, OTHER_APP_SECRET, bad_signature, good_signature, *rest_signatures]
    for secret in [*secrets, *sent]:
        assert secret.encode() not in raw, secret


async def test_cli_prints_the_events(tmp_path: Path, start_node: StartNode) -> None:
    db = tmp_path / "audit.sqlite3"
    node = await start_node(db)
    client = await open_client(node.port)
    for text in ("{", "not json", "[]"):
        await client.send(text)
        await client.recv()
    await client.close()
    await node.stop()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bastion", "audit", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    result = await asyncio.to_thread(cli, "--db", str(db), "--type", "malformed_json", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    assert {line["type"] for line in lines} == {"malformed_json"}
    assert lines[0]["time"] >= lines[1]["time"]  # newest first
    assert all(line["ip"] == "127.0.0.1" and line["app_id"] == APP_ID for line in lines)

    config = tmp_path / "bastion.toml"
    config.write_text(f'[audit]\npath = "{db}"\n')
    text = await asyncio.to_thread(cli, "--config", str(config), "--since", "1h", "--limit", "1")
    assert text.returncode == 0, text.stderr
    [line] = text.stdout.splitlines()
    assert "not_an_object" in line and "ip=127.0.0.1" in line and f"app={APP_ID}" in line

    config.write_text("[audit]\nretention_days = -1\n")
    invalid = await asyncio.to_thread(cli, "--config", str(config))
    assert invalid.returncode == 2 and "config error" in invalid.stderr

    missing = await asyncio.to_thread(cli, "--db", str(tmp_path / "none.sqlite3"))
    assert missing.returncode == 1 and "no audit log" in missing.stderr
    assert not (tmp_path / "none.sqlite3").exists()

    bad_since = await asyncio.to_thread(cli, "--db", str(db), "--since", "yesterday")
    assert bad_since.returncode == 2


async def test_audit_disabled_writes_nothing(tmp_path: Path, start_node: StartNode) -> None:
    db = tmp_path / "audit.sqlite3"
    node = await start_node(db, enabled=False)
    assert node.audit is None
    assert node._audit_refusal not in node.refusals.summaries
    client = await open_client(node.port)
    await client.send("{")
    await client.recv()
    await client.close()
    await node.stop()
    assert not db.exists()


async def test_each_start_records_its_config_and_names_what_changed(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    loop = asyncio.get_running_loop()

    async def start_and_stop(settings: Any) -> None:
        node = Node(settings, loop)
        await node.start()
        await node.stop()

    await start_and_stop(audit_settings(db))
    await start_and_stop(audit_settings(db))
    looser = audit_settings(db).model_copy(deep=True)
    data = looser.model_dump()
    data["apps"][0]["max_client_events_per_second"] = 500
    for app in data["apps"]:
        app["secret"] = app["secret"].get_secret_value()
    await start_and_stop(settings_from_mapping(data, environ={}))

    third, second, first = query(db, type="config_loaded")
    assert first.severity == "info" and "no earlier configuration" in first.message
    assert second.severity == "info" and second.message.endswith("unchanged since the last start")
    assert third.severity == "warning"
    assert third.message == f"Configuration changed: apps.{APP_ID}"
    assert third.metadata["changed"] == f"apps.{APP_ID}"
