"""What a live reload sees as changed, and what it refuses to apply without a restart."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.config import Settings, settings_from_mapping
from bastion.server.reload import RESTART_ONLY, RestartRequired, changed_fields, restart_fields

SECRET = "app-secret-0123456789-reload-unit"
ROTATED = "app-secret-9876543210-reload-unit"


def settings(**sections: Any) -> Settings:
    apps = sections.pop("apps", [{"id": "1", "key": "key-1", "secret": SECRET}])
    return settings_from_mapping({**sections, "apps": apps}, environ={})


def app(**fields: Any) -> dict[str, Any]:
    return {"id": "1", "key": "key-1", "secret": SECRET, **fields}


def test_the_same_settings_change_nothing() -> None:
    assert changed_fields(settings(), settings()) == []


def test_fields_are_named_by_path_apps_by_id() -> None:
    old = settings(apps=[app(), {"id": "2", "key": "key-2", "secret": SECRET}])
    new = settings(
        server={"max_connections": 10},
        security={"new_connections_per_ip": {"rate": 1, "burst": 50}},
        apps=[
            app(allowed_origins=["https://a.example.com"], secret=ROTATED),
            {"id": "3", "key": "key-3", "secret": SECRET},
        ],
    )
    assert changed_fields(old, new) == [
        "server.max_connections",
        "security.new_connections_per_ip.rate",
        "apps.1.secret",
        "apps.1.allowed_origins",
        "+apps.3",
        "-apps.2",
    ]


def test_a_changed_secret_is_named_never_shown() -> None:
    changed = changed_fields(settings(), settings(apps=[app(secret=ROTATED)]))
    assert changed == ["apps.1.secret"]
    assert not any(SECRET in path or ROTATED in path for path in changed)


@pytest.mark.parametrize(
    ("sections", "refused"),
    [
        ({"server": {"port": 7001}}, ["server.port"]),
        ({"server": {"host": "0.0.0.0"}}, ["server.host"]),
        ({"audit": {"retention_days": 3}}, ["audit.retention_days"]),
        ({"webhooks": {"queue_path": "other.sqlite3"}}, ["webhooks.queue_path"]),
        ({"security": {"reputation": {"threshold": 5.0}}}, ["security.reputation.threshold"]),
        ({"adapter": {"prefix": "other"}}, ["adapter.prefix"]),
    ],
)
def test_restart_only_fields_are_refused(sections: dict[str, Any], refused: list[str]) -> None:
    old = settings()
    changed = changed_fields(old, settings(**sections))
    assert restart_fields(old, changed) == refused


@pytest.mark.parametrize(
    "sections",
    [
        {"server": {"activity_timeout": 30, "drain_seconds": 2.5, "max_connections": 5}},
        {"security": {"trusted_proxies": ["10.0.0.0/8"], "max_connections_per_ip": 3}},
        {"metrics": {"allow_from": ["10.0.0.0/8"]}},
        {"admin": {"token": "admin-token-0123456789abcdefghijklmnop"}},
        {"apps": [app(enabled=False, max_event_payload_kb=20)]},
        {"apps": [app(webhooks=[{"url": "http://127.0.0.1:9/hook"}])]},
        {"apps": [app(), {"id": "2", "key": "key-2", "secret": SECRET}]},
    ],
)
def test_live_fields_are_not_refused(sections: dict[str, Any]) -> None:
    old = settings()
    changed = changed_fields(old, settings(**sections))
    assert changed
    assert restart_fields(old, changed) == []


def test_with_redis_the_app_set_and_derived_bus_key_need_a_restart() -> None:
    adapter = {"driver": "redis", "url": "redis://127.0.0.1:6379/0"}
    old = settings(adapter=adapter)
    new = settings(
        adapter=adapter,
        apps=[
            app(secret=ROTATED, max_event_payload_kb=20, allowed_origins=["https://a.b.c"]),
            {"id": "2", "key": "key-2", "secret": SECRET},
        ],
    )
    assert restart_fields(old, changed_fields(old, new)) == [
        "apps.1.secret",
        "apps.1.max_event_payload_kb",
        "+apps.2",
    ]
    # With its own cluster secret, the bus key does not depend on the app secrets.
    keyed = {**adapter, "cluster_secret": "cluster-secret-0123456789abcdefghij"}
    old, new = settings(adapter=keyed), settings(adapter=keyed, apps=[app(secret=ROTATED)])
    assert restart_fields(old, changed_fields(old, new)) == []


def test_restart_required_names_fields_only() -> None:
    error = RestartRequired(["server.port", "audit.path"])
    assert error.fields == ("server.port", "audit.path")
    assert str(error) == "needs a restart: server.port, audit.path"
    assert {"server.host", "server.port", "server.tls", "adapter"} <= set(RESTART_ONLY)
