"""deploy/grafana/bastion-dashboard.json: an importable dashboard whose panels fit and query.

Grafana itself is not run here; the checks are what an import needs (unique ids, a
datasource variable, panels inside the 24-column grid without overlap) and that the
issue's views are present. That every metric it queries exists is checked against a
real scrape in ``test_metric_names.py``.
"""

from __future__ import annotations

import json
from typing import Any

from support.server import REPO_ROOT

from .names import metric_names

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "bastion-dashboard.json"


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in _dashboard()["panels"] if panel["type"] != "row"]


def test_it_is_an_importable_dashboard() -> None:
    board = _dashboard()
    assert board["uid"] == "bastion-overview" and board["title"]
    assert isinstance(board["schemaVersion"], int)
    variables = {item["name"]: item for item in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= set(variables)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], int] = {}
    for panel in _dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for column in range(pos["x"], pos["x"] + pos["w"]):
            for line in range(pos["y"], pos["y"] + pos["h"]):
                assert (column, line) not in cells, (panel["title"], cells.get((column, line)))
                cells[(column, line)] = panel["id"]


def test_every_query_uses_the_datasource_variable_and_the_node_filters() -> None:
    for panel in _panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert metric_names(target["expr"]), (panel["title"], target["expr"])
            assert 'job=~"$job"' in target["expr"], (panel["title"], target["expr"])
        if panel["type"] == "heatmap":
            (target,) = panel["targets"]
            assert target["format"] == "heatmap" and "_bucket" in target["expr"]


def test_the_issue_s_views_are_there() -> None:
    used = set().union(*(metric_names(t["expr"]) for p in _panels() for t in p["targets"]))
    heatmaps = {
        name.removesuffix("_bucket")
        for panel in _panels()
        if panel["type"] == "heatmap"
        for name in metric_names(panel["targets"][0]["expr"])
    }
    assert {
        "bastion_rest_request_duration_seconds",
        "bastion_publish_fanout_seconds",
        "bastion_connection_duration_seconds",
        "bastion_event_loop_lag_seconds",
        "bastion_webhook_delivery_seconds",
    } <= heatmaps
    assert {
        "bastion_connections_current",
        "bastion_messages_in_total",
        "bastion_refusals_total",
        "bastion_webhook_queue_pending",
        "bastion_bus_connected",
        "bastion_alerts_total",
        "bastion_alerts_open",
    } <= used
