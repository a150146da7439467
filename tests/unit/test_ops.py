"""The ``/metrics`` collector, its access check and the ``/readyz`` checks, on a fake node.

The fake node is the :class:`~bastion.api.ops.NodeView` surface only: real
settings and a hand-filled :class:`~bastion.metrics.Metrics`, plain objects for
the hub, the audit log and the blocklist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastion.api.ops import AUDIT_FAILURE_WINDOW_SECONDS, Ops
from bastion.api.templates import TEMPLATES
from bastion.config import Settings, settings_from_mapping
from bastion.metrics import Metrics

APP_SECRET = "main-app-secret-value"
OTHER_SECRET = "other-app-secret-value"
TOKEN = "metrics-token-0123456789abcdefghijkl"
CLUSTER_SECRET = "cluster-secret-0123456789abcdefghijkl"
REDIS_PASSWORD = "redis-password-value"


def make_settings(**tables: Any) -> Settings:
    document: dict[str, Any] = {
        "apps": [
            {"id": "app-1", "key": "key-1", "secret": APP_SECRET},
            {"id": "app-2", "key": "key-2", "secret": OTHER_SECRET},
        ],
        "metrics": {"token": TOKEN},
        **tables,
    }
    return settings_from_mapping(document, environ={})


REDIS = {
    "driver": "redis",
    "url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0",
    "cluster_secret": CLUSTER_SECRET,
}


@dataclass
class FakeApp:
    id: str
    connections: int = 0


@dataclass
class FakeBus:
    healthy: bool = True


@dataclass
class FakeHub:
    apps_by_id: dict[str, FakeApp]
    deliveries: int = 0
    bus: FakeBus = field(default_factory=FakeBus)


@dataclass
class FakeContext:
    draining: bool = False


@dataclass
class FakeAudit:
    dropped: int = 0
    failed: int = 0


@dataclass
class FakeBlockSet:
    until: list[float]

    def active(self, now: float) -> list[float]:
        return [until for until in self.until if until > now]


@dataclass
class FakeBlockList:
    blocks: FakeBlockSet


@dataclass
class FakeNode:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    hub: FakeHub = field(
        default_factory=lambda: FakeHub({"app-1": FakeApp("app-1"), "app-2": FakeApp("app-2")})
    )
    ctx: FakeContext = field(default_factory=FakeContext)
    audit: FakeAudit | None = None
    blocklist: FakeBlockList | None = None
    webhook_queue: object | None = None
    webhook_dispatcher: object | None = None
    cluster_limits: FakeClusterLimits | None = None


@dataclass
class FakeClusterLimits:
    healthy: bool = True
    syncs: int = 0
    failures: int = 0


def filled_node(settings: Settings | None = None) -> FakeNode:
    node = FakeNode(settings or make_settings(adapter=REDIS))
    node.hub.apps_by_id["app-1"].connections = 3
    node.hub.deliveries = 42
    m = node.metrics
    m.connections_opened["app-1"] = 5
    m.connections_closed[("app-1", 4200)] = 2
    m.connections_closed[("app-1", 1000)] = 1
    m.messages_in["app-1"] = 7
    m.events_published["app-2"] = 4
    m.frames_discarded["app-1"] = 14
    m.bytes_discarded["app-1"] = 140_000
    m.refusals[("malformed_json", "app-1")] = 2
    m.refusals[("auth_signature", "app-2")] = 3
    m.refusals[("subscribe_auth_invalid", "app-1")] = 1
    m.refusals[("ip_rate_limited", "")] = 6
    m.refusals[("client_event_rate", "app-1")] = 8
    m.refusals[("metrics_forbidden", "")] = 1
    m.webhooks_delivered["app-1"] = 9
    m.webhook_attempts_failed["app-1"] = 2
    m.webhooks_dead["app-1"] = 1
    m.webhooks_dropped["app-2"] = 1
    m.webhook_queue_pending = 11
    m.webhooks_in_flight = 2
    m.bus_connected = 1
    m.bus_connects = 2
    m.bus_published["app-1"] = 12
    m.bus_received["app-2"] = 13
    m.bus_dropped["backlog"] = 4
    m.bus_forged["bad_signature"] = 5
    m.config_reloads["applied"] = 2
    m.config_reloads["restart_required"] = 1
    m.connection_seconds.observe(("app-1", 1000), 42.0)
    m.connection_seconds.observe(("app-1", 4100), 3.0)
    m.connection_rates.observe("app-1", 30.0)
    m.connection_rates.observe("app-1", 0.0)
    m.reconnects[("app-1", "address")] = 2
    m.message_bytes.observe("app-1", 100)
    m.request_answered("/apps/{app_id}/events", "app-1", 200, 0.003)
    m.request_answered("/metrics", None, 200, 0.0002)
    m.webhook_seconds.observe("app-1", 0.2)
    m.webhook_attempts.observe("app-1", 3)
    m.loop_lag.observe("", 0.004)
    m.alerts[("auth_failures", "warning")] = 1
    node.cluster_limits = FakeClusterLimits(healthy=True, syncs=30, failures=1)
    node.audit = FakeAudit(dropped=1, failed=0)
    node.blocklist = FakeBlockList(FakeBlockSet([1.0, 10**12, 10**12]))
    return node


def scrape(node: FakeNode) -> tuple[str, dict[str, dict[tuple[tuple[str, str], ...], float]]]:
    """The exposition text, and each family's samples keyed by sorted labels."""
    response = Ops(node).exposition()
    assert response.status == 200
    text = response.body.decode()
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = (
                sample.value
            )
    return text, families


