"""Every metric the shipped rules and dashboard use exists in a real ``/metrics`` scrape.

A real ``bastion serve`` with every optional part on (the redis adapter, the audit
log, blocks, webhooks, alerts with a URL), so every family it can export is in
the scrape; a family counted only on an event (a histogram, say) is present
from its ``# TYPE`` line even before its first sample. A name in the rules or the
dashboard that the node does not export (a typo, a renamed metric) fails here.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.redis_server import RedisServer
from support.server import DEFAULT_APP, REPO_ROOT, BastionProcess
from support.timeouts import scaled

from .names import NOT_BASTION, metric_names, scrape_names

RULES = REPO_ROOT / "deploy" / "prometheus" / "bastion-rules.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "bastion-dashboard.json"
OBSERVABILITY = REPO_ROOT / "docs" / "observability.md"
ALERT_SECRET = "names-alert-secret-0123456789abcdefghij"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def rule_names() -> set[str]:
    names: set[str] = set()
    for group in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            names |= metric_names(rule["expr"])
    return names


def dashboard_names() -> set[str]:
    names: set[str] = set()
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            names |= metric_names(target["expr"])
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            names |= metric_names(query["query"])
    return names


def documented_names() -> set[str]:
    """The metrics docs/observability.md documents (first cell of its tables)."""
    return set(re.findall(r"^\| `(bastion_[a-z0-9_]+)` \|", OBSERVABILITY.read_text(), re.M))


def test_the_rules_the_dashboard_and_the_docs_match_a_real_scrape(
    make_bastion: Callable[..., BastionProcess], tmp_path: Path, redis_url: str
) -> None:
    state = tmp_path
    server = make_bastion(
        apps=[{**DEFAULT_APP, "webhooks": [{"url": "http://127.0.0.1:9/hook"}]}],
        adapter={"driver": "redis", "url": redis_url, "prefix": "names-test"},
        audit={"path": f"{state}/audit.sqlite3"},
        webhooks={"queue_path": f"{state}/webhooks.sqlite3"},
        security={"reputation": {"store_path": f"{state}/blocks.sqlite3"}},
        alerts={"url": "http://127.0.0.1:9/alerts", "secret": ALERT_SECRET},
    )
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=scaled(10)) as answer:
        text = answer.read().decode()
    exported = scrape_names(text)
    used = (rule_names() | dashboard_names()) - NOT_BASTION
    assert used, "no metric name found in the deploy files"
    missing = sorted(used - exported)
    assert not missing, f"used by deploy/ but not exported by a real node: {missing}"

    # docs/observability.md documents every family, by the name PromQL uses.
    families = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
    }
    documented = documented_names()
    assert not families - documented, f"undocumented: {sorted(families - documented)}"
    assert not documented - families, f"documented, not exported: {sorted(documented - families)}"
