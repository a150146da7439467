"""``/metrics`` and ``/readyz`` on a real in-process node.

Every test connects from 127.0.0.1, so "a peer outside ``allow_from``" is made by
emptying ``allow_from`` (or naming another address) rather than by moving the
client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.clients import APP_ID, APP_SECRET, OTHER_APP_SECRET, HttpResult, http_request

from bastion.config import MetricsSettings, WebhookDeliverySettings
from bastion.server.runtime import Node

from .conftest import Connect, MakeNode, RunNode, node_settings

TOKEN = "scrape-token-0123456789abcdefghijklmnop"
BEARER = f"Authorization: Bearer {TOKEN}"

MakeOpsNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_ops_node(tmp_path: Path, run_node: RunNode) -> AsyncIterator[MakeOpsNode]:
    """Factory: a node with ``[metrics]``, ``[security]`` and main-app overrides.

    Its audit log, blocks file and webhook queue live under ``tmp_path``.
    """
    nodes: list[Node] = []

    async def factory(
        metrics: Mapping[str, Any] | None = None,
        security: Mapping[str, Any] | None = None,
        app: Mapping[str, Any] | None = None,
    ) -> Node:
        state = tmp_path / f"node{len(nodes)}"
        state.mkdir()
        settings = node_settings(app=app, security=security, state_dir=state)
        # Each table validated on its own (the 32-character token rule), then swapped in.
        settings = settings.model_copy(
            update={
                "metrics": MetricsSettings.model_validate(dict(metrics or {})),
                "webhooks": WebhookDeliverySettings(queue_path=str(state / "webhooks.sqlite3")),
            }
        )
        node = await run_node(settings)
        nodes.append(node)
        return node

    yield factory


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(node: Node, *headers: str) -> HttpResult:
    return await http_request(node.port, "GET", "/metrics", headers=headers)


async def test_scrape_from_loopback_counts_a_connection_and_a_refusal(
    node: Node, connect: Connect
) -> None:
    client = await connect(node)
    await client.send("{")  # malformed JSON: pusher:error 4300, the socket stays open
    error = await client.expect("pusher:error")
    assert error["data"]["code"] == 4300
    result = await scrape(node)
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/plain")
    found = samples(result.body.decode())
    assert found[("bastion_connections_current", (("app", APP_ID),))] == 1
    assert found[("bastion_connections_opened_total", (("app", APP_ID),))] == 1
    assert found[("bastion_refusals_total", (("app", APP_ID), ("reason", "malformed_json")))] == 1
    assert found[("bastion_messages_in_total", (("app", APP_ID),))] >= 1
    assert ("bastion_blocked_ips", ()) in found
    # Every app label is a configured app id (or "" for refusals without an app).
    apps = {dict(labels).get("app") for _, labels in found} - {None}
    assert apps <= {APP_ID, "67890", ""}


async def test_scrape_holds_no_secret(make_ops_node: MakeOpsNode, connect: Connect) -> None:
    node = await make_ops_node({"token": TOKEN})
    await connect(node)
    result = await scrape(node, BEARER)
    assert result.status == 200
    for secret in (TOKEN, APP_SECRET, OTHER_APP_SECRET):
        assert secret.encode() not in result.body


async def test_peer_outside_allow_from_needs_the_token(
    make_ops_node: MakeOpsNode, logs: Any
) -> None:
    node = await make_ops_node({"allow_from": [], "token": TOKEN})
    refused = await scrape(node)
    assert refused.status == 403
    assert json.loads(refused.body)["reason"] == "metrics_forbidden"
    wrong = await scrape(node, "Authorization: Bearer " + "x" * len(TOKEN))
    assert wrong.status == 403
    basic = await scrape(node, f"Authorization: Basic {TOKEN}")
    assert basic.status == 403
    twice = await scrape(node, BEARER, BEARER)  # ambiguous: refused
    assert twice.status == 403
    allowed = await scrape(node, BEARER)
    assert allowed.status == 200
    assert node.metrics.refusal_count("metrics_forbidden") == 4
    found = samples(allowed.body.decode())
    assert found[("bastion_refusals_total", (("app", ""), ("reason", "metrics_forbidden")))] == 4
    logs.assert_refusal_logged("metrics_forbidden")
    assert not [r for r in logs.caplog.records if TOKEN in r.getMessage()]


async def test_without_a_token_configured_only_allow_from_scrapes(
    make_ops_node: MakeOpsNode,
) -> None:
    node = await make_ops_node({"allow_from": []})
    assert (await scrape(node)).status == 403
    assert (await scrape(node, "Authorization: Bearer ")).status == 403


async def test_access_decides_on_the_client_a_trusted_proxy_names(
    make_ops_node: MakeOpsNode, logs: Any
) -> None:
    # The TCP peer (loopback) is a trusted proxy and not in allow_from: the client it
    # names is who asks.
    node = await make_ops_node(
        {"allow_from": ["203.0.113.7/32"]}, security={"trusted_proxies": ["127.0.0.1/32"]}
    )
    forwarded = await scrape(node, "X-Forwarded-For: 203.0.113.7")
    assert forwarded.status == 200
    # A loopback claim names loopback, which is not allowed here; another client is not.
    claim = await scrape(node, "X-Forwarded-For: 127.0.0.1")
    assert claim.status == 403
    stranger = await scrape(node, "X-Forwarded-For: 198.51.100.1")
    assert stranger.status == 403
    # The refusal is attributed to the client the proxy named, like every refusal.
    assert node.metrics.refusals[("metrics_forbidden", "")] == 2
    assert [r for r in logs.refusals("metrics_forbidden") if "ip=198.51.100.1 " in r.getMessage()]


async def test_metrics_disabled_is_not_found(make_ops_node: MakeOpsNode) -> None:
    node = await make_ops_node({"enabled": False, "token": TOKEN})
    result = await scrape(node, BEARER)
    assert result.status == 404
    assert b"bastion_" not in result.body


async def test_metrics_other_method_is_refused(node: Node) -> None:
    result = await http_request(node.port, "POST", "/metrics")
    assert result.status == 405
    assert result.headers["allow"] == "GET"


async def test_scrapes_are_not_limited_by_the_rest_bucket(make_ops_node: MakeOpsNode) -> None:
    node = await make_ops_node(security={"rest_requests_per_ip": {"rate": 1, "burst": 1}})
    for _ in range(5):
        assert (await scrape(node)).status == 200
        assert (await http_request(node.port, "GET", "/readyz")).status == 200


async def test_refused_scrapes_spend_the_rest_bucket(make_ops_node: MakeOpsNode) -> None:
    node = await make_ops_node(
        {"allow_from": []}, security={"rest_requests_per_ip": {"rate": 1, "burst": 2}}
    )
    statuses = [(await scrape(node)).status for _ in range(4)]
    assert statuses[:2] == [403, 403]
    assert 429 in statuses[2:]


async def test_readyz_ok_then_503_while_draining(make_node: MakeNode) -> None:
    node = await make_node()
    ready = await http_request(node.port, "GET", "/readyz")
    assert ready.status == 200
    body = json.loads(ready.body)
    # The default test node has the audit log on (state_dir), no webhooks, no bus.
    assert body == {"ready": True, "checks": {"audit": "ok", "serving": "ok"}}
    node.ctx.draining = True
    try:
        draining = await http_request(node.port, "GET", "/readyz")
    finally:
        node.ctx.draining = False
    assert draining.status == 503
    assert json.loads(draining.body) == {
        "ready": False,
        "checks": {"audit": "ok", "serving": "draining"},
    }
    # Liveness is not readiness: /healthz stays 200 whatever the checks say.
    assert (await http_request(node.port, "GET", "/healthz")).status == 200


async def test_readyz_other_method_is_refused(node: Node) -> None:
    result = await http_request(node.port, "POST", "/readyz")
    assert result.status == 405


async def test_readyz_names_the_webhook_queue_when_webhooks_are_on(
    make_ops_node: MakeOpsNode,
) -> None:
    node = await make_ops_node(app={"webhooks": [{"url": "https://hooks.example.test/pusher"}]})
    result = await http_request(node.port, "GET", "/readyz")
    assert result.status == 200
    assert json.loads(result.body)["checks"] == {
        "audit": "ok",
        "serving": "ok",
        "webhook_queue": "ok",
    }


async def test_readyz_503_once_stop_has_begun(make_ops_node: MakeOpsNode) -> None:
    node = await make_ops_node()
    stopping = asyncio.create_task(node.stop())
    await asyncio.sleep(0)  # stop() has set draining and closed the listener
    assert node.ctx.ops is not None
    assert node.ctx.ops.readiness().status == 503
    await stopping
