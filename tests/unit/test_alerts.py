"""The alert thresholds (bastion.security.alerts): sliding windows on a clock we pass."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.config import settings_from_mapping
from bastion.errors import ConfigError
from bastion.protocol.refusals import Reason
from bastion.security.alerts import (
    AUTH_FAILURE_REASONS,
    BUCKETS_PER_WINDOW,
    DEFAULT_RULES,
    MAX_KEYS_PER_BUCKET,
    ORIGIN_REASONS,
    PAYLOAD_REASONS,
    RATE_LIMIT_REASONS,
    SECURITY_ALERT,
    SIGNALS,
    AlertEngine,
    AlertRule,
    alert_audit_event,
    alert_event,
    signal_of,
)


def engine(threshold: int = 5, window: float = 60.0, top: int = 3) -> AlertEngine:
    return AlertEngine([AlertRule("auth_failures", threshold, window, "warning")], top=top)


def test_the_event_that_reaches_the_threshold_raises_the_alert() -> None:
    alerts = engine(threshold=5)
    raised = [alerts.observe("auth_failures", 100.0 + i, address="198.51.100.9") for i in range(5)]
    assert raised[:4] == [None] * 4
    alert = raised[4]
    assert alert is not None
    assert (alert.rule, alert.severity, alert.count, alert.threshold) == (
        "auth_failures",
        "warning",
        5,
        5,
    )
    assert alert.raised_at == 104.0 and alert.until == 164.0
    assert alert.top_addresses == (("198.51.100.9", 5),)


def test_a_raised_rule_stays_quiet_for_its_window_then_raises_again_if_still_busy() -> None:
    alerts = engine(threshold=5, window=60)
    raised = [alerts.observe("auth_failures", 100.0 + i * 0.5) for i in range(200)]  # 100 s
    times = [alert.raised_at for alert in raised if alert is not None]
    # One per window: at the 5th event, then at the first event after it re-armed.
    assert times == [102.0, 162.0]


def test_a_rule_that_re_arms_below_its_threshold_stays_quiet() -> None:
    alerts = engine(threshold=5, window=60)
    for i in range(5):
        alerts.observe("auth_failures", 100.0 + i)
    assert alerts.observe("auth_failures", 200.0) is None  # the window holds 1 event now
    assert alerts.open_alerts(200.0) == []


def test_events_older_than_the_window_no_longer_count() -> None:
    alerts = engine(threshold=3, window=10)
    assert alerts.observe("auth_failures", 0.0) is None
    assert alerts.observe("auth_failures", 1.0) is None
    assert alerts.counts(5.0) == {"auth_failures": 2}
    assert alerts.observe("auth_failures", 20.0) is None  # the first two have left
    assert alerts.counts(20.0) == {"auth_failures": 1}


def test_counts_arrive_in_bulk_too() -> None:
    alerts = engine(threshold=10)
    assert alerts.observe("auth_failures", 0.0, count=9) is None
    alert = alerts.observe("auth_failures", 1.0, count=4, reason="auth_signature")
    assert alert is not None and alert.count == 13
    assert alert.top_reasons == (("auth_signature", 4),)


def test_an_alert_names_the_busiest_addresses_and_reasons_first() -> None:
    alerts = engine(threshold=10, top=2)
    for address, reason, count in (
        ("203.0.113.1", "auth_signature", 5),
        ("203.0.113.2", "auth_key", 3),
        ("203.0.113.3", "auth_signature", 1),
    ):
        for _ in range(count):
            alert = alerts.observe("auth_failures", 1.0, address=address, reason=reason)
    alert = alerts.observe("auth_failures", 2.0, address="203.0.113.2", reason="auth_key")
    assert alert is not None
    assert alert.top_addresses == (("203.0.113.1", 5), ("203.0.113.2", 4))
    assert alert.top_reasons == (("auth_signature", 6), ("auth_key", 4))


def test_a_flood_from_many_addresses_names_a_bounded_few() -> None:
    alerts = engine(threshold=10_000, window=60, top=5)
    for index in range(5_000):
        alerts.observe("auth_failures", 0.0, address=f"10.0.{index // 256}.{index % 256}")
    window = alerts._windows["auth_failures"]  # one bucket: every event at t=0
    assert len(window.buckets) == 1
    assert len(window.buckets[0].addresses) == MAX_KEYS_PER_BUCKET
    assert window.total == 5_000  # counted, if not named


def test_the_window_is_cut_into_a_bounded_number_of_buckets() -> None:
    alerts = engine(threshold=10**9, window=60)
    for i in range(6_000):
        alerts.observe("auth_failures", i * 0.1)
    assert len(alerts._windows["auth_failures"].buckets) <= BUCKETS_PER_WINDOW + 1


def test_signals_without_a_rule_are_ignored() -> None:
    alerts = engine(threshold=1)
    assert alerts.observe("new_blocks", 0.0) is None
    assert alerts.observe("auth_failures", 0.0, count=0) is None


def test_open_alerts_are_those_within_their_window() -> None:
    alerts = AlertEngine(
        [AlertRule("auth_failures", 1, 60, "warning"), AlertRule("new_blocks", 1, 10, "critical")]
    )
    alerts.observe("auth_failures", 100.0)
    alerts.observe("new_blocks", 105.0)
    assert [alert.rule for alert in alerts.open_alerts(106.0)] == ["new_blocks", "auth_failures"]
    assert [alert.rule for alert in alerts.open_alerts(116.0)] == ["auth_failures"]
    assert alerts.open_alerts(161.0) == []


@pytest.mark.parametrize(
    ("signal", "threshold", "window"),
    [("nope", 1, 1), ("auth_failures", 0, 1), ("new_blocks", 1, 0)],
)
def test_rules_are_validated(signal: str, threshold: int, window: float) -> None:
    with pytest.raises(ValueError):
        AlertRule(signal, threshold, window, "warning")


def test_two_rules_for_one_signal_are_refused() -> None:
    rule = AlertRule("auth_failures", 1, 1, "warning")
    with pytest.raises(ValueError, match="two rules"):
        AlertEngine([rule, rule])


@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=10), st.integers(min_value=1, max_value=50)),
        max_size=200,
    )
)
def test_at_most_one_alert_per_window_whatever_the_traffic(
    events: list[tuple[float, int]],
) -> None:
    alerts = engine(threshold=3, window=60)
    now, raised = 0.0, []
    for step, count in events:
        now += step
        alert = alerts.observe("auth_failures", now, count=count)
        if alert is not None:
            raised.append(alert.raised_at)
    assert all(later - earlier >= 60 for earlier, later in itertools.pairwise(raised))


# --- which refusal feeds which signal -------------------------------------------------


def test_the_signal_sets_do_not_overlap() -> None:
    sets = [set(AUTH_FAILURE_REASONS), RATE_LIMIT_REASONS, PAYLOAD_REASONS, ORIGIN_REASONS]
    for index, one in enumerate(sets):
        for other in sets[index + 1 :]:
            assert not one & other


@pytest.mark.parametrize(
    ("reason", "signal"),
    [
        (Reason.HTTP_SIGNATURE, "auth_failures"),
        (Reason.SUBSCRIBE_AUTH_INVALID, "auth_failures"),
        (Reason.HTTP_IP_RATE, "rate_limit_hits"),
        (Reason.CLIENT_EVENT_RATE, "rate_limit_hits"),
        (Reason.MALFORMED_JSON, "payload_refusals"),
        (Reason.CLIENT_EVENT_SCHEMA, "payload_refusals"),
        (Reason.HTTP_ORIGIN_REFUSED, "origin_refusals"),
        (Reason.PONG_TIMEOUT, None),
        (Reason.SLOW_CONSUMER, None),
    ],
)
def test_refusals_feed_their_signal(reason: Reason, signal: str | None) -> None:
    assert signal_of(reason) == signal


def test_every_default_rule_is_a_signal_once() -> None:
    assert [rule.signal for rule in DEFAULT_RULES] == list(SIGNALS)


# --- what an alert says -----------------------------------------------------------------


def test_the_alert_body_and_row_carry_counts_addresses_and_slugs_only() -> None:
    alerts = engine(threshold=2)
    alerts.observe("auth_failures", 10.0, address="203.0.113.5", reason="auth_signature")
    alert = alerts.observe("auth_failures", 11.0, address="203.0.113.5", reason="auth_key")
    assert alert is not None
    event = alert_event(alert, id="abc", node="node-1")
    assert event["name"] == SECURITY_ALERT
    assert event["top_addresses"] == [{"ip": "203.0.113.5", "count": 2}]
    assert event["top_reasons"] == [
        {"reason": "auth_key", "count": 1},
        {"reason": "auth_signature", "count": 1},
    ]
    json.dumps(event)  # plain JSON
    row = alert_audit_event(alert, id="abc")
    assert (row.type, row.severity, row.ip) == (SECURITY_ALERT, "warning", "203.0.113.5")
    assert row.metadata["alert"] == "auth_failures"
    assert row.metadata["top_addresses"] == "203.0.113.5=2"
    assert row.metadata["count"] == 2 and row.time == 11.0


# --- [alerts] ---------------------------------------------------------------------------


def test_alert_settings_keep_each_rules_own_values_for_what_is_unset() -> None:
    settings = settings_from_mapping(
        {
            "alerts": {
                "auth_failures": {"threshold": 7},
                "new_blocks": {"severity": "critical", "window_seconds": 30},
                "rate_limit_hits": {"enabled": False},
            }
        },
        environ={},
    )
    rules = {rule.signal: rule for rule in settings.alerts.rules()}
    assert rules["auth_failures"] == AlertRule("auth_failures", 7, 60.0, "warning")
    assert rules["new_blocks"] == AlertRule("new_blocks", 5, 30.0, "critical")
    assert "rate_limit_hits" not in rules
    assert rules["forged_bus_messages"].severity == "critical"


def test_an_alert_url_needs_a_secret_and_a_scheme() -> None:
    with pytest.raises(ConfigError, match="secret is required"):
        settings_from_mapping({"alerts": {"url": "https://ops.example.com/a"}}, environ={})
    with pytest.raises(ConfigError, match=r"alerts\.url"):
        settings_from_mapping(
            {"alerts": {"url": "ftp://ops.example.com/a", "secret": "s" * 32}}, environ={}
        )
    with pytest.raises(ConfigError, match=r"alerts\.secret"):
        settings_from_mapping(
            {"alerts": {"url": "https://ops.example.com/a", "secret": "short"}}, environ={}
        )


def test_an_unknown_rule_or_severity_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"alerts\.brute_force"):
        settings_from_mapping({"alerts": {"brute_force": {"threshold": 1}}}, environ={})
    with pytest.raises(ConfigError, match=r"alerts\.new_blocks\.severity"):
        settings_from_mapping({"alerts": {"new_blocks": {"severity": "page"}}}, environ={})
