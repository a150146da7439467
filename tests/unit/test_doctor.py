"""bastion doctor's checklist: each check passes, warns or fails on the right configs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from bastion.config import Settings, settings_from_mapping
from bastion.security.doctor import Finding, examine, worst

GOOD_SECRET = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
EXAMPLE = Path(__file__).resolve().parents[2] / "bastion.example.toml"


def _settings(app: dict[str, Any] | None = None, **sections: Any) -> Settings:
    base = {
        "id": "1",
        "key": "k",
        "secret": GOOD_SECRET,
        "allowed_origins": ["https://app.example.com"],
        "rest_requests": {"rate": 100, "burst": 200},
    }
    return settings_from_mapping(
        {
            "security": {"trusted_proxies": ["127.0.0.1/32"]},
            **sections,
            "apps": [{**base, **(app or {})}],
        },
        environ={},
    )


def _by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.check: finding for finding in findings}


def test_a_good_config_passes() -> None:
    findings = examine(_settings())
    assert worst(findings) == "pass", [f for f in findings if f.level != "pass"]


def test_weak_or_example_secrets_fail_without_printing_them() -> None:
    for secret in (
        "app-secret",
        "short-but-random-Xy7",
        "replace-me-with-32-random-bytes-hex",
        "a" * 64,
    ):
        findings = examine(_settings({"secret": secret}))
        finding = _by_check(findings)["apps.1.secret"]
        assert finding.level == "fail", secret
        assert secret not in finding.message
        assert worst(findings) == "fail"


def test_origins_star_fails_unset_and_broad_wildcards_warn() -> None:
    assert (
        _by_check(examine(_settings({"allowed_origins": ["*"]})))["apps.1.allowed_origins"].level
        == "fail"
    )
    unset = _settings({"allowed_origins": None})
    assert _by_check(examine(unset))["apps.1.allowed_origins"].level == "warn"
    broad = _by_check(examine(_settings({"allowed_origins": ["https://*.com"]})))
    assert broad["apps.1.allowed_origins"].level == "warn"
    assert "https://*.com" in broad["apps.1.allowed_origins"].message
    fine = _by_check(examine(_settings({"allowed_origins": ["https://*.example.com"]})))
    assert fine["apps.1.allowed_origins"].level == "pass"


def test_transport_audit_and_reputation() -> None:
    exposed = _by_check(examine(_settings(server={"host": "0.0.0.0"})))
    assert exposed["transport"].level == "warn"
    no_proxy = _by_check(examine(_settings(security={})))
    assert no_proxy["transport"].level == "warn"
    audit_off = examine(_settings(audit={"enabled": False}))
    assert _by_check(audit_off)["audit"].level == "fail" and worst(audit_off) == "fail"
    reputation_off = _settings(security={"reputation": {"enabled": False}})
    assert _by_check(examine(reputation_off))["security.reputation"].level == "warn"


def test_client_events_and_webhooks() -> None:
    chatty = _by_check(examine(_settings({"enable_client_messages": True})))
    assert chatty["apps.1.client_events"].level == "warn"
    listed = _settings({"enable_client_messages": True, "client_event_allowlist": ["client-a"]})
    assert _by_check(examine(listed))["apps.1.client_events"].level == "pass"
    clear = _settings({"webhooks": [{"url": "http://hooks.example.net/x"}]})
    assert _by_check(examine(clear))["apps.1.webhooks"].level == "warn"
    local = _settings({"webhooks": [{"url": "http://127.0.0.1:9000/x"}]})
    assert "apps.1.webhooks" not in _by_check(examine(local))


def test_the_shipped_example_fails_only_on_its_placeholder_secrets() -> None:
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    findings = examine(settings_from_mapping(data, environ={}))
    failures = {f.check for f in findings if f.level == "fail"}
    assert failures == {"apps.12345.secret", "apps.67890.secret", "apps.67890.jwt.secret"}


ADMIN_TOKEN = "admin-token-0123456789abcdefghijklmnopq"
METRICS_TOKEN = "metrics-token-0123456789abcdefghijklmn"
CERT = {"cert": "/etc/bastion/fullchain.pem", "key": "/etc/bastion/privkey.pem"}


def test_admin_token_open_to_the_network_without_tls_fails() -> None:
    bad = _settings(
        server={"host": "0.0.0.0"},
        security={},
        admin={"token": ADMIN_TOKEN, "allow_from": ["127.0.0.1/32", "10.0.0.0/8"]},
    )
    findings = examine(bad)
    finding = _by_check(findings)["admin"]
    assert finding.level == "fail" and worst(findings) == "fail"
    assert "10.0.0.0/8" in finding.message and "[server.tls]" in finding.message
    assert ADMIN_TOKEN not in finding.message


def test_admin_token_passes_on_loopback_over_tls_or_behind_a_proxy() -> None:
    remote = {"token": ADMIN_TOKEN, "allow_from": ["10.0.0.0/8"]}
    good = [
        # loopback peers only (the default allow_from), even on a public address
        _settings(server={"host": "0.0.0.0"}, security={}, admin={"token": ADMIN_TOKEN}),
        # remote peers, but TLS served by the node
        _settings(server={"host": "0.0.0.0", "tls": CERT}, security={}, admin=remote),
        # remote peers through a TLS-terminating proxy
        _settings(server={"host": "0.0.0.0"}, admin=remote),
        # a loopback listener cannot be reached from 10/8 at all
        _settings(security={}, admin=remote),
    ]
    for settings in good:
        assert _by_check(examine(settings))["admin"].level == "pass", settings.admin
    off = _by_check(examine(_settings()))["admin"]
    assert off.level == "pass" and "off" in off.message


def test_metrics_token_in_clear_fails_and_over_tls_passes() -> None:
    exposed = _settings(server={"host": "0.0.0.0"}, security={}, metrics={"token": METRICS_TOKEN})
    finding = _by_check(examine(exposed))["metrics.token"]
    assert finding.level == "fail" and METRICS_TOKEN not in finding.message
    tls = _settings(
        server={"host": "0.0.0.0", "tls": CERT}, security={}, metrics={"token": METRICS_TOKEN}
    )
    assert _by_check(examine(tls))["metrics.token"].level == "pass"
    assert "metrics.token" not in _by_check(examine(_settings()))