def test_exposition_reads_every_family() -> None:
    _, f = scrape(filled_node())
    assert f["bastion_connections_current"] == {
        (("app", "app-1"),): 3,
        (("app", "app-2"),): 0,
    }
    assert f["bastion_connections_opened_total"][(("app", "app-1"),)] == 5
    assert f["bastion_connections_closed_total"] == {
        (("app", "app-1"), ("code", "1000")): 1,
        (("app", "app-1"), ("code", "4200")): 2,
    }
    assert f["bastion_messages_in_total"][(("app", "app-1"),)] == 7
    assert f["bastion_events_published_total"][(("app", "app-2"),)] == 4
    assert f["bastion_deliveries_total"] == {(): 42}
    assert f["bastion_frames_discarded_total"] == {
        (("app", "app-1"),): 14,
        (("app", "app-2"),): 0,
    }
    assert f["bastion_bytes_discarded_total"][(("app", "app-1"),)] == 140_000
    refusals = f["bastion_refusals_total"]
    assert refusals[(("app", "app-1"), ("reason", "malformed_json"))] == 2
    assert refusals[(("app", ""), ("reason", "ip_rate_limited"))] == 6
    assert refusals[(("app", ""), ("reason", "metrics_forbidden"))] == 1
    # auth_signature (REST) and subscribe_auth_invalid (WebSocket) are auth failures.
    assert f["bastion_auth_failures_total"] == {(("app", "app-1"),): 1, (("app", "app-2"),): 3}
    assert f["bastion_rate_limit_hits_total"] == {
        (("app", ""), ("reason", "ip_rate_limited")): 6,
        (("app", "app-1"), ("reason", "client_event_rate")): 8,
    }
    assert f["bastion_blocked_ips"] == {(): 2}  # the expired block is not counted
    assert f["bastion_webhooks_delivered_total"][(("app", "app-1"),)] == 9
    assert f["bastion_webhook_attempts_failed_total"][(("app", "app-1"),)] == 2
    assert f["bastion_webhooks_dead_total"][(("app", "app-1"),)] == 1
    assert f["bastion_webhooks_dropped_total"][(("app", "app-2"),)] == 1
    assert f["bastion_webhook_queue_pending"] == {(): 11}
    assert f["bastion_webhooks_in_flight"] == {(): 2}
    assert f["bastion_bus_connected"] == {(): 1}
    assert f["bastion_bus_connects_total"] == {(): 2}
    assert f["bastion_bus_published_total"][(("app", "app-1"),)] == 12
    assert f["bastion_bus_received_total"][(("app", "app-2"),)] == 13
    assert f["bastion_bus_dropped_total"] == {(("reason", "backlog"),): 4}
    assert f["bastion_bus_forged_total"] == {(("reason", "bad_signature"),): 5}
    assert f["bastion_audit_events_dropped_total"] == {(): 1}
    assert f["bastion_audit_events_failed_total"] == {(): 0}
    assert f["bastion_config_reloads_total"] == {
        (("result", "applied"),): 2,
        (("result", "restart_required"),): 1,
    }
    assert f["bastion_cluster_limits_connected"] == {(): 1}
    assert f["bastion_cluster_limits_syncs_total"] == {(): 30}
    assert f["bastion_cluster_limits_failures_total"] == {(): 1}


