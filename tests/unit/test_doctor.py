"""bastion doctor's checklist: each check passes, warns or fails on the right configs."""

from __future__ import annotations

import base64
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest

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
    assert failures == {
        "apps.12345.secret",
        "apps.67890.secret",
        "apps.67890.jwt.secret",
        "alerts.secret",
    }


ADMIN_TOKEN = "Vq7-mZ2xR9kLp4TwYc8NbH3sJd6FgQ1e"
METRICS_TOKEN = "r4Kc9XwT2pLm7QzVb1HsNd8JyG3fEa6U"
CLUSTER_SECRET = "e7Q2wLk9ZrX4cVb8NmT1pHs6JdG3yFa5"
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


def test_admin_token_passes_on_loopback_or_over_tls() -> None:
    remote = {"token": ADMIN_TOKEN, "allow_from": ["10.0.0.0/8"]}
    good = {
        # loopback peers only (the default allow_from), even on a public address
        "loopback peers only": _settings(
            server={"host": "0.0.0.0"}, security={}, admin={"token": ADMIN_TOKEN}
        ),
        # remote peers, but TLS served by the node
        "over TLS only": _settings(
            server={"host": "0.0.0.0", "tls": CERT}, security={}, admin=remote
        ),
        # a loopback listener cannot be reached from 10/8 at all
        "listens on loopback": _settings(security={}, admin=remote),
    }
    for words, settings in good.items():
        finding = _by_check(examine(settings))["admin"]
        assert finding.level == "pass", settings.admin
        assert words in finding.message, finding.message
    off = _by_check(examine(_settings()))["admin"]
    assert off.level == "pass" and "off" in off.message


def test_admin_token_on_a_public_plain_listener_is_in_clear_even_with_a_proxy() -> None:
    # Issue #11: host 0.0.0.0 without TLS was reported "remote peers reach it over TLS
    # only" as soon as trusted_proxies was set. Peers in 10/8 connect directly, in clear.
    remote = {"token": ADMIN_TOKEN, "allow_from": ["10.0.0.0/8"]}
    finding = _by_check(examine(_settings(server={"host": "0.0.0.0"}, admin=remote)))["admin"]
    assert finding.level == "fail"
    assert "TLS only" not in finding.message
    assert "10.0.0.0/8" in finding.message and "in clear" in finding.message
    # Only the proxy itself may call it: the proxy-to-node hop is plain TCP.
    hop = _settings(
        server={"host": "0.0.0.0"},
        security={"trusted_proxies": ["10.0.0.2/32"]},
        admin={"token": ADMIN_TOKEN, "allow_from": ["10.0.0.2/32"]},
    )
    finding = _by_check(examine(hop))["admin"]
    assert finding.level == "warn" and "in clear" in finding.message
    assert "TLS only" not in finding.message


def test_metrics_token_on_a_public_plain_listener_with_a_proxy_warns() -> None:
    exposed = _settings(server={"host": "0.0.0.0"}, metrics={"token": METRICS_TOKEN})
    finding = _by_check(examine(exposed))["metrics"]
    assert finding.level == "warn" and "in clear" in finding.message
    assert "never sent in clear" not in finding.message


@pytest.mark.parametrize(
    "admin",
    [
        # the proxy on this host makes every client it forwards a loopback peer
        {"token": ADMIN_TOKEN},
        # any proxy at all: the admin API is one location block away from the internet
        {"token": ADMIN_TOKEN, "allow_from": ["::1/128"]},
    ],
)
def test_admin_api_behind_a_reverse_proxy_warns_to_deny_it_there(admin: dict[str, Any]) -> None:
    findings = _by_check(examine(_settings(admin=admin)))
    finding = findings["admin.proxy"]
    assert finding.level == "warn"
    assert "/api/security" in finding.message and "/dashboard" in finding.message
    assert ADMIN_TOKEN not in finding.message
    if admin.get("allow_from") is None:
        assert "127.0.0.1/32" in finding.message  # the shared address is named
    # No token: the admin API is off, nothing to reach. No proxy: nothing forwards.
    assert "admin.proxy" not in _by_check(examine(_settings()))
    assert "admin.proxy" not in _by_check(examine(_settings(security={}, admin=admin)))


WEAK_TOKENS = [
    "a" * 32,
    "ab" * 16,
    "0123456789abcdefghijklmnopqrstuv",
    "admin-token-0123456789abcdefghijklmnopq",
    "changeme-changeme-changeme-changeme",
    "your-metrics-token-goes-here-please",
    "placeholder-value-with-32-chars-x",
    "Kq7x" * 8,
]


@pytest.mark.parametrize("token", WEAK_TOKENS)
def test_weak_or_placeholder_tokens_and_cluster_secret_fail_without_printing_them(
    token: str,
) -> None:
    cases = {
        "admin.token": _settings(admin={"token": token}, security={}),
        "metrics.token": _settings(metrics={"token": token}),
        "adapter.cluster_secret": _settings(
            adapter={
                "driver": "redis",
                "url": "redis://127.0.0.1:6379/0",
                "cluster_secret": token,
            }
        ),
        "alerts.secret": _settings(alerts={"url": "https://ops.example.com/a", "secret": token}),
    }
    for check, settings in cases.items():
        findings = examine(settings)
        finding = _by_check(findings)[check]
        assert finding.level == "fail", (check, token)
        assert worst(findings) == "fail"
        assert token not in finding.message and token not in str(findings)


