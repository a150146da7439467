"""Roles (issue #15 item 2): per-connection limits by tier, from signed sources only.

The tiers resolve the app's limits with ``[apps.anonymous]`` and
``[apps.roles.NAME]``; a hub puts a connection in its tier at sign-in (HMAC
``user_data`` or a token's claim), and every per-connection limit reads it.
"""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from support.hubs import Client, HubNode, MemoryNodes

from bastion.config import RECONNECT_MARGIN, settings_from_mapping
from bastion.core import events as ev
from bastion.errors import ConfigError, Refused
from bastion.protocol.refusals import Reason
from bastion.security.roles import ANONYMOUS, SIGNED_IN, Tiers, is_valid_role
from bastion.security.tokens import JwtVerifier, TokenError

from .test_hub_auth import AuthWorld

SECRET = "x" * 40
NOW = 1_800_000_000.0

ROLES: dict[str, Any] = {
    "max_channels_per_connection": 3,
    "max_client_events_per_second": 2,
    "anonymous": {"max_channels_per_connection": 1, "max_connections": 50},
    "roles": {
        "staff": {
            "max_channels_per_connection": 10,
            "max_client_events_per_second": 5,
            "subscribe_attempts": {"rate": 1, "burst": 200},
            "max_messages_per_second": {"rate": 500, "burst": 800},
            "max_presence_member_size_kb": 8,
        },
        "guest": {"max_channels_per_connection": 2},
    },
}


def app_settings(**fields: Any) -> Any:
    document = {"apps": [{"id": "1", "key": "k", "secret": "s", **fields}]}
    (app,) = settings_from_mapping(document, environ={}).apps
    return app


def config_error(**fields: Any) -> str:
    with pytest.raises(ConfigError) as info:
        app_settings(**fields)
    return str(info.value)


# --- the tiers (pure) ---------------------------------------------------------------------


def test_without_tables_every_tier_has_the_apps_limits() -> None:
    app = app_settings()
    tiers = Tiers(app, RECONNECT_MARGIN)
    assert tiers[ANONYMOUS] == tiers[SIGNED_IN] == tiers["anything"]
    limits = tiers[SIGNED_IN]
    assert limits.client_events_per_second == app.max_client_events_per_second
    assert (limits.message_rate, limits.message_burst) == (50, app.message_burst)
    assert (limits.subscribe_rate, limits.subscribe_burst) == (10, app.subscribe_burst)
    assert limits.max_channels_per_connection == 100
    assert limits.max_presence_member_bytes == 2048


def test_a_roles_table_overrides_only_what_it_sets() -> None:
    tiers = Tiers(app_settings(**ROLES), RECONNECT_MARGIN)
    staff, guest = tiers["staff"], tiers["guest"]
    assert staff.max_channels_per_connection == 10 and staff.client_events_per_second == 5
    assert (staff.subscribe_rate, staff.subscribe_burst) == (1, 200)
    assert (staff.message_rate, staff.message_burst) == (500, 800)
    assert staff.max_presence_member_bytes == 8 * 1024
    assert guest.max_channels_per_connection == 2
    assert guest.client_events_per_second == 2  # the app's
    assert tiers[ANONYMOUS].max_channels_per_connection == 1
    assert tiers[SIGNED_IN].max_channels_per_connection == 3
    # A burst never drops below a reconnect to every channel of the tier.
    assert tiers["guest"].message_burst == 100 and tiers["guest"].subscribe_burst == 100
    many = Tiers(app_settings(roles={"big": {"max_channels_per_connection": 400}}), 5)
    assert many["big"].subscribe_burst == many["big"].message_burst == 405


def test_a_sign_in_without_a_configured_role_is_signed_in_or_the_default_role() -> None:
    tiers = Tiers(app_settings(**ROLES), RECONNECT_MARGIN)
    assert tiers.tier_of("staff") == "staff"
    assert tiers.tier_of(None) == tiers.tier_of("nobody") == SIGNED_IN
    with_default = Tiers(app_settings(**ROLES, default_role="guest"), RECONNECT_MARGIN)
    assert with_default[with_default.tier_of(None)].max_channels_per_connection == 2