def test_label_values_are_app_ids_slugs_codes_and_reasons_only() -> None:
    _, f = scrape(filled_node())
    app_ids = {"app-1", "app-2", ""}
    for name, series in f.items():
        for labels in series:
            for key, value in labels:
                assert key in {
                    "app",
                    "reason",
                    "code",
                    "result",
                    "check",
                    "le",
                    "code_class",
                    "route",
                    "status_class",
                    "match",
                    "alert",
                    "severity",
                }, (name, key)
                if key == "app":
                    assert value in app_ids, (name, value)
                elif key == "code":
                    assert value.isdigit(), (name, value)
                elif key == "le":
                    assert value == "+Inf" or float(value) >= 0, (name, value)
                elif key == "route":
                    assert value in TEMPLATES, (name, value)
                else:
                    assert value.replace("_", "").isalnum() and value.islower(), (name, value)


def test_unknown_apps_and_odd_words_never_become_labels() -> None:
    node = filled_node()
    node.metrics.refusals[("malformed_json", "<script>alert(1)</script>")] = 1
    node.metrics.messages_in["user-typed app id"] = 2
    node.metrics.bus_dropped["Bad Reason: 10.0.0.1"] = 3
    text, f = scrape(node)
    assert "<script>" not in text and "user-typed" not in text and "10.0.0.1" not in text
    # Counted, not lost: under app="" and reason="other".
    assert f["bastion_refusals_total"][(("app", ""), ("reason", "malformed_json"))] == 1
    assert f["bastion_messages_in_total"][(("app", ""),)] == 2
    assert f["bastion_bus_dropped_total"][(("reason", "other"),)] == 3


def test_no_secret_in_the_exposition() -> None:
    text, _ = scrape(filled_node())
    for secret in (APP_SECRET, OTHER_SECRET, TOKEN, CLUSTER_SECRET, REDIS_PASSWORD, "key-1"):
        assert secret not in text


def test_bus_connected_only_with_a_bus_and_nothing_absent_is_invented() -> None:
    node = filled_node(make_settings())
    node.audit = None
    node.blocklist = None
    _, f = scrape(node)
    assert "bastion_bus_connected" not in f
    assert "bastion_blocked_ips" not in f
    node.cluster_limits = None
    _, f = scrape(node)
    assert "bastion_cluster_limits_connected" not in f
    assert "bastion_audit_events_dropped_total" not in f


def test_two_nodes_in_one_process_do_not_collide() -> None:
    first, second = filled_node(), filled_node()
    second.hub.deliveries = 1
    assert scrape(first)[1]["bastion_deliveries_total"] == {(): 42}
    assert scrape(second)[1]["bastion_deliveries_total"] == {(): 1}


# --- access ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "authorization", "allowed"),
    [
        pytest.param("127.0.0.1", [], True, id="loopback"),
        pytest.param("::1", [], True, id="loopback-v6"),
        pytest.param("192.0.2.9", [], False, id="stranger"),
        pytest.param(None, [], False, id="no-peer"),
        pytest.param("192.0.2.9", [f"Bearer {TOKEN}"], True, id="token"),
        pytest.param("192.0.2.9", [f"bearer  {TOKEN} "], True, id="token-scheme-case"),
        pytest.param("192.0.2.9", [f"Bearer {TOKEN}x"], False, id="token-longer"),
        pytest.param("192.0.2.9", [f"Bearer {TOKEN[:-1]}"], False, id="token-shorter"),
        pytest.param("192.0.2.9", [f"Basic {TOKEN}"], False, id="basic"),
        pytest.param("192.0.2.9", [TOKEN], False, id="no-scheme"),
        pytest.param("192.0.2.9", [f"Bearer {TOKEN}"] * 2, False, id="two-headers"),
        pytest.param("192.0.2.9", ["Bearer jeton-\u00e9\u00e8"], False, id="not-ascii"),
    ],
)
def test_may_scrape(peer: str | None, authorization: list[str], allowed: bool) -> None:
    ops = Ops(FakeNode(make_settings()))
    assert ops.may_scrape(peer, authorization) is allowed


def test_no_token_configured_means_allow_from_only() -> None:
    ops = Ops(FakeNode(make_settings(metrics={"allow_from": ["10.0.0.0/8"]})))
    assert ops.may_scrape("10.1.2.3", [])
    assert not ops.may_scrape("127.0.0.1", [])
    assert not ops.may_scrape("192.0.2.9", ["Bearer "])


def test_disabled_refuses_everyone() -> None:
    ops = Ops(FakeNode(make_settings(metrics={"enabled": False, "token": TOKEN})))
    assert not ops.enabled
    assert not ops.may_scrape("127.0.0.1", [f"Bearer {TOKEN}"])


# --- readiness -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def readiness(ops: Ops) -> tuple[int, dict[str, Any]]:
    response = ops.readiness()
    return response.status, json.loads(response.body)