def test_strong_tokens_and_cluster_secret_pass() -> None:
    settings = _settings(
        admin={"token": ADMIN_TOKEN},
        security={},
        metrics={"token": METRICS_TOKEN},
        adapter={
            "driver": "redis",
            "url": "redis://127.0.0.1:6379/0",
            "cluster_secret": CLUSTER_SECRET,
        },
    )
    findings = _by_check(examine(settings))
    for check in ("admin.token", "metrics.token", "adapter.cluster_secret"):
        assert findings[check].level == "pass", findings[check]


@pytest.mark.parametrize("field", ["trusted_proxies", "never_block"])
@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "0.0.0.0/1", "2000::/3", "8.0.0.0/7"])
def test_trusting_or_never_blocking_the_internet_fails(field: str, network: str) -> None:
    section: dict[str, Any] = (
        {"trusted_proxies": [network]}
        if field == "trusted_proxies"
        else {"trusted_proxies": ["127.0.0.1/32"], "reputation": {"never_block": [network]}}
    )
    check = "security.trusted_proxies" if field == "trusted_proxies" else "security.never_block"
    findings = examine(_settings(security=section))
    finding = _by_check(findings)[check]
    assert finding.level == "fail", (field, network)
    assert network in finding.message
    assert worst(findings) == "fail"


@pytest.mark.parametrize("field", ["trusted_proxies", "never_block"])
def test_wide_public_ranges_warn_and_private_ones_pass(field: str) -> None:
    def finding(networks: list[str]) -> Finding:
        section: dict[str, Any] = (
            {"trusted_proxies": networks}
            if field == "trusted_proxies"
            else {"trusted_proxies": ["127.0.0.1/32"], "reputation": {"never_block": networks}}
        )
        check = "security.trusted_proxies" if field == "trusted_proxies" else "security.never_block"
        return _by_check(examine(_settings(security=section)))[check]

    wide = finding(["127.0.0.1/32", "104.16.0.0/13"])
    assert wide.level == "warn" and "104.16.0.0/13" in wide.message
    assert finding(["2400:cb00::/28"]).level == "warn"
    for internal in (["10.0.0.0/8"], ["fc00::/7"], ["127.0.0.1/32", "::1/128"], ["192.0.2.7"]):
        assert finding(internal).level == "pass", internal


def test_tokens_in_urls_warn() -> None:
    jwt = {"algorithms": ["HS256"], "secret": GOOD_SECRET, "allow_query_token": True}
    finding = _by_check(examine(_settings({"jwt": jwt})))["apps.1.jwt.allow_query_token"]
    assert finding.level == "warn" and "log" in finding.message
    off = {**jwt, "allow_query_token": False}
    assert "apps.1.jwt.allow_query_token" not in _by_check(examine(_settings({"jwt": off})))


def test_metrics_token_in_clear_fails_and_over_tls_passes() -> None:
    exposed = _settings(server={"host": "0.0.0.0"}, security={}, metrics={"token": METRICS_TOKEN})
    finding = _by_check(examine(exposed))["metrics"]
    assert finding.level == "fail" and METRICS_TOKEN not in finding.message
    tls = _settings(
        server={"host": "0.0.0.0", "tls": CERT}, security={}, metrics={"token": METRICS_TOKEN}
    )
    assert _by_check(examine(tls))["metrics"].level == "pass"
    assert "metrics" not in _by_check(examine(_settings()))


def test_random_tokens_are_not_mistaken_for_weak_ones() -> None:
    # Seeded, so the run is repeatable: 500 hex and 500 base64url tokens of the
    # sizes people generate (openssl rand -hex 32, secrets.token_urlsafe(32)).
    generator = random.Random(11)
    for _ in range(500):
        raw = generator.randbytes(32)
        for token in (raw.hex(), base64.urlsafe_b64encode(raw).decode().rstrip("=")):
            settings = _settings(admin={"token": token}, security={})
            assert _by_check(examine(settings))["admin.token"].level == "pass", token


def test_alerts_off_or_sent_in_clear_warn() -> None:
    assert _by_check(examine(_settings()))["alerts"].level == "pass"
    assert _by_check(examine(_settings(alerts={"enabled": False})))["alerts"].level == "warn"
    clear = _settings(alerts={"url": "http://ops.example.com/a", "secret": ADMIN_TOKEN})
    assert _by_check(examine(clear))["alerts.url"].level == "warn"
    local = _settings(alerts={"url": "http://127.0.0.1:9000/a", "secret": ADMIN_TOKEN})
    assert _by_check(examine(local))["alerts"].level == "pass"
    assert _by_check(examine(local))["alerts.secret"].level == "pass"