@pytest.mark.parametrize(
    ("role", "valid"),
    [
        ("staff", True),
        ("Ünïcode rôle", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("bad\nrole", False),
        ("bad\x85role", False),
        ("\x00anonymous", False),
        (["staff"], False),
        (7, False),
    ],
)
def test_what_a_role_may_be(role: Any, valid: bool) -> None:
    assert is_valid_role(role) is valid


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"roles": {"has space": {}}}, "apps.0.roles"),
        ({"roles": {"staff": {"subscribe_attempts": {"rate": 0, "burst": 5}}}}, "rate"),
        ({"roles": {"staff": {"max_messages_per_second": {"rate": -1, "burst": 5}}}}, "rate"),
        ({"roles": {"staff": {"max_channels_per_connection": 0}}}, "max_channels_per_connection"),
        ({"roles": {"staff": {"colour": "blue"}}}, "apps.0.roles.staff.colour"),
        ({"default_role": "boss", "roles": {"staff": {}}}, "default_role"),
        ({"role_key": "id"}, "apps.0.role_key"),
        ({"role_key": "no spaces"}, "apps.0.role_key"),
        ({"anonymous": {"max_connections": 0}}, "apps.0.anonymous.max_connections"),
        (
            {"max_unsigned_connections": 5, "anonymous": {"max_connections": 6}},
            "anonymous.max_connections",
        ),
        ({"jwt": {"algorithms": ["HS256"], "secret": SECRET, "role_claim": "sub"}}, "role_claim"),
        ({"jwt": {"algorithms": ["HS256"], "secret": SECRET, "role_claim": ""}}, "role_claim"),
    ],
)
def test_bad_role_settings_fail_naming_the_field(fields: dict[str, Any], names: str) -> None:
    message = config_error(**fields)
    assert names in message, message
    assert message.startswith("apps.0"), message


def test_the_old_unsigned_cap_still_works_and_the_new_place_too() -> None:
    assert app_settings(max_unsigned_connections=5).unsigned_cap == 5
    assert app_settings(anonymous={"max_connections": 6}).unsigned_cap == 6
    both = app_settings(max_unsigned_connections=7, anonymous={"max_connections": 7})
    assert both.unsigned_cap == 7
    for fields in ({"max_unsigned_connections": 1}, {"anonymous": {"max_connections": 1}}):
        node = HubNode(MemoryNodes(1).cluster.join("n"), MemoryNodes(1).clock, **fields)
        node.client()
        assert node.hub.admit(node.app) is Reason.UNSIGNED_OVER_QUOTA


# --- a hub puts each connection in its tier -------------------------------------------------


def channels_held(node: HubNode, client: Client, count: int) -> list[Reason]:
    """Subscribe to ``count`` public channels; the refusals met."""
    refused = []
    for index in range(count):
        try:
            node.subscribe(client, f"room-{index}")
        except Refused as refusal:
            refused.append(refusal.reason)
    return refused


def test_anonymous_signed_in_and_role_connections_each_get_their_limits() -> None:
    nodes = MemoryNodes(1, **ROLES)
    (node,) = nodes
    anonymous, plain, staff, guest = (node.client() for _ in range(4))
    node.signin(plain, {"id": "p"})
    node.signin(staff, {"id": "s", "role": "staff"})
    node.signin(guest, {"id": "g", "role": "guest"})
    assert channels_held(node, anonymous, 2) == [Reason.SUBSCRIBE_TOO_MANY_CHANNELS]
    assert channels_held(node, plain, 4) == [Reason.SUBSCRIBE_TOO_MANY_CHANNELS]
    assert channels_held(node, guest, 3) == [Reason.SUBSCRIBE_TOO_MANY_CHANNELS]
    assert channels_held(node, staff, 10) == []
    assert (anonymous.session.tier, staff.session.tier) == (ANONYMOUS, "staff")


def test_the_client_event_rate_follows_the_role() -> None:
    nodes = MemoryNodes(1, enable_client_messages=True, **ROLES)
    (node,) = nodes
    plain, staff = node.client(), node.client()
    node.signin(plain, {"id": "p"})
    node.signin(staff, {"id": "s", "role": "staff"})

    def sent(client: Client, count: int) -> int:
        accepted = 0
        for n in range(count):
            try:
                node.client_event(client, "private-chat", {"n": n})
                accepted += 1
            except Refused as refusal:
                assert refusal.reason is Reason.CLIENT_EVENT_RATE
        return accepted

    for client in (plain, staff):
        node.subscribe(client, "private-chat")
    assert (sent(plain, 8), sent(staff, 8)) == (2, 5)


