"""The docs describe the code; these tests fail as soon as the two drift apart.

* docs/errors.md must have one row per ``Reason`` member, with its slug, the
  codes it is answered with, and its log level.
* docs/configuration.md must have one row per settings field in the right
  section, stating the model's default; its TOML examples must still load.
* docs/protocol.md must state the numbers the code uses for a few timings.

The tables are parsed in the format those files use: Markdown rows whose first
cell is a backticked name.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from bastion.config import (
    AdapterSettings,
    AdminSettings,
    AlertRuleSettings,
    AlertSettings,
    AnonymousSettings,
    AppSettings,
    AuditSettings,
    ConnectionLimits,
    EventLimit,
    HistorySettings,
    JwtSettings,
    MetricsSettings,
    ReputationSettings,
    RetiringSecret,
    SecuritySettings,
    ServerSettings,
    TlsSettings,
    UserErrorBudget,
    WebhookDeliverySettings,
    WebhookSettings,
    settings_from_mapping,
)
from bastion.protocol.counts import COUNT_THROTTLE_SECONDS, COUNT_THROTTLE_THRESHOLD
from bastion.protocol.refusals import Reason
from bastion.protocol.signing import REST_TIMESTAMP_WINDOW

DOCS = Path(__file__).resolve().parents[2] / "docs"

#: configuration.md section heading → the model its table documents.
CONFIG_SECTIONS: dict[str, type[BaseModel]] = {
    "`[server]`": ServerSettings,
    "`[server.tls]`": TlsSettings,
    "`[adapter]`": AdapterSettings,
    "`[[apps]]`": AppSettings,
    "`[[apps.webhooks]]`": WebhookSettings,
    "`[[apps.previous_secrets]]`": RetiringSecret,
    "`[audit]`": AuditSettings,
    "`[apps.jwt]`": JwtSettings,
    "`[apps.client_event_limits]`": EventLimit,
    "`[apps.user_error_budget]`": UserErrorBudget,
    "`[apps.roles.NAME]`": ConnectionLimits,
    "`[apps.anonymous]`": AnonymousSettings,
    "`[apps.history]`": HistorySettings,
    "`[security]`": SecuritySettings,
    "`[security.reputation]`": ReputationSettings,
    "`[webhooks]`": WebhookDeliverySettings,
    "`[metrics]`": MetricsSettings,
    "`[admin]`": AdminSettings,
    "`[alerts]`": AlertSettings,
    "`[alerts.<rule>]`": AlertRuleSettings,
}

_NAME_CELL = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def _read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _named_rows(text: str) -> dict[str, dict[str, list[str]]]:
    """Rows whose first cell is a backticked name, grouped by their ``##`` heading."""
    sections: dict[str, dict[str, list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|"):
            cells = _cells(line)
            match = _NAME_CELL.fullmatch(cells[0])
            if match:
                rows = sections.setdefault(heading, {})
                assert match[1] not in rows, f"{match[1]} documented twice under {heading!r}"
                rows[match[1]] = cells
    return sections


def _section(text: str, heading: str) -> str:
    """The text under ``## {heading}`` up to the next ``##`` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match[1]


def _toml_blocks(text: str) -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```", text, re.M | re.S)


# --- errors.md ----------------------------------------------------------------------


def _reason_rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for section in _named_rows(_read("errors.md")).values():
        for name, cells in section.items():
            if name in Reason.__members__ or name.isupper():
                assert name not in rows, f"{name} has two rows in errors.md"
                rows[name] = cells
    return rows


def test_every_reason_slug_is_in_errors_md() -> None:
    text = _read("errors.md")
    missing = sorted({r.value.slug for r in Reason if f"`{r.value.slug}`" not in text})
    assert not missing, f"slugs missing from docs/errors.md: {missing}"


def test_errors_md_has_one_row_per_reason_and_no_stale_rows() -> None:
    documented = set(_reason_rows())
    actual = set(Reason.__members__)
    assert not actual - documented, f"reasons without a row: {sorted(actual - documented)}"
    stale = sorted(documented - actual)
    assert not stale, f"rows for reasons that no longer exist: {stale}"


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.name)
def test_errors_md_row_states_the_wire_answer(reason: Reason) -> None:
    cells = _reason_rows().get(reason.name)
    assert cells is not None, f"no row for {reason.name}"
    assert len(cells) == 6, f"{reason.name}: expected 6 cells, got {len(cells)}"
    _, slug, _when, answer, _client, log = cells
    rule = reason.value
    assert slug == f"`{rule.slug}`"
    expected = [
        f"**{code}**"
        for code in (rule.close_code, rule.error_code, rule.http_status)
        if code is not None
    ]
    if rule.subscription_type is not None:
        expected.append(f"`{rule.subscription_type}`")
    for fragment in expected:
        assert fragment in answer, f"{reason.name}: answer {answer!r} lacks {fragment}"
    assert log == rule.severity.upper()


# --- configuration.md ---------------------------------------------------------------


@pytest.mark.parametrize("heading", list(CONFIG_SECTIONS))
def test_every_setting_is_in_configuration_md(heading: str) -> None:
    model = CONFIG_SECTIONS[heading]
    rows = _named_rows(_read("configuration.md")).get(heading, {})
    fields = set(model.model_fields)
    assert not fields - set(rows), f"{heading}: undocumented fields {sorted(fields - set(rows))}"
    assert not set(rows) - fields, f"{heading}: documented but gone {sorted(set(rows) - fields)}"


def _documented_default(cell: str) -> Any:
    """The default a table cell states: a TOML literal in backticks, or a word."""
    literal = re.fullmatch(r"`([^`]+)`", cell)
    if literal:
        return tomllib.loads(f"v = {literal[1]}")["v"]
    if cell == "required":
        return PydanticUndefined
    if cell.startswith("unset"):
        return None
    return cell


def _defaults_to_check(model: type[BaseModel]) -> list[tuple[str, Any]]:
    """Fields with a literal default (factories such as lists are described in words)."""
    return [
        (name, field.default)
        for name, field in model.model_fields.items()
        if field.default_factory is None
    ]


def test_numeric_app_limit_defaults_match_the_model() -> None:
    rows = _named_rows(_read("configuration.md"))["`[[apps]]`"]
    checked = []
    for name, default in _defaults_to_check(AppSettings):
        if isinstance(default, bool) or not isinstance(default, int | float):
            continue
        assert name in rows, f"no row for apps.{name}"
        stated = _documented_default(rows[name][2])
        assert isinstance(stated, int | float) and not isinstance(stated, bool), (
            f"{name}: default cell {rows[name][2]!r} is not a number"
        )
        assert stated == default, f"{name}: docs say {stated}, the model says {default}"
        checked.append(name)
    assert "max_client_events_per_second" in checked and "cache_ttl" in checked


@pytest.mark.parametrize("heading", list(CONFIG_SECTIONS))
def test_every_stated_default_matches_the_model(heading: str) -> None:
    model = CONFIG_SECTIONS[heading]
    rows = _named_rows(_read("configuration.md"))[heading]
    for name, default in _defaults_to_check(model):
        assert name in rows, f"{heading}: no row for {name}"
        stated = _documented_default(rows[name][2])
        if isinstance(default, BaseModel):
            # An inline table states its fields; a nested section is described in words.
            if isinstance(stated, dict):
                assert stated == default.model_dump(), f"{heading} {name}: {stated} != default"
            else:
                assert isinstance(stated, str) and "table" in stated, (heading, name)
            continue
        if isinstance(default, float):
            # TOML writes 30.0 as 30; any number equal to the default will do.
            same = isinstance(stated, int | float) and not isinstance(stated, bool)
        else:
            same = type(stated) is type(default)
        assert same and stated == default, (
            f"{heading} {name}: docs say {rows[name][2]!r}, the model says {default!r}"
        )


def test_toml_examples_in_configuration_md_load() -> None:
    blocks = _toml_blocks(_read("configuration.md"))
    assert blocks, "configuration.md has no TOML example"
    for block in blocks:
        settings_from_mapping(tomllib.loads(block), environ={})


def test_compatibility_promise_example_loads_with_its_meaning() -> None:
    (block,) = _toml_blocks(_section(_read("configuration.md"), "Compatibility promise"))
    settings = settings_from_mapping(tomllib.loads(block), environ={})
    (app,) = settings.apps
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 6001)
    assert (app.id, app.key, app.secret.get_secret_value()) == ("12345", "app-key", "app-secret")
    assert app.enable_client_messages is True
    assert app.allowed_origins == ["https://app.example.com", "https://*.example.com"]
    (hook,) = app.webhooks
    assert hook.url == "http://127.0.0.1:9000/webhook"
    assert len(hook.event_types) == 6
    assert (settings.adapter.driver, settings.adapter.url) == (
        "redis",
        "redis://127.0.0.1:6379/0",
    )


# --- protocol.md --------------------------------------------------------------------


def test_protocol_md_states_the_numbers_the_code_uses() -> None:
    text = " ".join(_read("protocol.md").split())  # line breaks do not matter
    server = ServerSettings()
    facts = [
        f"above **{COUNT_THROTTLE_THRESHOLD}** subscribers, at most one count every "
        f"**{COUNT_THROTTLE_SECONDS:g} s**",
        f"within **{REST_TIMESTAMP_WINDOW} s** of the server clock",
        f"silent for `activity_timeout` (**{server.activity_timeout} s**)",
        f"within `pong_timeout` (**{server.pong_timeout:g} s**)",
        f"`cache_ttl` seconds (**{AppSettings.model_fields['cache_ttl'].default}**)",
    ]
    for fact in facts:
        assert fact in text, f"docs/protocol.md no longer says: {fact!r}"


# --- security.md --------------------------------------------------------------------

#: Reasons that are security controls of their own: security.md must name each.
SECURITY_SLUGS = {
    Reason.MESSAGE_RATE,
    Reason.REFUSAL_LIMIT,
    Reason.HTTP_ORIGIN_REFUSED,
    Reason.IP_BLOCKED,
    Reason.HTTP_IP_CONNECTIONS,
    Reason.HTTP_CONNECTION_RATE,
    Reason.AUTH_FAILURE_LIMIT,
    Reason.HTTP_QUERY_TOKEN,
    Reason.UNSIGNED_OVER_QUOTA,
    Reason.SUBSCRIBE_RATE,
    Reason.SIGNIN_TOKEN_INVALID,
    Reason.TOKEN_EXPIRED,
    Reason.SIGNIN_DEADLINE,
    Reason.CLIENT_EVENT_RATE,
    Reason.CLIENT_EVENT_APP_RATE,
    Reason.CLIENT_EVENT_NOT_ALLOWED,
    Reason.CLIENT_EVENT_SCHEMA,
    Reason.HTTP_IP_RATE,
    Reason.HTTP_APP_RATE,
    Reason.HTTP_REPLAYED,
    Reason.FRAME_TOO_LARGE,
    Reason.HTTP_BODY_TOO_LARGE,
    Reason.HTTP_HEADERS_TOO_LARGE,
    Reason.USER_CONNECTION_LIMIT,
    Reason.SESSION_REPLACED,
    Reason.CLIENT_EVENT_TYPE_RATE,
    Reason.HTTP_EVENT_RATE,
    Reason.USER_SUSPENDED,
    Reason.SIGNIN_SUSPENDED,
}


@pytest.mark.parametrize("reason", sorted(SECURITY_SLUGS, key=lambda r: r.name), ids=str)
def test_security_md_names_each_control_with_its_code(reason: Reason) -> None:
    text = _read("security.md")
    rule = reason.value
    rows = [line for line in text.splitlines() if f"`{rule.slug}`" in line]
    assert rows, f"security.md does not name {rule.slug}"
    codes = [c for c in (rule.close_code, rule.error_code, rule.http_status) if c is not None]
    assert any(f"**{code}**" in row for row in rows for code in codes), (
        f"security.md never states the code of {rule.slug} ({codes}) next to it"
    )


def test_security_md_mentions_every_security_setting() -> None:
    text = _read("security.md")
    names = [*SecuritySettings.model_fields, *ReputationSettings.model_fields]
    names += [
        "allowed_origins",
        "reject_missing_origin",
        "subscribe_attempts",
        "max_messages_per_second",
        "refusals_per_connection",
        "client_events_per_app",
        "client_event_allowlist",
        "client_event_schemas",
        "rest_requests",
        "max_unsigned_connections",
        "signin_deadline_seconds",
        "previous_secrets",
        "max_connections_per_user",
        "user_connection_policy",
        "roles",
        "default_role",
        "role_key",
        "role_claim",
        "client_event_limits",
        "rest_event_limits",
        "user_error_budget",
    ]
    skip = {"reputation", "enabled", "threshold", "half_life_seconds", "block_seconds"}
    skip |= {"store_path", "sync_seconds"}  # described in prose and configuration.md
    missing = [name for name in names if name not in skip and f"`{name}`" not in text]
    assert not missing, f"security.md does not mention {missing}"


# --- security.md: reputation weights ---------------------------------------------------


def _weight_tables() -> tuple[dict[str, float], set[str]]:
    """The points table (``| Points | Slugs |``) and the zero table of security.md."""
    section = _section(_read("security.md"), "IP reputation and blocks")
    points: dict[str, float] = {}
    zero: set[str] = set()
    table = ""
    for line in section.splitlines():
        if line.startswith("| Points |"):
            table = "points"
        elif line.startswith("| Slugs weighing 0 |"):
            table = "zero"
        elif not line.startswith("|"):
            table = ""
        elif table and not line.startswith("| ---"):
            cells = _cells(line)
            slugs = re.findall(r"`([a-z0-9_]+)`", cells[0 if table == "zero" else 1])
            if table == "zero":
                zero.update(slugs)
            else:
                for slug in slugs:
                    assert slug not in points, f"{slug} has two weights in security.md"
                    points[slug] = float(cells[0])
    return points, zero


def test_security_md_states_every_reputation_weight() -> None:
    from bastion.security.reputation import DEFAULT_POINTS, ZERO_POINTS

    points, zero = _weight_tables()
    assert points == dict(DEFAULT_POINTS)
    assert zero == set(ZERO_POINTS)
