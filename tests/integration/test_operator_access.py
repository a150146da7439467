"""Operator endpoints (admin API, dashboard, ``/metrics``) on a real in-process node.

They let a caller in by its address, so they decide on who the caller is: the
client a trusted proxy names, never the proxy's own (loopback) address, and
nobody for a request that says it was forwarded by no proxy we trust; and they
require a ``Host`` header naming this server (the DNS-rebinding guard). Wrong
admin tokens are failed authentications. Every test connects from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from support.clients import HttpResult, http_request
from support.timeouts import within

from bastion.config import AdminSettings, MetricsSettings
from bastion.server.refusals import RefusalRecord
from bastion.server.runtime import Node

from .conftest import RunNode, node_settings

SLOW = 0.001  # tokens per second: nothing refills during a test
TRUST_LOOPBACK = {"trusted_proxies": ["127.0.0.1/32"]}
ADMIN_TOKEN = "edge-admin-token-0123456789abcdefghijkl"
METRICS_TOKEN = "edge-metrics-token-0123456789abcdefghij"
BEARER = f"Authorization: Bearer {ADMIN_TOKEN}"


def capture(node: Node) -> list[RefusalRecord]:
    records: list[RefusalRecord] = []
    node.refusals.listeners.append(records.append)
    return records


def slugs(records: Sequence[RefusalRecord]) -> list[str]:
    return [record.reason.value.slug for record in records]


def xff(address: str) -> list[str]:
    return [f"X-Forwarded-For: {address}"]


async def start_ops_node(
    run_node: RunNode,
    state: Path,
    *,
    security: dict[str, Any] | None = None,
    admin: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Node:
    settings = node_settings(security=security, state_dir=state)
    settings = settings.model_copy(
        update={
            "admin": AdminSettings.model_validate({"token": ADMIN_TOKEN, **(admin or {})}),
            "metrics": MetricsSettings.model_validate(dict(metrics or {})),
        }
    )
    return await run_node(settings)


async def get(node: Node, path: str, *headers: str) -> HttpResult:
    return await http_request(node.port, "GET", path, headers=headers)


async def get_as(node: Node, host: str, path: str, *headers: str) -> HttpResult:
    """A GET whose only ``Host`` header is ``host`` (as a browser would send it)."""
    reader, writer = await within(asyncio.open_connection("127.0.0.1", node.port))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close", *headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        raw = await within(reader.read())
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    return HttpResult(int(lines[0].split(" ")[1]), fields, body)


async def test_admin_and_dashboard_through_a_proxy_decide_on_the_forwarded_client(
    run_node: RunNode, tmp_path: Path
) -> None:
    # The documented nginx setup: nginx on loopback, trusted, appending the client.
    node = await start_ops_node(run_node, tmp_path, security=TRUST_LOOPBACK)
    records = capture(node)
    internet = "X-Forwarded-For: 127.0.0.1, 203.0.113.5"  # a loopback claim, then nginx's hop
    refused = await get(node, "/api/security/health", BEARER, internet)
    assert (refused.status, refused.json()["reason"]) == (401, "admin_unauthorized")
    assert (await get(node, "/dashboard", internet)).status == 404
    assert (await get(node, "/metrics", internet)).status == 403
    assert {r.ip for r in records} == {"203.0.113.5"}
    # The operator on the host itself, directly or through the proxy, still gets in.
    assert (await get(node, "/api/security/health", BEARER)).status == 200
    assert (await get(node, "/api/security/health", BEARER, *xff("127.0.0.1"))).status == 200
    assert (await get(node, "/dashboard")).status == 200
    assert (await get(node, "/metrics")).status == 200


@pytest.mark.parametrize(
    ("security", "header"),
    [
        pytest.param({}, "X-Forwarded-For: 203.0.113.5", id="proxy-not-trusted"),
        pytest.param(
            {"forwarded_header": "forwarded", **TRUST_LOOPBACK},
            "X-Forwarded-For: 203.0.113.5",
            id="proxy-sets-another-header",
        ),
        pytest.param(TRUST_LOOPBACK, "X-Forwarded-For: unknown", id="nobody-named"),
    ],
)
async def test_a_forwarded_request_whose_client_nobody_names_is_not_loopback(
    run_node: RunNode, tmp_path: Path, security: dict[str, Any], header: str
) -> None:
    node = await start_ops_node(
        run_node, tmp_path, security=security, metrics={"token": METRICS_TOKEN}
    )
    assert (await get(node, "/api/security/health", BEARER, header)).status == 401
    assert (await get(node, "/dashboard", header)).status == 404
    assert (await get(node, "/metrics", header)).status == 403
    # A scrape through a proxy needs the token, as before.
    bearer = f"Authorization: Bearer {METRICS_TOKEN}"
    assert (await get(node, "/metrics", header, bearer)).status == 200


async def test_wrong_admin_tokens_are_failed_authentications(
    run_node: RunNode, tmp_path: Path
) -> None:
    node = await start_ops_node(
        run_node,
        tmp_path,
        security={"auth_failures_per_ip": {"rate": SLOW, "burst": 3}, **TRUST_LOOPBACK},
        admin={"allow_from": ["127.0.0.1/32", "198.51.100.0/24"]},
    )
    operator = xff("198.51.100.40")
    wrong = "Authorization: Bearer " + "x" * len(ADMIN_TOKEN)
    for _ in range(3):
        assert (await get(node, "/api/security/health", wrong, *operator)).status == 401
    assert node.blocklist is not None
    score = node.blocklist.reputation.score("198.51.100.40", time.time())
    assert score >= 29  # 10 points each, barely decayed
    # The budget is spent: even the right token waits, and says so.
    limited = await get(node, "/api/security/health", BEARER, *operator)
    assert (limited.status, limited.json()["reason"]) == (429, "auth_failure_limit")
    assert int(limited.headers["retry-after"]) >= 900
    assert limited.headers["cache-control"] == "no-store"
    # Loopback (never_block) is outside the budget; other operators are not affected.
    for _ in range(4):
        assert (await get(node, "/api/security/health", wrong)).status == 401
    assert (await get(node, "/api/security/health", BEARER)).status == 200
    other = xff("198.51.100.41")
    assert (await get(node, "/api/security/health", BEARER, *other)).status == 200
    assert node.metrics.refusal_count("admin_unauthorized") == 7


OPERATOR_PATHS = (("/metrics", ()), ("/dashboard", ()), ("/api/security/health", (BEARER,)))


async def test_a_dns_rebinding_page_reads_no_operator_endpoint(
    run_node: RunNode, tmp_path: Path
) -> None:
    node = await start_ops_node(run_node, tmp_path, metrics={"token": METRICS_TOKEN})
    records = capture(node)
    # A page on evil.example, its name re-pointed at 127.0.0.1, in a browser on this host.
    rebound = f"evil.example:{node.port}"
    for path, extra in OPERATOR_PATHS:
        answer = await get_as(node, rebound, path, *extra)
        assert (answer.status, answer.json()["reason"]) == (403, "host_not_allowed"), path
        assert b"bastion_" not in answer.body
    assert slugs(records) == ["host_not_allowed"] * 3
    # Two Host headers are ambiguous: refused too.
    assert (await get(node, "/metrics", f"Host: {rebound}")).status == 403
    # The names of this server pass: loopback names and addresses, with or without port.
    for host in ("localhost", f"localhost:{node.port}", "127.0.0.1", f"[::1]:{node.port}"):
        for path, extra in OPERATOR_PATHS:
            assert (await get_as(node, host, path, *extra)).status == 200, (host, path)
    # A scraper with the token is not asked for its Host.
    bearer = f"Authorization: Bearer {METRICS_TOKEN}"
    assert (await get_as(node, rebound, "/metrics", bearer)).status == 200


async def test_allowed_hosts_name_the_node_for_operators(run_node: RunNode, tmp_path: Path) -> None:
    node = await start_ops_node(
        run_node,
        tmp_path,
        admin={"allowed_hosts": ["bastion.internal"]},
        metrics={"allowed_hosts": ["metrics.internal"]},
    )
    for path, host, status in (
        ("/metrics", "metrics.internal:9100", 200),
        ("/metrics", "bastion.internal", 403),
        ("/dashboard", "bastion.internal", 200),
        ("/dashboard", "metrics.internal", 403),
    ):
        assert (await get_as(node, host, path)).status == status, (path, host)
