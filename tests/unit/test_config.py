"""Settings: the compatibility TOML, defaults, strict validation, env overrides, the CLI."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from support.timeouts import scaled

import bastion
from bastion.config import (
    WEBHOOK_EVENT_TYPES,
    Settings,
    load_settings,
    settings_from_mapping,
)
from bastion.errors import ConfigError

# PRODUCT.md, "Compatibility promises": this exact text must keep loading.
COMPATIBILITY_TOML = """\
[server]
host = "127.0.0.1"
port = 6001

[[apps]]
id = "12345"                 # digits work with every official SDK
key = "app-key"
secret = "app-secret"
enable_client_messages = true
allowed_origins = ["https://app.example.com", "https://*.example.com"]

[[apps.webhooks]]
url = "http://127.0.0.1:9000/webhook"
event_types = ["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event", "cache_miss"]

[adapter]
driver = "redis"             # default "local"
url = "redis://127.0.0.1:6379/0"
"""  # noqa: E501

# Issue #2 (multi-tenant apps): several apps on one server, each with its own
# credentials, switches and limits.
MULTI_TENANT_TOML = """\
[server]
host = "0.0.0.0"
port = 6001
activity_timeout = 60

[[apps]]
id = "1001"
key = "tenant-a-key"
secret = "tenant-a-secret"
enable_client_messages = true
max_connections = 5000
max_client_events_per_second = 20
max_presence_members = 50
max_presence_member_size_kb = 1
max_event_payload_kb = 32
max_channels_per_event = 10
max_event_batch_size = 5
max_channel_name_length = 200
max_event_name_length = 100

[[apps.webhooks]]
url = "https://hooks.tenant-a.example/pusher"
event_types = ["channel_occupied", "channel_vacated"]

[[apps]]
id = "1002"
key = "tenant-b-key"
secret = "tenant-b-secret"
enabled = false

[[apps]]
id = "tenant_c"
key = "tenant.c.key"
secret = "tenant-c-secret"
allowed_origins = ["https://c.example"]
"""

# README "Running with a configuration file".
README_TOML = """\
# bastion.toml
[server]
host = "127.0.0.1"
port = 6001

[[apps]]
id = "12345"
key = "app-key"
secret = "app-secret"
enable_client_messages = true

