"""The shipped example config loads, and has every security control switched on."""

from __future__ import annotations

import tomllib
from pathlib import Path

from bastion.config import Settings, settings_from_mapping

EXAMPLE = Path(__file__).resolve().parents[2] / "bastion.example.toml"


def _load() -> Settings:
    return settings_from_mapping(tomllib.loads(EXAMPLE.read_text(encoding="utf-8")), environ={})


def test_example_loads() -> None:
    settings = _load()
    assert [app.id for app in settings.apps] == ["12345", "67890"]


def test_every_control_is_on_in_the_example() -> None:
    settings = _load()
    security = settings.security
    assert security.trusted_proxies, "trusted proxies"
    assert security.reputation.enabled and security.reputation.never_block
    assert settings.audit.enabled and settings.audit.retention_days > 0
    alerts = settings.alerts
    assert alerts.enabled and alerts.refuse_private and alerts.url is not None
    assert alerts.url.startswith("https://") and len(alerts.rules()) == 7
    assert settings.server.max_connections is not None
    for app in settings.apps:
        assert app.allowed_origins and "*" not in app.allowed_origins, app.id
        assert app.rest_requests is not None, app.id
        assert app.unsigned_cap is not None, app.id
        assert app.max_connections_per_user is not None, app.id
    public, locked = settings.apps
    assert public.roles and public.anonymous is not None  # a role table, anonymous limits
    assert locked.user_connection_policy == "close_oldest"  # one session per user
    assert public.enable_client_messages
    assert public.client_events_per_app is not None
    assert public.client_event_allowlist and public.client_event_schemas
    assert set(public.client_event_schemas) <= {
        name for name in public.client_event_allowlist if not name.endswith("*")
    }
    assert locked.jwt is not None and locked.jwt.audience and locked.jwt.issuer
    assert not locked.jwt.allow_query_token
    assert locked.signin_deadline_seconds is not None and locked.reject_missing_origin
    assert locked.webhooks_refuse_private and locked.webhooks
    assert all(hook.url.startswith("https://") for hook in locked.webhooks)


def test_example_secrets_are_placeholders_that_say_so() -> None:
    # `bastion doctor` (#6) will refuse them; until then the words make the point.
    for app in _load().apps:
        assert "replace-me" in app.secret.get_secret_value()


def test_a_server_starts_from_the_example(tmp_path: Path) -> None:
    from support.server import run_bastion

    with run_bastion(EXAMPLE.read_text(encoding="utf-8"), tmp_path, extra_args=("--port", "0")):
        pass
    # Relative store paths land in the working directory: the audit log and the blocks.
    assert (tmp_path / "bastion-audit.sqlite3").exists()
