"""Limits by event name (issue #15 item 3): the rule of a name, and the hub's buckets."""

from __future__ import annotations

from typing import Any

import pytest
from support.hubs import Client, HubNode, MemoryNodes

from bastion.config import settings_from_mapping
from bastion.errors import ConfigError, Refused
from bastion.protocol import messages as msg
from bastion.protocol.refusals import Reason
from bastion.security.event_limits import MAX_REMEMBERED, EventLimits, is_valid_pattern


def test_the_exact_name_wins_then_the_longest_prefix() -> None:
    rules = EventLimits({"client-*": 1, "client-cursor-*": 2, "client-cursor-move": 3})
    assert rules.match("client-cursor-move") == ("client-cursor-move", 3)
    assert rules.match("client-cursor-click") == ("client-cursor-*", 2)
    assert rules.match("client-typing") == ("client-*", 1)
    assert EventLimits({"client-typing": 1}).match("client-typed") is None
    assert not EventLimits({}).active and rules.active


def test_remembered_names_are_bounded() -> None:
    rules = EventLimits({"client-a*": 1})
    for index in range(MAX_REMEMBERED + 50):
        rules.match(f"client-b{index}")
    assert len(rules._remembered) == MAX_REMEMBERED
    assert rules.match("client-a-late") == ("client-a*", 1)  # still answered, past the bound


@pytest.mark.parametrize(
    ("pattern", "prefix", "valid"),
    [
        ("client-typing", "client-", True),
        ("client-cursor-*", "client-", True),
        ("client-*", "client-", True),
        ("typing", "client-", False),
        ("client-*-x", "client-", False),
        ("client-a\nb", "client-", False),
        ("price-update", "", True),
        ("price-*", "", True),
        ("*", "", True),
        ("a*b", "", False),
    ],
)
def test_what_a_rule_may_name(pattern: str, prefix: str, valid: bool) -> None:
    assert is_valid_pattern(pattern, prefix) is valid


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"client_event_limits": {"typing": {"rate": 1, "burst": 1}}}, "client_event_limits"),
        ({"client_event_limits": {"client-*x": {"rate": 1, "burst": 1}}}, "client_event_limits"),
        (
            {"client_event_limits": {"client-t": {"rate": 0, "burst": 1}}},
            "client_event_limits.client-t.rate",
        ),
        (
            {"client_event_limits": {"client-t": {"rate": 1, "burst": -1}}},
            "client_event_limits.client-t.burst",
        ),
        ({"client_event_limits": {"client-t": {"rate": 1}}}, "client_event_limits.client-t.burst"),
        ({"rest_event_limits": {"a*b": {"rate": 1, "burst": 1}}}, "rest_event_limits"),
        (
            {"rest_event_limits": {"price": {"rate": -2, "burst": 1}}},
            "rest_event_limits.price.rate",
        ),
    ],
)
def test_bad_event_limits_fail_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"apps": [{"id": "1", "key": "k", "secret": "s", **fields}]}, {})
    assert f"apps.0.{field}" in str(info.value), str(info.value)


# --- the hub's buckets -----------------------------------------------------------------------

LIMITS = {
    "enable_client_messages": True,
    "max_client_events_per_second": 100,
    "client_event_limits": {
        "client-typing": {"rate": 0.5, "burst": 2},
        "client-cursor-*": {"rate": 0.5, "burst": 3, "per_user": True},
    },
}


def send(node: HubNode, client: Client, name: str) -> Reason | None:
    request = msg.ClientEvent(name, "private-room", {})
    try:
        node.hub.client_event(node.app, client.session, request)
    except Refused as refused:
        return refused.reason
    return None


def joined(node: HubNode, user: str | None = None) -> Client:
    client = node.client()
    if user is not None:
        node.signin(client, {"id": user})
    node.subscribe(client, "private-room")
    return client


def test_a_names_bucket_refuses_it_while_other_names_still_pass() -> None:
    (node,) = MemoryNodes(1, **LIMITS)
    client, other = joined(node), joined(node)
    assert [send(node, client, "client-typing") for _ in range(3)] == [
        None,
        None,
        Reason.CLIENT_EVENT_TYPE_RATE,
    ]
    assert send(node, client, "client-message") is None  # no rule: passes
    assert send(node, other, "client-typing") is None  # per connection
    node.clock.advance(2)  # one token back at 0.5/s
    assert send(node, client, "client-typing") is None
    assert send(node, client, "client-typing") is Reason.CLIENT_EVENT_TYPE_RATE


def test_a_per_user_bucket_is_shared_by_the_users_connections_only() -> None:
    (node,) = MemoryNodes(1, **LIMITS)
    tab1, tab2, bob = joined(node, "alice"), joined(node, "alice"), joined(node, "bob")
    anonymous1, anonymous2 = joined(node), joined(node)
    sent = [send(node, tab1, "client-cursor-move") for _ in range(2)]
    sent.append(send(node, tab2, "client-cursor-click"))  # same rule, same user
    sent.append(send(node, tab2, "client-cursor-move"))
    assert sent == [None, None, None, Reason.CLIENT_EVENT_TYPE_RATE]
    assert send(node, bob, "client-cursor-move") is None
    for anonymous in (anonymous1, anonymous2):  # no user: the connection's own only
        assert [send(node, anonymous, "client-cursor-x") for _ in range(4)][-1] is (
            Reason.CLIENT_EVENT_TYPE_RATE
        )
        assert send(node, anonymous, "client-typing") is None


def test_a_refusal_by_the_users_bucket_keeps_the_connections_token() -> None:
    (node,) = MemoryNodes(1, **LIMITS)
    tab1, tab2 = joined(node, "alice"), joined(node, "alice")
    for _ in range(3):
        assert send(node, tab1, "client-cursor-a") is None
    assert send(node, tab2, "client-cursor-a") is Reason.CLIENT_EVENT_TYPE_RATE
    assert tab2.session.event_buckets in (None, {})  # tab2 spent nothing of its own
