"""The config_loaded audit event: fingerprints per part, changes named, secrets never hashed."""

from __future__ import annotations

from typing import Any

from bastion.config import settings_from_mapping
from bastion.security.config_audit import CONFIG_LOADED, config_event, fingerprints


def _settings(**app: Any) -> Any:
    base = {"id": "1", "key": "k", "secret": "first-secret-value"}
    return settings_from_mapping({"apps": [{**base, **app}]}, environ={})


def test_first_start_records_every_part_without_changes() -> None:
    prints = fingerprints(_settings())
    assert set(prints) == {"server", "adapter", "audit", "security", "apps.1"}
    event = config_event(prints, None, id="e1", time=10.0)
    assert event.type == CONFIG_LOADED and event.severity == "info"
    assert event.metadata["changed"] == ""
    assert event.metadata["part:apps.1"] == prints["apps.1"]
    assert "no earlier configuration" in event.message


def test_same_config_is_unchanged_and_a_changed_limit_is_named() -> None:
    first = config_event(fingerprints(_settings()), None, id="e1", time=1.0)
    same = config_event(fingerprints(_settings()), first.metadata, id="e2", time=2.0)
    assert same.severity == "info" and same.metadata["changed"] == ""
    looser = config_event(
        fingerprints(_settings(max_client_events_per_second=1000)), first.metadata, id="e3", time=3
    )
    assert looser.severity == "warning"
    assert looser.metadata["changed"] == "apps.1"
    assert looser.message == "Configuration changed: apps.1"


def test_added_and_removed_apps_are_named() -> None:
    one = _settings()
    two = settings_from_mapping(
        {"apps": [{"id": "2", "key": "k2", "secret": "another-secret-1"}]}, environ={}
    )
    event = config_event(
        fingerprints(two),
        config_event(fingerprints(one), None, id="a", time=1).metadata,
        id="b",
        time=2,
    )
    assert event.metadata["changed"] == "+apps.2,-apps.1"


def test_secret_values_do_not_enter_the_fingerprint() -> None:
    # Same shape, different secret: the fingerprint cannot tell (nothing about it leaks).
    assert fingerprints(_settings()) == fingerprints(_settings(secret="a-different-secret"))
    rotated = fingerprints(_settings(previous_secrets=[{"secret": "older-secret-value"}]))
    assert rotated["apps.1"] != fingerprints(_settings())["apps.1"]