def test_ready_node() -> None:
    node = FakeNode(make_settings(adapter=REDIS))
    node.audit = FakeAudit()
    assert readiness(Ops(node)) == (
        200,
        {"ready": True, "checks": {"audit": "ok", "bus": "ok", "serving": "ok"}},
    )


def test_draining_is_not_ready() -> None:
    node = FakeNode(make_settings(audit={"enabled": False}))
    node.ctx.draining = True
    assert readiness(Ops(node)) == (503, {"ready": False, "checks": {"serving": "draining"}})


def test_closed_audit_log_is_not_ready() -> None:
    status, body = readiness(Ops(FakeNode(make_settings())))
    assert status == 503
    assert body["checks"]["audit"] == "closed"


def test_failed_audit_write_is_not_ready_for_a_while() -> None:
    clock = Clock()
    node = FakeNode(make_settings())
    node.audit = FakeAudit()
    ops = Ops(node, clock=clock)
    assert readiness(ops)[0] == 200
    node.audit.failed = 3
    assert readiness(ops) == (
        503,
        {"ready": False, "checks": {"audit": "write_failed", "serving": "ok"}},
    )
    clock.now += AUDIT_FAILURE_WINDOW_SECONDS - 1
    assert readiness(ops)[0] == 503
    clock.now += 1
    assert readiness(ops)[0] == 200  # no new failure within the window
    node.audit.failed = 4
    assert readiness(ops)[0] == 503


def test_disconnected_bus_is_not_ready() -> None:
    node = FakeNode(make_settings(adapter=REDIS, audit={"enabled": False}))
    node.hub.bus.healthy = False
    assert readiness(Ops(node)) == (
        503,
        {"ready": False, "checks": {"bus": "disconnected", "serving": "ok"}},
    )


def test_webhook_queue_checked_only_when_an_app_has_webhooks() -> None:
    plain = FakeNode(make_settings(audit={"enabled": False}))
    assert "webhook_queue" not in readiness(Ops(plain))[1]["checks"]
    settings = make_settings(
        audit={"enabled": False},
        apps=[
            {
                "id": "app-1",
                "key": "key-1",
                "secret": APP_SECRET,
                "webhooks": [{"url": "https://hooks.example.test/"}],
            }
        ],
    )
    node = FakeNode(settings)
    assert readiness(Ops(node)) == (
        503,
        {"ready": False, "checks": {"serving": "ok", "webhook_queue": "closed"}},
    )
    node.webhook_queue, node.webhook_dispatcher = object(), object()
    assert readiness(Ops(node))[0] == 200


def test_a_foreign_host_needs_the_token_even_from_an_allowed_address() -> None:
    ops = Ops(FakeNode(make_settings(metrics={"token": TOKEN})))
    assert not ops.may_scrape("127.0.0.1", [], host_ok=False)
    assert ops.address_allowed("127.0.0.1")  # the listener answers host_not_allowed
    assert ops.may_scrape("127.0.0.1", [f"Bearer {TOKEN}"], host_ok=False)
    assert ops.hosts.allows(["127.0.0.1:6001"]) and not ops.hosts.allows(["evil.example"])


# --- histograms, alerts, readiness --------------------------------------------------------


def buckets(series: dict[tuple[tuple[str, str], ...], float], **labels: str) -> dict[str, float]:
    """``le`` → cumulative count, for the series with ``labels``."""
    found = {}
    for key, value in series.items():
        others = dict(key)
        le = others.pop("le")
        if others == labels:
            found[le] = value
    return found


def test_histograms_are_exported_cumulative_with_their_sum_and_count() -> None:
    _, f = scrape(filled_node())
    duration = buckets(
        f["bastion_connection_duration_seconds_bucket"], app="app-1", code_class="normal"
    )
    assert duration["15.0"] == 0 and duration["60.0"] == 1 and duration["+Inf"] == 1
    assert (
        f["bastion_connection_duration_seconds_sum"][(("app", "app-1"), ("code_class", "normal"))]
        == 42.0
    )
    assert (
        f["bastion_connection_duration_seconds_count"][
            (("app", "app-1"), ("code_class", "backoff"))
        ]
        == 1
    )
    rates = buckets(f["bastion_connection_messages_per_minute_bucket"], app="app-1")
    assert rates["0.0"] == 1 and rates["30.0"] == 2  # 0 a minute, then 30 a minute
    assert f["bastion_reconnects_total"] == {(("app", "app-1"), ("match", "address")): 2}
    assert f["bastion_message_size_bytes_count"] == {(("app", "app-1"),): 1}
    routes = f["bastion_rest_request_duration_seconds_count"]
    assert routes == {
        (("route", "/apps/{app_id}/events"), ("status_class", "2xx")): 1,
        (("route", "/metrics"), ("status_class", "2xx")): 1,
    }
    assert f["bastion_publish_fanout_seconds_count"] == {(("app", "app-1"),): 1}
    assert f["bastion_webhook_delivery_seconds_count"] == {(("app", "app-1"),): 1}
    attempts = buckets(f["bastion_webhook_attempts_bucket"], app="app-1")
    assert attempts["2.0"] == 0 and attempts["3.0"] == 1
    lag = buckets(f["bastion_event_loop_lag_seconds_bucket"])
    assert lag["0.0025"] == 0 and lag["0.005"] == 1
    assert f["bastion_alerts_total"] == {(("alert", "auth_failures"), ("severity", "warning")): 1}


