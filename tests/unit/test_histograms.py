"""The histograms counted in plain Python (bastion.metrics) and their bounded labels."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.api.templates import PUBLISH_TEMPLATES, TEMPLATES, request_route
from bastion.metrics import (
    MESSAGE_BYTES_BUCKETS,
    MESSAGE_BYTES_INDEX,
    MESSAGE_BYTES_SUM,
    MESSAGES_PER_MINUTE_BUCKETS,
    Histogram,
    Metrics,
    close_class,
    status_class,
)


def test_a_value_lands_in_the_first_bucket_whose_bound_holds_it() -> None:
    histogram: Histogram[str] = Histogram((1.0, 5.0, 10.0))
    for value in (0.5, 1.0, 1.0001, 5.0, 7.0, 10.0, 11.0, 1e9):
        histogram.observe("a", value)
    counts = histogram.by_key["a"]
    # le=1: 0.5 and 1.0 (a bound holds its own value); le=5: 1.0001, 5.0; le=10: 7, 10;
    # +Inf: 11, 1e9; then the sum.
    assert counts[:4] == [2, 2, 2, 2]
    assert counts[4] == pytest.approx(0.5 + 1.0 + 1.0001 + 5.0 + 7.0 + 10.0 + 11.0 + 1e9)


def test_series_are_per_key_and_a_kept_series_is_the_one_counted() -> None:
    histogram: Histogram[tuple[str, str]] = Histogram((1.0,))
    kept = histogram.series(("a", "x"))
    kept[0] += 1
    histogram.observe(("a", "x"), 3.0)
    histogram.observe(("b", "x"), 0.1)
    assert histogram.by_key[("a", "x")] == [1, 1, 3.0]
    assert histogram.by_key[("b", "x")] == [1, 0, 0.1]


def test_the_message_size_lookup_agrees_with_the_search() -> None:
    histogram: Histogram[str] = Histogram(MESSAGE_BYTES_BUCKETS, integer=True)
    for size in range(len(MESSAGE_BYTES_INDEX)):
        looked_up = [0] * (len(MESSAGE_BYTES_BUCKETS) + 2)
        looked_up[MESSAGE_BYTES_INDEX[size]] += 1
        looked_up[MESSAGE_BYTES_SUM] += size
        histogram.by_key.clear()
        histogram.observe("a", size)
        assert looked_up == histogram.by_key["a"], size


def test_an_integer_histogram_keeps_integers() -> None:
    histogram: Histogram[str] = Histogram((64, 128), integer=True)
    histogram.observe("a", 100)
    histogram.observe("a", 1000)
    counts = histogram.by_key["a"]
    assert counts == [0, 1, 1, 1100]
    assert all(type(value) is int for value in counts)


def test_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram((1.0, 1.0))
    with pytest.raises(ValueError, match="increasing"):
        Histogram((5.0, 1.0))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (1000, "normal"),
        (1001, "normal"),
        (1005, "normal"),
        (1006, "lost"),
        (1002, "protocol"),
        (1009, "protocol"),
        (1011, "protocol"),
        (4001, "error"),
        (4009, "error"),
        (4100, "backoff"),
        (4201, "reconnect"),
        (4200, "reconnect"),
        (3000, "other"),
        (4300, "other"),
        (0, "other"),
    ],
)
def test_close_codes_fall_into_a_few_classes(code: int, expected: str) -> None:
    assert close_class(code) == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, "2xx"), (204, "2xx"), (301, "3xx"), (404, "4xx"), (429, "4xx"), (503, "5xx")],
)
def test_status_classes(status: int, expected: str) -> None:
    assert status_class(status) == expected


@given(st.integers(min_value=-(10**6), max_value=10**6))
def test_every_status_and_close_code_gives_a_bounded_label(value: int) -> None:
    assert status_class(value) in {"2xx", "3xx", "4xx", "5xx", "other"}
    assert close_class(value) in {
        "normal",
        "lost",
        "protocol",
        "error",
        "backoff",
        "reconnect",
        "other",
    }


def test_a_closed_connection_counts_its_code_its_life_and_its_message_rate() -> None:
    metrics = Metrics()
    metrics.connection_closed("app", 1000, 120.0, 30)  # 30 messages in 2 minutes
    metrics.connection_closed("app", 4100, 0.2, 3)  # a short life counts as a second
    assert metrics.connections_closed == {("app", 1000): 1, ("app", 4100): 1}
    normal = metrics.connection_seconds.by_key[("app", 1000)]
    assert sum(normal[:-1]) == 1 and normal[-1] == 120.0
    backoff = metrics.connection_seconds.by_key[("app", 4100)]
    assert backoff[0] == 1  # le=1 s
    rates = metrics.connection_rates.by_key["app"]
    assert rates[-1] == pytest.approx(15.0 + 180.0)
    bounds = MESSAGES_PER_MINUTE_BUCKETS
    assert rates[bounds.index(30.0)] == 1  # 15 a minute: the le=30 bucket
    assert rates[bounds.index(300.0)] == 1  # 180 a minute: the le=300 bucket


def test_a_silent_connection_is_counted_at_zero_messages_a_minute() -> None:
    metrics = Metrics()
    metrics.connection_closed("app", 1006, 30.0, 0)
    assert metrics.connection_rates.by_key["app"][0] == 1  # the le=0 bucket


def test_only_an_accepted_publish_times_the_fan_out() -> None:
    metrics = Metrics()
    metrics.request_answered("/apps/{app_id}/events", "app", 200, 0.002)
    metrics.request_answered("/apps/{app_id}/events", "app", 401, 0.001)
    metrics.request_answered("/apps/{app_id}/channels", None, 200, 0.003)
    assert sum(metrics.publish_seconds.by_key["app"][:-1]) == 1
    assert set(metrics.request_seconds.by_key) == {
        ("/apps/{app_id}/events", 200),
        ("/apps/{app_id}/events", 401),
        ("/apps/{app_id}/channels", 200),
    }


@pytest.mark.parametrize(
    ("path", "template", "app_id"),
    [
        ("/apps/12345/events", "/apps/{app_id}/events", "12345"),
        ("/apps/12345/batch_events", "/apps/{app_id}/batch_events", "12345"),
        ("/apps/12345/channels", "/apps/{app_id}/channels", None),
        ("/apps/12345/channels/private-x", "/apps/{app_id}/channels/{channel}", None),
        ("/apps/1/channels/presence-x/users", "/apps/{app_id}/channels/{channel}/users", None),
        (
            "/apps/1/users/u-1/terminate_connections",
            "/apps/{app_id}/users/{user_id}/terminate_connections",
            None,
        ),
        ("/users/u-1/terminate_connections", "/users/{user_id}/terminate_connections", None),
        ("/apps/1/channels//users", "/apps/{app_id}/other", None),
        ("/apps/1/nothing", "/apps/{app_id}/other", None),
        ("/apps//events", "/apps/{app_id}/other", None),
        ("/apps/1/events/more", "/apps/{app_id}/other", None),
        ("/metrics", "/metrics", None),
        ("/readyz", "/readyz", None),
        ("/", "/", None),
        ("/api/security/dashboard", "/api/security/{route}", None),
        ("/dashboard/app.js", "/dashboard", None),
        ("/wp-login.php", "other", None),
        ("/users/a/b/terminate_connections", "other", None),
    ],
)
def test_paths_map_to_their_route_template(path: str, template: str, app_id: str | None) -> None:
    assert request_route(path) == (template, app_id)


@given(st.text(max_size=200))
def test_any_path_maps_to_a_known_template_never_to_itself(path: str) -> None:
    template, app_id = request_route("/" + path)
    assert template in TEMPLATES
    assert (app_id is not None) == (template in PUBLISH_TEMPLATES)
