"""The security admin API (``/api/security``) on a real in-process node.

Every test connects from 127.0.0.1, which is in the default ``[admin] allow_from``;
"a peer outside it" is made by naming another network. Each node has its own audit
log and blocks file under ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from support.clients import APP_ID, APP_KEY, APP_SECRET, HttpResult, http_request, served
from support.timeouts import until, within

from bastion.config import settings_from_mapping
from bastion.server.runtime import Node
from bastion.store.audit import query
from bastion.store.blocks import list_active

from .conftest import RunNode

TOKEN = "admin-token-0123456789abcdefghijklmnopq"
BEARER = f"Authorization: Bearer {TOKEN}"
METRICS_TOKEN = "metrics-token-0123456789abcdefghijklmn"
CLUSTER_SECRET = "cluster-secret-0123456789abcdefghijklm"

StartNode = Callable[..., Awaitable[Node]]


def admin_settings(state: Path, admin: dict[str, Any] | None, **reputation: Any) -> Any:
    return settings_from_mapping(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "audit": {"path": str(state / "audit.sqlite3")},
            "metrics": {"token": METRICS_TOKEN},
            "admin": admin if admin is not None else {"token": TOKEN},
            "security": {
                "reputation": {
                    "store_path": str(state / "blocks.sqlite3"),
                    "sync_seconds": 30,
                    **reputation,
                }
            },
            "apps": [
                {
                    "id": APP_ID,
                    "key": APP_KEY,
                    "secret": APP_SECRET,
                    "jwt": {"algorithms": ["HS256"], "secret": CLUSTER_SECRET + "-jwt"},
                }
            ],
        },
        environ={},
    )


@pytest.fixture
async def start_node(tmp_path: Path, run_node: RunNode) -> AsyncIterator[StartNode]:
    count = 0

    async def factory(admin: dict[str, Any] | None = None, **reputation: Any) -> Node:
        nonlocal count
        count += 1
        state = tmp_path / f"node{count}"
        state.mkdir()
        return await run_node(admin_settings(state, admin, **reputation))

    yield factory


async def call(
    node: Node,
    method: str,
    route: str,
    body: Any = None,
    headers: tuple[str, ...] = (BEARER,),
) -> HttpResult:
    data = b"" if body is None else json.dumps(body).encode()
    result = await http_request(node.port, method, f"/api/security/{route}", data, headers)
    assert result.headers["content-type"] == "application/json"
    assert result.headers["cache-control"] == "no-store"
    return result


async def audited(node: Node, count: int, **filters: Any) -> None:
    """Wait until the audit log accounts for ``count`` matching events.

    Repeated refusals are written as one row with their ``count`` when their
    minute ends; the open ones are written now, as a stop would.
    """
    path = node.settings.audit.path
    node.refusals.flush_all()

    async def enough() -> bool:
        try:
            events = query(path, limit=1000, **filters)
        except Exception:
            return False
        return sum(int(event.metadata.get("count") or 1) for event in events) >= count

    await until(enough)


async def test_every_get_route_answers_with_the_token(start_node: StartNode) -> None:
    node = await start_node()
    for route in ("openapi.json", "health", "metrics", "dashboard", "report", "config"):
        result = await call(node, "GET", route)
        assert result.status == 200, (route, result.body)
        assert isinstance(result.json(), dict)
    assert (await call(node, "GET", "openapi.json")).json()["openapi"] == "3.1.0"
    health = (await call(node, "GET", "health")).json()
    assert health["ready"] is True and health["checks"]["serving"] == "ok"
    metrics = (await call(node, "GET", "metrics")).json()
    assert metrics["connections"] == {APP_ID: 0}
    assert metrics["bus"]["driver"] == "local"
    report = (await call(node, "GET", "report?since=1h")).json()
    assert report["audit"] is True
    result = await call(node, "GET", "audit-logs?limit=10")
    assert result.status == 200
    assert result.json()["limit"] == 10


async def test_refused_without_or_with_a_wrong_token(start_node: StartNode) -> None:
    node = await start_node()
    cases: list[tuple[str, ...]] = [
        (),
        ("Authorization: Bearer not-the-token-0123456789abcdefghijkl",),
        (f"Authorization: Basic {TOKEN}",),
        (BEARER, BEARER),
    ]
    for headers in cases:
        result = await call(node, "GET", "health", headers=headers)
        assert result.status == 401
        assert result.json()["reason"] == "admin_unauthorized"
        assert result.headers["www-authenticate"].startswith("Bearer")
    # An unknown admin path is refused the same way: no route is revealed.
    assert (await call(node, "GET", "nothing-here", headers=())).status == 401
    assert node.metrics.refusals[("admin_unauthorized", "")] == 5
    await audited(node, 5, type="admin_unauthorized")


async def test_refused_from_a_peer_outside_allow_from(start_node: StartNode) -> None:
    node = await start_node(admin={"token": TOKEN, "allow_from": ["10.0.0.0/8"]})
    result = await call(node, "GET", "health")
    assert (result.status, result.json()["reason"]) == (401, "admin_unauthorized")


async def test_404_when_no_token_is_configured(start_node: StartNode) -> None:
    node = await start_node(admin={})
    for route in ("health", "openapi.json", "config"):
        result = await http_request(node.port, "GET", f"/api/security/{route}", headers=(BEARER,))
        assert result.status == 404
    assert node.metrics.refusals[("admin_unauthorized", "")] == 0


async def test_unknown_path_and_wrong_method(start_node: StartNode) -> None:
    node = await start_node()
    result = await call(node, "GET", "nothing-here")
    assert (result.status, result.json()["reason"]) == (404, "path_not_found")
    result = await call(node, "POST", "health", body={})
    assert result.status == 405 and result.headers["allow"] == "GET"


async def request_from(source: str, node: Node, method: str, target: str, body: bytes) -> int:
    """One request from local address ``source``; its status."""
    reader, writer = await within(
        asyncio.open_connection("127.0.0.1", node.port, local_addr=(source, 0))
    )
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {source}\r\nConnection: close\r\n{BEARER}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    try:
        raw = await within(reader.read())
    finally:
        writer.close()
    return int(raw.split(b" ", 2)[1])


async def test_block_ip_drops_new_connections_until_unblocked(
    start_node: StartNode,
) -> None:
    # 127.0.0.2 is loopback too: the operator unblocks from there once 127.0.0.1 is out.
    node = await start_node(admin={"token": TOKEN, "allow_from": ["127.0.0.0/8"]}, never_block=[])
    assert await served(node.port)
    result = await call(
        node, "POST", "block-ip", {"ip": "127.0.0.1", "ttl_seconds": 600, "reason": "test"}
    )
    assert result.status == 200, result.body
    block = result.json()["block"]
    assert (block["ip"], block["source"], block["reason"]) == ("127.0.0.1", "manual", "test")
    # In force at once on this node: a new TCP connection gets nothing.
    assert not await served(node.port)
    await audited(node, 1, type="ip_blocked_manual")

    body = json.dumps({"ip": "127.0.0.1"}).encode()
    status = await request_from("127.0.0.2", node, "POST", "/api/security/unblock-ip", body)
    assert status == 200
    assert await served(node.port)
    await audited(node, 1, type="ip_unblocked")
    assert node.blocklist is not None and node.blocklist.active_blocks() == []


async def test_block_and_unblock_another_address(start_node: StartNode) -> None:
    node = await start_node()
    result = await call(node, "POST", "block-ip", {"ip": "::ffff:192.0.2.7"})
    assert result.status == 200, result.body
    assert result.json()["block"]["ip"] == "192.0.2.7"
    dashboard = (await call(node, "GET", "dashboard")).json()
    assert [b["ip"] for b in dashboard["blocks"]] == ["192.0.2.7"]
    await audited(node, 1, type="ip_blocked_manual")
    assert node.blocklist is not None
    path = node.settings.security.reputation.store_path

    async def stored() -> bool:
        return [b.ip for b in list_active(path, now=0)] == ["192.0.2.7"]

    await until(stored)

    result = await call(node, "POST", "unblock-ip", {"ip": "192.0.2.7"})
    assert result.json() == {"unblocked": True, "ip": "192.0.2.7"}
    result = await call(node, "POST", "unblock-ip", {"ip": "192.0.2.7"})
    assert result.json() == {"unblocked": False, "ip": "192.0.2.7"}
    await audited(node, 1, type="ip_unblocked")

    async def lifted() -> bool:
        return list_active(path, now=0) == []

    await until(lifted)


async def test_block_ip_refuses_never_block_and_bad_bodies(start_node: StartNode) -> None:
    node = await start_node()  # loopback is in the default never_block
    result = await call(node, "POST", "block-ip", {"ip": "127.0.0.1"})
    assert (result.status, result.json()["parameter"]) == (400, "ip")
    result = await http_request(
        node.port, "POST", "/api/security/block-ip", b"{not json", (BEARER,)
    )
    assert (result.status, result.json()["parameter"]) == (400, "body")
    assert await served(node.port)


async def test_audit_log_pages_are_disjoint(start_node: StartNode) -> None:
    node = await start_node()
    for n in range(7):
        await call(node, "POST", "block-ip", {"ip": f"192.0.2.{n + 1}"})
    await audited(node, 7, type="ip_blocked_manual")
    ids: list[str] = []
    offset: int | None = 0
    pages = 0
    while offset is not None:
        page = (
            await call(node, "GET", f"audit-logs?type=ip_blocked_manual&limit=3&offset={offset}")
        ).json()
        assert page["limit"] == 3 and page["offset"] == offset
        ids += [event["id"] for event in page["events"]]
        offset = page["next_offset"]
        pages += 1
    assert pages == 3
    assert len(ids) == len(set(ids)) == 7
    page = (await call(node, "GET", "audit-logs?since=1h&ip=192.0.2.3&severity=warning")).json()
    assert [event["ip"] for event in page["events"]] == ["192.0.2.3"]
    assert page["next_offset"] is None
    report = (await call(node, "GET", "report?since=1h")).json()
    assert report["audit"] is True
    result = await call(node, "GET", "audit-logs?limit=0")
    assert (result.status, result.json()["parameter"]) == (400, "limit")


async def test_report_counts_refusals(start_node: StartNode) -> None:
    node = await start_node()
    for _ in range(3):
        await call(node, "GET", "health", headers=())
    await audited(node, 3, type="admin_unauthorized")
    report = (await call(node, "GET", "report?since=1h")).json()
    assert report["top_ips"] == [{"ip": "127.0.0.1", "count": 3}]
    assert report["top_reasons"] == [{"reason": "admin_unauthorized", "count": 3}]
    dashboard = (await call(node, "GET", "dashboard")).json()
    assert {"reason": "admin_unauthorized", "count": 3} in dashboard["top_refusals"]
    assert len(dashboard["recent_events"]) >= 3


async def test_config_dump_has_no_secret(start_node: StartNode) -> None:
    node = await start_node()
    result = await call(node, "GET", "config")
    assert result.status == 200
    for secret in (TOKEN, METRICS_TOKEN, APP_SECRET, CLUSTER_SECRET):
        assert secret.encode() not in result.body
    config = result.json()
    assert config["admin"]["token"] == "[redacted]"
    assert config["apps"][0]["secret"] == "[redacted]"
    assert config["apps"][0]["jwt"]["secret"] == "[redacted]"


async def test_put_config_needing_a_restart_is_409(start_node: StartNode) -> None:
    node = await start_node()
    result = await call(node, "PUT", "config", {"server": {"port": 1}})
    assert result.status == 409
    assert result.json()["fields"] == ["server.port"]
    assert node.settings.server.port == 0  # nothing applied


async def test_the_token_is_never_logged(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node = await start_node()
    await call(node, "GET", "health")
    await call(node, "GET", "health", headers=(f"Authorization: Bearer {TOKEN}x",))
    await call(node, "GET", "config")
    await call(node, "POST", "block-ip", {"ip": "192.0.2.1", "reason": "probe"})
    await call(node, "POST", "unblock-ip", {"ip": "192.0.2.1"})
    await audited(node, 1, type="ip_unblocked")
    assert caplog.records
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in str(record.__dict__)
    events = query(node.settings.audit.path, limit=100)
    assert events and all(TOKEN not in str(event) for event in events)