def test_an_unconfigured_role_gets_the_defaults_and_is_reported_once() -> None:
    nodes = MemoryNodes(1, **ROLES)
    (node,) = nodes
    notices: list[ev.Notice] = []
    node.hub.notices.append(notices.append)
    first, second, third = node.client(), node.client(), node.client()
    node.signin(first, {"id": "a", "role": "admin"})
    node.signin(second, {"id": "b", "role": "admin"})
    node.signin(third, {"id": "c", "role": "root"})
    assert [client.refusals for client in (first, second, third)] == [[], [], []]
    assert first.session.tier == SIGNED_IN
    assert notices == [ev.RoleUnknown("12345", "a", "admin"), ev.RoleUnknown("12345", "c", "root")]


def test_a_role_is_read_from_the_configured_user_data_key_only() -> None:
    nodes = MemoryNodes(1, role_key="tier", **ROLES)
    (node,) = nodes
    by_key, by_role = node.client(), node.client()
    node.signin(by_key, {"id": "a", "tier": "staff"})
    node.signin(by_role, {"id": "b", "role": "staff"})  # not the key this app reads
    assert (by_key.session.tier, by_role.session.tier) == ("staff", SIGNED_IN)


@pytest.mark.parametrize("role", ["x" * 65, "bad\x07", 42, ["staff"], ""])
def test_a_malformed_role_in_user_data_refuses_the_sign_in(role: Any) -> None:
    nodes = MemoryNodes(1, **ROLES)
    (node,) = nodes
    client = node.client()
    with pytest.raises(Refused) as info:
        node.signin(client, {"id": "a", "role": role})
    assert info.value.reason is Reason.SIGNIN_DATA_INVALID
    assert client.session.user_id is None and client.session.tier == ANONYMOUS


def test_a_role_change_on_a_fresh_sign_in_and_a_reload_apply_at_once() -> None:
    nodes = MemoryNodes(1, **ROLES)
    (node,) = nodes
    client = node.client()
    node.signin(client, {"id": "a", "role": "guest"})
    assert node.app.tiers[client.session.tier].max_channels_per_connection == 2
    node.signin(client, {"id": "a", "role": "staff"})
    assert node.app.tiers[client.session.tier].max_channels_per_connection == 10
    # A reload that drops the role: the connection has the signed-in defaults.
    reloaded = app_settings(max_channels_per_connection=3)
    node.app.apply(reloaded.model_copy(update={"id": node.app.id, "key": "app-key"}), None)
    assert node.app.tiers[client.session.tier].max_channels_per_connection == 3


# --- tokens ---------------------------------------------------------------------------------


def test_a_tokens_role_claim_is_read_under_its_configured_name() -> None:
    token = jwt.encode({"sub": "a", "exp": NOW + 60, "https://x/role": "staff"}, SECRET, "HS256")
    default = JwtVerifier(["HS256"], secret=SECRET.encode())
    named = JwtVerifier(["HS256"], secret=SECRET.encode(), role_claim="https://x/role")
    assert default.verify(token, NOW).role is None
    assert named.verify(token, NOW).role == "staff"


@pytest.mark.parametrize("role", ["x" * 65, "new\nline", "\u0085", 7, ["staff"], {"r": 1}, ""])
def test_a_token_with_a_malformed_role_is_refused_like_any_bad_token(role: Any) -> None:
    verifier = JwtVerifier(["HS256"], secret=SECRET.encode())
    token = jwt.encode({"sub": "a", "exp": NOW + 60, "role": role}, SECRET, "HS256")
    with pytest.raises(TokenError) as info:
        verifier.verify(token, NOW)
    assert info.value.check == "invalid_role"


def test_a_jwt_sign_in_takes_its_role_from_the_token_not_from_user_data() -> None:
    w = AuthWorld({}, roles={"staff": {"max_channels_per_connection": 9}})
    client, other = w.client(), w.client()
    w.signin(client, w.token(role="staff"), {"id": "alice", "role": "guest"})
    assert client.session.tier == "staff"
    w.signin(other, w.token(), {"id": "alice", "role": "staff"})  # user_data is not signed
    assert other.session.tier == SIGNED_IN
    refused = w.refused_signin(w.client(), w.token(role="x" * 100))
    assert refused.reason is Reason.SIGNIN_TOKEN_INVALID and "invalid_role" in refused.detail