[[apps.webhooks]]
url = "http://127.0.0.1:9000/webhook"
event_types = ["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event"]
"""  # noqa: E501

SECRET = "s3cr3t-DO-NOT-LEAK-9f8e7d"


def load(text: str, environ: dict[str, str] | None = None) -> Settings:
    return settings_from_mapping(tomllib.loads(text), environ=environ or {})


def app(**fields: Any) -> dict[str, Any]:
    return {"id": "1", "key": "app-key", "secret": SECRET, **fields}


def config_error(data: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, environ=environ or {})
    return str(info.value)


# --- the compatibility promise and defaults -----------------------------------------


def test_compatibility_toml_loads_verbatim() -> None:
    settings = load(COMPATIBILITY_TOML)
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 6001
    (only,) = settings.apps
    assert only.id == "12345"
    assert only.key == "app-key"
    assert only.secret.get_secret_value() == "app-secret"
    assert only.enable_client_messages is True
    assert only.allowed_origins == ["https://app.example.com", "https://*.example.com"]
    (hook,) = only.webhooks
    assert hook.url == "http://127.0.0.1:9000/webhook"
    assert hook.event_types == [
        "channel_occupied",
        "channel_vacated",
        "member_added",
        "member_removed",
        "client_event",
        "cache_miss",
    ]
    assert settings.adapter.driver == "redis"
    assert settings.adapter.url == "redis://127.0.0.1:6379/0"


def test_compatibility_toml_defaults() -> None:
    settings = load(COMPATIBILITY_TOML)
    assert settings.server.activity_timeout == 120
    only = settings.apps[0]
    assert only.enabled is True
    assert only.max_client_events_per_second == 10
    assert only.max_presence_members == 100
    assert only.max_presence_member_size_kb == 2
    assert only.max_event_payload_kb == 10
    assert only.max_channels_per_event == 100
    assert only.max_event_batch_size == 10
    assert only.max_channel_name_length == 164
    assert only.max_event_name_length == 200
    assert only.max_event_payload_bytes == 10 * 1024
    assert only.max_presence_member_bytes == 2 * 1024


def test_empty_config_defaults() -> None:
    settings = settings_from_mapping({}, environ={})
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 6001
    assert settings.server.activity_timeout == 120
    assert settings.adapter.driver == "local"
    assert settings.adapter.url is None
    assert settings.apps == []


def test_webhook_event_types_default_to_all() -> None:
    settings = settings_from_mapping(
        {"apps": [app(webhooks=[{"url": "https://h.example/x"}])]}, environ={}
    )
    assert tuple(settings.apps[0].webhooks[0].event_types) == WEBHOOK_EVENT_TYPES


def test_loopback_webhook_urls_are_trusted_as_written() -> None:
    for url in ("http://127.0.0.1:9000/webhook", "http://localhost/x", "http://[::1]:8080/"):
        settings = settings_from_mapping({"apps": [app(webhooks=[{"url": url}])]}, environ={})
        assert settings.apps[0].webhooks[0].url == url


def test_multi_tenant_toml_loads() -> None:
    settings = load(MULTI_TENANT_TOML)
    assert settings.server.host == "0.0.0.0"
    assert settings.server.activity_timeout == 60
    assert [a.id for a in settings.apps] == ["1001", "1002", "tenant_c"]
    a, b, c = settings.apps
    assert a.max_connections == 5000
    assert a.max_client_events_per_second == 20
    assert a.max_presence_member_bytes == 1024
    assert a.max_event_payload_bytes == 32 * 1024
    assert a.webhooks[0].event_types == ["channel_occupied", "channel_vacated"]
    assert b.enabled is False
    assert b.enable_client_messages is False
    assert c.allowed_origins == ["https://c.example"]
    assert settings.app_by_key("tenant.c.key") is c
    assert settings.app_by_id("1002") is b
    assert settings.app_by_key("nope") is None
    assert settings.app_by_id("nope") is None


def test_readme_toml_loads() -> None:
    settings = load(README_TOML)
    assert settings.apps[0].id == "12345"
    assert len(settings.apps[0].webhooks[0].event_types) == 5


def test_settings_are_frozen() -> None:
    settings = load(COMPATIBILITY_TOML)
    with pytest.raises(ValueError):
        settings.server.port = 7000  # type: ignore[misc]


def test_load_settings_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "bastion.toml"
    path.write_text(COMPATIBILITY_TOML, encoding="utf-8")
    assert load_settings(path, environ={}) == load(COMPATIBILITY_TOML)
    assert load_settings(None, environ={}) == settings_from_mapping({}, environ={})


def test_load_settings_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read"):
        load_settings(missing, environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text(f'[[apps]]\nsecret = "{SECRET}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML") as info:
        load_settings(broken, environ={})
    assert SECRET not in str(info.value)


# --- invalid configurations name the field ------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"apps": [app(colour="blue")]}, "apps.0.colour", "unknown field"),
        ({"server": {"prot": 6001}}, "server.prot", "unknown field"),
        ({"servr": {}}, "servr", "unknown field"),
        ({"server": {"port": "x"}}, "server.port", "integer"),
        ({"server": {"port": "6001"}}, "server.port", "integer"),  # strict: no coercion
        ({"server": {"port": 70000}}, "server.port", ""),
        ({"server": {"port": True}}, "server.port", "integer"),
        ({"server": {"port": 6001.5}}, "server.port", "integer"),
        ({"server": {"activity_timeout": 0}}, "server.activity_timeout", ""),
        ({"apps": [app(enabled="yes")]}, "apps.0.enabled", "boolean"),
        ({"apps": [app(max_presence_members=0)]}, "apps.0.max_presence_members", ""),
        ({"apps": [app(max_channel_name_length=5000)]}, "apps.0.max_channel_name_length", ""),
        ({"apps": [app(id=12345)]}, "apps.0.id", "string"),
        ({"apps": [app(id="has space")]}, "apps.0.id", ""),
        ({"apps": [app(key="a:b")]}, "apps.0.key", ""),
        ({"apps": [app(secret="")]}, "apps.0.secret", "empty"),
        ({"apps": [app(secret=123)]}, "apps.0.secret", "string"),
        ({"apps": [app(webhooks=[{"url": "ftp://h/x"}])]}, "apps.0.webhooks.0.url", "http"),
        ({"apps": [app(webhooks=[{"url": "h.example/x"}])]}, "apps.0.webhooks.0.url", "http"),
        (
            {"apps": [app(webhooks=[{"url": "https://h/x", "event_types": ["nope"]}])]},
            "apps.0.webhooks.0.event_types.0",
            "",
        ),
        ({"adapter": {"driver": "memcached"}}, "adapter.driver", ""),
        ({"apps": {"id": "1"}}, "apps", "list"),
    ],
)
def test_invalid_config_names_the_field(data: dict[str, Any], field: str, words: str) -> None:
    message = config_error(data)
    assert message.startswith(field + ":"), message
    assert words in message


def test_duplicate_app_id() -> None:
    message = config_error({"apps": [app(), app(key="other-key")]})
    assert "apps.1.id" in message
    assert "duplicate" in message


def test_duplicate_app_key() -> None:
    message = config_error({"apps": [app(), app(id="2")]})
    assert "apps.1.key" in message
    assert "duplicate" in message


def test_every_error_is_reported() -> None:
    message = config_error({"server": {"port": "x", "bogus": 1}, "apps": [app(secret="")]})
    for field in ("server.port", "server.bogus", "apps.0.secret"):
        assert field in message


# --- secrets never leak -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"apps": [app(colour=SECRET)]},
        {"apps": [app(enabled=SECRET)]},
        {"apps": [app(max_presence_members=SECRET)]},
        {"apps": [app(id=SECRET + " !")]},
        {"apps": [app(key=SECRET + ":")]},
        {"apps": [app(secret=[SECRET])]},
        {"apps": [app(secret={"value": SECRET})]},
        {"apps": [app(allowed_origins=SECRET)]},
        {"apps": [app(webhooks=[{"url": "ftp://" + SECRET}])]},
        {"apps": [app(webhooks=[{"url": "https://h/", "event_types": [SECRET]}])]},
        {"adapter": {"driver": SECRET}},
        {"server": {"port": SECRET}},
        {"apps": [app(), app(key="k2")]},
        {"apps": [app(), app(id="2", secret="x")]},
    ],
)
def test_secret_never_appears_in_an_error(data: dict[str, Any]) -> None:
    message = config_error(data)
    assert SECRET not in message
    assert SECRET[:8] not in message


def test_secret_never_appears_in_repr_or_str() -> None:
    settings = settings_from_mapping({"apps": [app()]}, environ={})
    for text in (repr(settings), str(settings), repr(settings.apps[0]), str(settings.apps[0])):
        assert SECRET not in text
    assert SECRET not in settings.model_dump_json()
    assert settings.apps[0].secret.get_secret_value() == SECRET


def test_secret_from_env_never_appears_in_an_error() -> None:
    message = config_error(
        {"apps": [app()]},
        environ={"BASTION_APPS__0__SECRET": SECRET, "BASTION_SERVER__PORT": "nope"},
    )
    assert "server.port" in message
    assert SECRET not in message


# --- BASTION_* environment overrides ----------------------------------------------------------


def test_env_overrides_a_scalar() -> None:
    settings = load(COMPATIBILITY_TOML, {"BASTION_SERVER__PORT": "7000"})
    assert settings.server.port == 7000


def test_env_overrides_a_list_item_by_index() -> None:
    settings = load(MULTI_TENANT_TOML, {"BASTION_APPS__1__SECRET": "rotated-secret"})
    assert settings.apps[1].secret.get_secret_value() == "rotated-secret"
    assert settings.apps[0].secret.get_secret_value() == "tenant-a-secret"


def test_env_values_are_read_as_toml_when_they_parse() -> None:
    settings = load(
        COMPATIBILITY_TOML,
        {
            "BASTION_APPS__0__ENABLE_CLIENT_MESSAGES": "false",
            "BASTION_APPS__0__ALLOWED_ORIGINS": '["https://only.example"]',
            "BASTION_SERVER__HOST": "0.0.0.0",
            "BASTION_ADAPTER__DRIVER": "local",
        },
    )
    assert settings.apps[0].enable_client_messages is False
    assert settings.apps[0].allowed_origins == ["https://only.example"]
    assert settings.server.host == "0.0.0.0"
    assert settings.adapter.driver == "local"


def test_env_creates_missing_sections() -> None:
    settings = settings_from_mapping({}, environ={"BASTION_SERVER__ACTIVITY_TIMEOUT": "30"})
    assert settings.server.activity_timeout == 30


def test_env_does_not_mutate_the_input_mapping() -> None:
    data = tomllib.loads(COMPATIBILITY_TOML)
    settings_from_mapping(data, environ={"BASTION_SERVER__PORT": "7000"})
    assert data["server"]["port"] == 6001


def test_env_ignores_unrelated_variables() -> None:
    settings = load(
        COMPATIBILITY_TOML,
        {"HOME": "/root", "BASTION_TEST_TIMEOUT_SCALE": "3", "OTHER__SERVER__PORT": "1"},
    )
    assert settings == load(COMPATIBILITY_TOML)


def test_env_unknown_field_is_an_error_naming_it() -> None:
    message = config_error({}, environ={"BASTION_SERVER__PROT": "7000"})
    assert message.startswith("server.prot: unknown field")


def test_env_list_index_out_of_range() -> None:
    message = config_error({"apps": [app()]}, environ={"BASTION_APPS__3__SECRET": "x"})
    assert "BASTION_APPS__3__SECRET" in message


def test_env_wrong_type_names_the_field() -> None:
    message = config_error({}, environ={"BASTION_SERVER__PORT": "x"})
    assert message.startswith("server.port:")


def test_env_string_fields_take_the_text_as_it_is() -> None:
    settings = load(
        COMPATIBILITY_TOML,
        {"BASTION_APPS__0__KEY": "0x1f", "BASTION_SERVER__HOST": "1979-05-27"},
    )
    assert settings.apps[0].key == "0x1f"
    assert settings.server.host == "1979-05-27"


def test_env_non_string_fields_are_still_read_as_toml() -> None:
    settings = load(
        COMPATIBILITY_TOML,
        {
            "BASTION_SERVER__PORT": "7000",
            "BASTION_APPS__0__MAX_PRESENCE_MEMBER_SIZE_KB": "1.5",
            "BASTION_APPS__0__MAX_CONNECTIONS": "10",
        },
    )
    assert settings.server.port == 7000
    assert settings.apps[0].max_presence_member_size_kb == 1.5
    assert settings.apps[0].max_connections == 10


def test_env_override_of_a_digit_app_id() -> None:
    settings = load(COMPATIBILITY_TOML, {"BASTION_APPS__0__ID": "67890"})
    assert settings.apps[0].id == "67890"


@pytest.mark.parametrize("value", ["12345678", "true", "1979-05-27", "inf"])
def test_env_override_of_a_secret_that_looks_like_toml(value: str) -> None:
    settings = load(COMPATIBILITY_TOML, {"BASTION_APPS__0__SECRET": value})
    assert settings.apps[0].secret.get_secret_value() == value


# --- the command line --------------------------------------------------------------------------


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    # A timeout here means the process did not exit by itself (it started serving).
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (COMPATIBILITY_TOML.replace("port = 6001", 'port = "x"'), "server.port"),
        (COMPATIBILITY_TOML.replace("enable_client", "enable_klient"), "apps.0.enable_klient"),
        (COMPATIBILITY_TOML.replace('secret = "app-secret"', 'secret = ""'), "apps.0.secret"),
        (
            COMPATIBILITY_TOML.replace(
                "[[apps.webhooks]]",
                "[apps.roles.staff]\nsubscribe_attempts = { rate = 0, burst = 5 }\n\n"
                "[[apps.webhooks]]",
            ),
            "apps.0.roles.staff.subscribe_attempts.rate",
        ),
    ],
)
def test_cli_invalid_config_exits_2_naming_the_field(tmp_path: Path, body: str, field: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(body, encoding="utf-8")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == 2, result.stderr
    assert field in result.stderr
    assert "app-secret" not in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening" not in result.stdout


def test_cli_env_override_is_validated_too(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(COMPATIBILITY_TOML, encoding="utf-8")
    result = run_cli(
        "serve", "--config", str(good), env={"BASTION_APPS__0__MAX_PRESENCE_MEMBERS": "-1"}
    )
    assert result.returncode == 2
    assert "apps.0.max_presence_members" in result.stderr
    assert "listening" not in result.stdout


def test_cli_unreadable_config_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "missing.toml" in result.stderr
    assert "listening" not in result.stdout


def test_cli_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert bastion.__version__ in result.stdout


def test_cli_help_lists_serve() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout
    serve_help = run_cli("serve", "--help")
    assert serve_help.returncode == 0
    assert "--config" in serve_help.stdout


@pytest.mark.parametrize("entry", ["evil.com", "https://a.com/path", "https://*.0.0.1", "null"])
def test_invalid_allowed_origins_entry_is_named(entry: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping(
            {"apps": [{"id": "1", "key": "k", "secret": "s", "allowed_origins": [entry]}]},
            environ={},
        )
    assert str(raised.value).startswith("apps.0.allowed_origins:")
    assert repr(entry) in str(raised.value)


# --- field names as data --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "environ", "fields"),
    [
        ({"server": {"port": "6001"}}, {}, ("server.port",)),
        (
            {"server": {"port": "x", "nope": 1}, "apps": [app(max_connections=0)]},
            {},
            ("server.port", "server.nope", "apps.0.max_connections"),
        ),
        # A check across fields names the one at fault, which pydantic cannot locate.
        ({"apps": [app(), app(key="other")]}, {}, ("apps.1.id",)),
        ({"apps": [app(), app(id="2")]}, {}, ("apps.1.key",)),
        ({"apps": [app(jwt={"algorithms": ["RS256"]})]}, {}, ("apps.0.jwt",)),
        ({"apps": [app()]}, {"BASTION_APPS__3__ID": "x"}, ("BASTION_APPS__3__ID",)),
    ],
)
def test_config_errors_carry_the_field_paths_as_data(
    data: dict[str, Any], environ: dict[str, str], fields: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping(data, environ=environ)
    assert raised.value.fields == fields
    for field in fields:
        assert field in str(raised.value)  # the message names them too
    assert SECRET not in str(raised.value)


def test_an_unreadable_file_is_named_as_the_field(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as raised:
        load_settings(missing, environ={})
    assert raised.value.fields == (str(missing),)