def test_histogram_labels_stay_bounded_whatever_was_counted() -> None:
    node = filled_node()
    m = node.metrics
    m.connection_seconds.observe(("user-typed app id", 3999), 1.0)
    m.request_seconds.observe(("/apps/12345/channels/secret-channel", 200), 0.1)
    m.publish_seconds.observe("<script>", 0.1)
    text, f = scrape(node)
    assert "user-typed" not in text and "secret-channel" not in text and "<script>" not in text
    assert (
        f["bastion_connection_duration_seconds_count"][(("app", ""), ("code_class", "other"))] == 1
    )
    assert (
        f["bastion_rest_request_duration_seconds_count"][
            (("route", "other"), ("status_class", "2xx"))
        ]
        == 1
    )
    assert f["bastion_publish_fanout_seconds_count"][(("app", ""),)] == 1


def test_alert_deliveries_are_counted_apart_from_the_apps_webhooks() -> None:
    node = filled_node()
    m = node.metrics
    m.webhooks_delivered["@alerts"] = 2
    m.webhooks_dead["@alerts"] = 1
    m.webhook_seconds.observe("@alerts", 0.5)
    _, f = scrape(node)
    assert f["bastion_alert_deliveries_total"] == {
        (("result", "delivered"),): 2,
        (("result", "failed"),): 0,
        (("result", "dead"),): 1,
        (("result", "dropped"),): 0,
    }
    assert (("app", ""),) not in f["bastion_webhooks_delivered_total"]
    assert f["bastion_webhooks_dead_total"][(("app", "app-1"),)] == 1
    assert f["bastion_webhook_delivery_seconds_count"] == {(("app", "app-1"),): 1}


def test_alert_families_list_every_rule_from_the_start() -> None:
    from bastion.security.alerts import AlertEngine, AlertRule

    class FakeAlerts:
        def __init__(self) -> None:
            self.engine = AlertEngine(
                [
                    AlertRule("auth_failures", 1, 60, "warning"),
                    AlertRule("new_blocks", 1, 60, "critical"),
                ]
            )

        def open_alerts(self) -> list[Any]:
            return self.engine.open_alerts(0.5)

    node = filled_node()
    node.metrics.alerts.clear()
    node.alerts = FakeAlerts()  # type: ignore[attr-defined]
    node.alerts.engine.observe("new_blocks", 0.0)
    _, f = scrape(node)
    assert f["bastion_alerts_total"] == {
        (("alert", "auth_failures"), ("severity", "warning")): 0,
        (("alert", "new_blocks"), ("severity", "critical")): 0,
    }
    assert f["bastion_alerts_open"] == {
        (("alert", "auth_failures"),): 0,
        (("alert", "new_blocks"),): 1,
    }


def test_readiness_is_exported_as_gauges() -> None:
    node = FakeNode(make_settings(adapter=REDIS))
    node.audit = FakeAudit()
    _, f = scrape(node)
    assert f["bastion_ready"] == {(): 1}
    node.hub.bus.healthy = False
    _, f = scrape(node)
    assert f["bastion_ready"] == {(): 0}
    assert f["bastion_ready_check"] == {
        (("check", "audit"),): 1,
        (("check", "bus"),): 0,
        (("check", "serving"),): 1,
    }


def test_alerts_with_a_url_need_the_webhook_queue_to_be_ready() -> None:
    settings = make_settings(
        audit={"enabled": False},
        alerts={"url": "https://ops.example.test/alerts", "secret": "a" * 32},
    )
    node = FakeNode(settings)
    assert readiness(Ops(node))[1]["checks"]["webhook_queue"] == "closed"
    node.webhook_queue, node.webhook_dispatcher = object(), object()
    assert readiness(Ops(node))[0] == 200
