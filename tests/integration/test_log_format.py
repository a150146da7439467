"""``bastion serve --log-format json`` and ``--log-level-for``, on a real server process.

The server is sent a REST call whose ``auth_signature`` is a real (wrongly keyed)
HMAC-SHA256 and a WebSocket sign-in with a wrongly keyed ``auth``: both are
refused and logged, and its stderr holds nothing but redacted JSON lines.
"""

from __future__ import annotations

import contextlib
import json
import socket
import uuid
from typing import Any

import pytest
from support.clients import (
    APP_KEY,
    OTHER_APP_SECRET,
    hmac_hex,
    http_request,
    open_client,
    signed_target,
)
from support.server import DEFAULT_APP, BastionProcess, config_toml

REDIS_URL = "redis://127.0.0.1:6379/0"
BODY = json.dumps({"name": "e", "channel": "c", "data": "{}"}).encode()


async def refuse_twice(server: BastionProcess) -> list[str]:
    """A badly signed REST call and a badly signed sign-in; return the signatures sent."""
    target = signed_target(
        "POST", f"/apps/{DEFAULT_APP['id']}/events", secret=OTHER_APP_SECRET, body=BODY
    )
    rest_signature = target.rsplit("auth_signature=", 1)[1]
    assert len(rest_signature) == 64
    response = await http_request(server.port, "POST", target, BODY)
    assert response.status == 401

    client = await open_client(server.port)
    user_data = '{"id":"u1"}'
    signin_signature = hmac_hex(OTHER_APP_SECRET, f"{client.socket_id}::user::{user_data}")
    auth = f"{APP_KEY}:{signin_signature}"
    await client.send({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}})
    closed = await client.closed()
    assert closed.code == 4009
    return [rest_signature, signin_signature, auth]


def parsed(stderr: str) -> list[dict[str, Any]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "the server logged nothing"
    return [json.loads(line) for line in lines]  # every line is one JSON object


async def test_json_logs_are_json_and_redacted(make_bastion: Any) -> None:
    server = make_bastion(extra_args=("--log-format", "json"))
    sent = await refuse_twice(server)
    server.stop()  # flushes and joins the stderr reader
    records = parsed(server.stderr_text)
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)
    refusals = [r for r in records if r["logger"] == "bastion.refusals"]
    assert {r["reason"] for r in refusals} >= {"auth_signature", "signin_invalid"}
    assert all(r["level"] == "WARNING" for r in refusals)
    assert all(r["message"].startswith("refused reason=") for r in refusals)
    for secret in (DEFAULT_APP["secret"], OTHER_APP_SECRET, *sent):
        assert secret not in server.output


async def test_log_level_for_silences_refusal_lines(make_bastion: Any) -> None:
    server = make_bastion(
        extra_args=("--log-format", "json", "--log-level-for", "bastion.refusals=error")
    )
    await refuse_twice(server)
    server.stop()
    text = server.stderr_text
    records = parsed(text) if text.strip() else []
    assert not [r for r in records if r["logger"] == "bastion.refusals"]
    assert "refused reason=" not in text


async def test_console_is_the_default_format(make_bastion: Any) -> None:
    server = make_bastion()
    sent = await refuse_twice(server)
    server.stop()
    refusals = [line for line in server.stderr_text.splitlines() if "bastion.refusals" in line]
    assert refusals and all(" WARNING bastion.refusals refused reason=" in r for r in refusals)
    for secret in (DEFAULT_APP["secret"], *sent):
        assert secret not in server.output


def _redis_reachable() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 6379), 1.0):
        return True
    return False


@pytest.mark.skipif(not _redis_reachable(), reason="no Redis on 127.0.0.1:6379")
async def test_workers_log_json_with_their_index(make_bastion: Any) -> None:
    adapter = {"driver": "redis", "url": REDIS_URL, "prefix": f"test-logs-{uuid.uuid4().hex}"}
    server = make_bastion(
        config_toml(adapter=adapter),
        extra_args=("--workers", "2", "--log-format", "json", "--log-level-for", "redis=error"),
    )
    for index in range(2):
        server.wait_for_output(rf'"message": "worker {index} listening')
    sent = await refuse_twice(server)
    server.stop()
    records = parsed(server.stderr_text)
    assert {r.get("worker") for r in records} >= {0, 1}
    refusals = [r for r in records if r["logger"] == "bastion.refusals"]
    assert refusals and all(r.get("worker") in (0, 1) for r in refusals)
    supervisor = [r for r in records if r["logger"] == "bastion.workers"]
    assert supervisor and all("worker" not in r for r in supervisor)
    for secret in (DEFAULT_APP["secret"], *sent):
        assert secret not in server.output
