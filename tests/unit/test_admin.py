"""The security admin API's pure parts: the OpenAPI document, redaction, the token
check and parameter validation (no server: a stand-in node with settings only)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

import jsonschema
import pytest
import schemathesis

from bastion.api.admin import REDACTED, AdminApi, AdminNodeView, redacted_config
from bastion.api.openapi import openapi_document
from bastion.api.ops import Ops
from bastion.config import Settings, settings_from_mapping
from bastion.server.reload import ReloadResult, RestartRequired, changed_fields

TOKEN = "admin-token-0123456789abcdefghijklmnopq"
APP_SECRET = "app-secret-0123456789-unit"
PREVIOUS_SECRET = "previous-secret-0123456789-unit"
JWT_SECRET = "jwt-secret-0123456789abcdefghijklmnopq"
CLUSTER_SECRET = "cluster-secret-0123456789abcdefghijklm"
METRICS_TOKEN = "metrics-token-0123456789abcdefghijklmn"
REDIS_PASSWORD = "redis-pass-0123456789"
HOOK_PASSWORD = "hook-pass-0123456789"
SECRETS = (
    TOKEN,
    APP_SECRET,
    PREVIOUS_SECRET,
    JWT_SECRET,
    CLUSTER_SECRET,
    METRICS_TOKEN,
    REDIS_PASSWORD,
    HOOK_PASSWORD,
)

ROUTES = {
    "/api/security/openapi.json": {"get"},
    "/api/security/health": {"get"},
    "/api/security/metrics": {"get"},
    "/api/security/audit-logs": {"get"},
    "/api/security/dashboard": {"get"},
    "/api/security/report": {"get"},
    "/api/security/block-ip": {"post"},
    "/api/security/unblock-ip": {"post"},
    "/api/security/config": {"get", "put"},
}


def every_secret_settings() -> Settings:
    """Settings with every kind of secret set."""
    return settings_from_mapping(
        {
            "adapter": {
                "driver": "redis",
                "url": f"redis://user:{REDIS_PASSWORD}@127.0.0.1:6379/0",
                "cluster_secret": CLUSTER_SECRET,
            },
            "metrics": {"token": METRICS_TOKEN},
            "admin": {"token": TOKEN},
            "apps": [
                {
                    "id": "1",
                    "key": "key-1",
                    "secret": APP_SECRET,
                    "previous_secrets": [{"secret": PREVIOUS_SECRET}],
                    "jwt": {"algorithms": ["HS256"], "secret": JWT_SECRET},
                    "webhooks": [{"url": f"https://hook:{HOOK_PASSWORD}@example.com/hook"}],
                }
            ],
        },
        environ={},
    )


def admin_for(settings: Settings) -> AdminApi:
    node = cast(AdminNodeView, SimpleNamespace(settings=settings, blocklist=None, audit=None))
    return AdminApi(node, cast(Ops, SimpleNamespace(checks=dict)), wall_clock=lambda: 1e9)


@pytest.fixture
def admin() -> AdminApi:
    # No audit log: these tests never read a file.
    settings = {"admin": {"token": TOKEN}, "audit": {"enabled": False}}
    return admin_for(settings_from_mapping(settings, environ={}))


# --- the OpenAPI document -------------------------------------------------------------


def test_openapi_document_is_openapi_31_with_every_route() -> None:
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    paths = document["paths"]
    assert set(paths) == set(ROUTES)
    for path, methods in ROUTES.items():
        assert set(paths[path]) == methods
        for method in methods:
            responses = paths[path][method]["responses"]
            assert "401" in responses
            for response in responses.values():
                assert "application/json" in response["content"]
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert document["security"] == [{"bearerAuth": []}]
    assert {"200", "400", "409"} <= set(paths["/api/security/config"]["put"]["responses"])
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_openapi_document_loads_in_schemathesis() -> None:
    schema = schemathesis.openapi.from_dict(openapi_document())
    found = {
        (result.ok().path, result.ok().method.lower()) for result in schema.get_all_operations()
    }
    assert found == {(path, method) for path, methods in ROUTES.items() for method in methods}


def test_openapi_document_is_a_fresh_copy() -> None:
    openapi_document()["paths"].clear()
    assert openapi_document()["paths"]


# --- redaction --------------------------------------------------------------------------


def test_config_dump_has_no_secret() -> None:
    settings = every_secret_settings()
    dumped = redacted_config(settings)
    text = json.dumps(dumped)
    for secret in SECRETS:
        assert secret not in text
    app = dumped["apps"][0]
    assert app["secret"] == REDACTED
    assert app["previous_secrets"][0]["secret"] == REDACTED
    assert app["jwt"]["secret"] == REDACTED
    assert dumped["adapter"]["cluster_secret"] == REDACTED
    assert dumped["metrics"]["token"] == REDACTED
    assert dumped["admin"]["token"] == REDACTED
    assert dumped["adapter"]["url"] == f"redis://user:{REDACTED}@127.0.0.1:6379/0"
    assert app["webhooks"][0]["url"] == f"https://hook:{REDACTED}@example.com/hook"
    # What is not secret is kept.
    assert app["key"] == "key-1"
    assert dumped["admin"]["allow_from"] == ["127.0.0.1/32", "::1/128"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw-123@h:6379/0", f"redis://:{REDACTED}@h:6379/0"),
        ("rediss://u:pw-123@h/1", f"rediss://u:{REDACTED}@h/1"),
        ("redis://pw-123@h", f"redis://{REDACTED}@h"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_url_credentials_are_redacted(url: str, shown: str) -> None:
    settings = settings_from_mapping({"adapter": {"url": url}}, environ={})
    assert redacted_config(settings)["adapter"]["url"] == shown


def test_config_route_has_no_secret() -> None:
    response = admin_for(every_secret_settings()).handle("GET", "/api/security/config", "", b"")
    assert response.status == 200
    for secret in SECRETS:
        assert secret.encode() not in response.body


# --- the token check ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "headers", "allowed"),
    [
        ("127.0.0.1", [f"Bearer {TOKEN}"], True),
        ("::1", [f"bearer  {TOKEN} "], True),
        ("127.0.0.1", [f"Bearer {TOKEN}x"], False),
        ("127.0.0.1", [f"Bearer {TOKEN[:-1]}"], False),
        ("127.0.0.1", [], False),
        ("127.0.0.1", [f"Basic {TOKEN}"], False),
        ("127.0.0.1", [TOKEN], False),
        ("127.0.0.1", [f"Bearer {TOKEN}", f"Bearer {TOKEN}"], False),
        ("127.0.0.1", ["Bearer é"], False),
        ("10.0.0.1", [f"Bearer {TOKEN}"], False),
        (None, [f"Bearer {TOKEN}"], False),
    ],
)
def test_token_check(admin: AdminApi, peer: str | None, headers: list[str], allowed: bool) -> None:
    assert admin.authorized(peer, headers) is allowed


def test_no_token_configured_means_disabled() -> None:
    admin = admin_for(settings_from_mapping({}, environ={}))
    assert not admin.enabled
    assert not admin.authorized("127.0.0.1", ["Bearer "])


# --- routing and parameter validation ---------------------------------------------------


def call(admin: AdminApi, method: str, route: str, query: str = "", body: bytes = b"") -> Any:
    response = admin.handle(method, f"/api/security/{route}", query, body)
    assert response.content_type == "application/json"
    assert ("Cache-Control", "no-store") in response.headers
    return response.status, json.loads(response.body)


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=abc", "limit"),
        ("limit=-1", "limit"),
        ("offset=-1", "offset"),
        ("offset=10001", "offset"),
        ("since=yesterday-ish", "since"),
        ("until=nan", "until"),
        ("severity=loud", "severity"),
        ("ip=999.1.1.1", "ip"),
        ("ip=10.0.0.0/8", "ip"),
        ("type=%00", "type"),
        ("limit=1&limit=2", "limit"),
        ("secret-sauce=1", "query"),
    ],
)
def test_audit_log_parameters_are_validated(admin: AdminApi, query: str, parameter: str) -> None:
    status, body = call(admin, "GET", "audit-logs", query)
    assert status == 400
    assert body["parameter"] == parameter
    assert body["reason"] == "invalid_field"
    # Never echo the value.
    value = query.partition("=")[2]
    text = json.dumps(body)
    if len(value) >= 3 and not value.lstrip("-").isdigit():
        assert value not in text
    assert "sauce" not in text


def test_audit_logs_without_an_audit_log_is_503(admin: AdminApi) -> None:
    status, body = call(admin, "GET", "audit-logs", "since=1h&limit=5")
    assert (status, body["reason"]) == (503, "audit_disabled")


@pytest.mark.parametrize(
    ("body", "parameter"),
    [
        (b"{", "body"),
        (b"[]", "body"),
        (b"\xff", "body"),
        (b"{}", "ip"),
        (b'{"ip": "1.2.3"}', "ip"),
        (b'{"ip": "1.2.3.4/32"}', "ip"),
        (b'{"ip": " 1.2.3.4"}', "ip"),
        (b'{"ip": "fe80::1%eth0"}', "ip"),
        (b'{"ip": 16909060}', "ip"),
        (b'{"ip": "1.2.3.4", "ttl_seconds": 0}', "ttl_seconds"),
        (b'{"ip": "1.2.3.4", "ttl_seconds": true}', "ttl_seconds"),
        (b'{"ip": "1.2.3.4", "ttl_seconds": "1h"}', "ttl_seconds"),
        (b'{"ip": "1.2.3.4", "ttl_seconds": 1e12}', "ttl_seconds"),
        (b'{"ip": "1.2.3.4", "reason": ""}', "reason"),
        (b'{"ip": "1.2.3.4", "reason": "a\\nb"}', "reason"),
        (b'{"ip": "1.2.3.4", "extra": 1}', "body"),
    ],
)
def test_block_ip_body_is_validated(admin: AdminApi, body: bytes, parameter: str) -> None:
    status, answer = call(admin, "POST", "block-ip", body=body)
    assert (status, answer["parameter"]) == (400, parameter)


def test_unknown_route_and_wrong_method(admin: AdminApi) -> None:
    assert call(admin, "GET", "nope")[0] == 404
    assert call(admin, "GET", "")[0] == 404
    status, body = call(admin, "DELETE", "config")
    assert (status, body["reason"]) == (405, "method_not_allowed")
    response = admin.handle("POST", "/api/security/health", "", b"")
    assert ("Allow", "GET") in response.headers


class PutRecorder:
    """A stand-in node for ``PUT config``: records what it was asked to apply."""

    def __init__(self, settings: Settings, refuse: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.blocklist = None
        self.audit = None
        self.refuse = refuse
        self.applied: list[Settings] = []
        self.failed: list[list[str]] = []

    def apply_config(self, settings: Settings) -> ReloadResult:
        if self.refuse:
            raise RestartRequired(self.refuse)
        self.applied.append(settings)
        return ReloadResult(tuple(changed_fields(self.settings, settings)))

    def reload_failed(self, source: str, fields: list[str]) -> None:
        self.failed.append(fields)


def put_admin(node: PutRecorder) -> AdminApi:
    ops = cast(Ops, SimpleNamespace(checks=dict))
    return AdminApi(cast(AdminNodeView, node), ops, wall_clock=lambda: 1e9)


def local_every_secret_settings() -> Settings:
    """Every kind of secret, on the local adapter (the redis URL stays redacted-testable)."""
    return every_secret_settings().model_copy(
        update={"adapter": every_secret_settings().adapter.model_copy(update={"driver": "local"})}
    )


def test_put_config_round_trips_get_config_keeping_every_secret() -> None:
    node = PutRecorder(local_every_secret_settings())
    admin = put_admin(node)
    _, document = call(admin, "GET", "config")
    status, body = call(admin, "PUT", "config", body=json.dumps(document).encode())
    assert (status, body) == (200, {"changed": [], "closed_connections": 0})
    assert node.applied == [node.settings]  # every [redacted] kept its running value


def test_put_config_merges_a_partial_document() -> None:
    node = PutRecorder(local_every_secret_settings())
    admin = put_admin(node)
    patch = {
        "apps": [{"id": "1", "allowed_origins": ["https://app.example.com"]}],
        "security": {"rest_requests_per_ip": {"rate": 5, "burst": 10}},
    }
    status, body = call(admin, "PUT", "config", body=json.dumps(patch).encode())
    assert status == 200
    assert body["changed"] == [
        "security.rest_requests_per_ip.rate",
        "security.rest_requests_per_ip.burst",
        "apps.1.allowed_origins",
    ]
    (applied,) = node.applied
    app = applied.apps[0]
    assert app.allowed_origins == ["https://app.example.com"]
    assert app.secret.get_secret_value() == APP_SECRET
    assert app.previous_secrets == node.settings.apps[0].previous_secrets
    assert applied.admin == node.settings.admin


@pytest.mark.parametrize(
    ("patch", "fields"),
    [
        ({"server": {"port": "6001"}}, ["server.port"]),
        ({"apps": [{"id": "1", "max_connections": 0}]}, ["apps.0.max_connections"]),
        ({"apps": [{"id": "2", "key": "k2"}]}, ["apps.0.secret"]),
    ],
)
def test_put_config_names_invalid_fields_never_values(
    patch: dict[str, Any], fields: list[str]
) -> None:
    node = PutRecorder(local_every_secret_settings())
    status, body = call(put_admin(node), "PUT", "config", body=json.dumps(patch).encode())
    assert (status, body["reason"], body["fields"]) == (400, "invalid_config", fields)
    assert node.applied == [] and node.failed == [fields]
    assert not any(secret in json.dumps(body) for secret in SECRETS)


@pytest.mark.parametrize(
    ("body", "parameter"),
    [
        (b"[1]", "body"),
        (b"{not json", "body"),
        (b'{"server": {"no_such_key": 1}}', "server"),
        (b'{"apps": [{"id": "9", "key": "k9", "secret": "[redacted]"}]}', "apps.0.secret"),
    ],
)
def test_put_config_refuses_bad_documents(body: bytes, parameter: str) -> None:
    node = PutRecorder(local_every_secret_settings())
    status, answer = call(put_admin(node), "PUT", "config", body=body)
    assert (status, answer["parameter"]) == (400, parameter)
    assert "no_such_key" not in answer["error"]  # the client's text is never echoed
    assert node.applied == [] and node.failed == [[parameter]]


def test_put_config_restart_required_is_409_naming_fields() -> None:
    node = PutRecorder(local_every_secret_settings(), refuse=("server.port",))
    patch = b'{"server": {"port": 7001}}'
    status, body = call(put_admin(node), "PUT", "config", body=patch)
    assert (status, body["reason"], body["fields"]) == (409, "restart_required", ["server.port"])


def test_report_range_is_validated(admin: AdminApi) -> None:
    status, body = call(admin, "GET", "report", "since=1h&until=2h")
    assert (status, body["parameter"]) == (400, "until")
    status, body = call(admin, "GET", "report", "since=30m")
    assert status == 200
    assert body["since"] == 1e9 - 1800 and body["until"] == 1e9
    assert body["audit"] is False and body["top_ips"] == []
