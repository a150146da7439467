"""Connections per user (``max_connections_per_user``) across hubs of one in-memory cluster.

The same decisions the Redis script takes (tests/integration/test_user_limits.py
holds them over a real Redis): each connection counts once, wherever it is; a
sign-in over the cap is refused (the connection stays, anonymous) or replaces the
user's oldest connections, on whichever node they are.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.hubs import APP_ID, Client, HubNode, MemoryNodes

from bastion.core import events as ev
from bastion.errors import Refused
from bastion.protocol.refusals import Reason


def reasons(client: Client) -> list[Reason]:
    return [refused.reason for refused in client.refusals]


def signed_in(node: HubNode, client: Client) -> bool:
    return client.session.user_id is not None and client.socket_id in node.app.users.get(
        client.session.user_id, {}
    )


def counted(nodes: MemoryNodes, user_id: str) -> list[str]:
    """The user's counted connections in the cluster, oldest first."""
    return list(nodes.cluster.connections.get((APP_ID, user_id), {}))


def test_a_sign_in_over_the_cap_is_refused_on_any_node_and_stays_anonymous() -> None:
    nodes = MemoryNodes(2, max_connections_per_user=2)
    a, b = nodes
    first, second, third = a.client(), b.client(), b.client()
    a.signin(first, {"id": "alice"})
    b.signin(second, {"id": "alice"})
    b.signin(third, {"id": "alice"})
    assert signed_in(a, first) and signed_in(b, second)
    assert reasons(third) == [Reason.USER_CONNECTION_LIMIT]
    assert not signed_in(b, third) and third.session.user_id is None
    assert "pusher:signin_success" not in third.events()
    assert b.app.unsigned == 1  # still counted as an anonymous connection
    # Another user is not affected.
    bob = a.client()
    a.signin(bob, {"id": "bob"})
    assert signed_in(a, bob)
    # Once one of alice's connections closes (on the other node), there is room.
    a.close(first)
    b.signin(third, {"id": "alice"})
    assert signed_in(b, third)
    assert counted(nodes, "alice") == [second.socket_id, third.socket_id]


def test_close_oldest_replaces_the_oldest_connection_on_whichever_node_it_is() -> None:
    nodes = MemoryNodes(2, max_connections_per_user=1, user_connection_policy="close_oldest")
    a, b = nodes
    old, new = a.client(), b.client()
    a.signin(old, {"id": "alice"})
    b.signin(new, {"id": "alice"})
    assert signed_in(b, new)
    assert counted(nodes, "alice") == [new.socket_id]
    assert reasons(old) == []  # node a hears of it over the bus
    nodes.settle()
    assert reasons(old) == [Reason.SESSION_REPLACED]
    assert reasons(new) == []
    a.close(old)  # what the server does with the 4009 close
    assert counted(nodes, "alice") == [new.socket_id]


def test_close_oldest_keeps_the_newest_connections_up_to_the_cap() -> None:
    nodes = MemoryNodes(1, max_connections_per_user=2, user_connection_policy="close_oldest")
    (a,) = nodes
    clients = [a.client() for _ in range(4)]
    for client in clients:
        a.signin(client, {"id": "alice"})
    assert [reasons(client) for client in clients] == [
        [Reason.SESSION_REPLACED],
        [Reason.SESSION_REPLACED],
        [],
        [],
    ]
    assert counted(nodes, "alice") == [clients[2].socket_id, clients[3].socket_id]


def test_signing_in_again_as_the_same_user_is_not_counted_again() -> None:
    nodes = MemoryNodes(1, max_connections_per_user=1)
    (a,) = nodes
    client = a.client()
    a.signin(client, {"id": "alice"})
    a.signin(client, {"id": "alice"})  # a fresh sign-in of the same connection
    assert reasons(client) == []
    assert counted(nodes, "alice") == [client.socket_id]


def test_closing_a_connection_uncounts_it_and_a_leaving_node_uncounts_all_of_its() -> None:
    nodes = MemoryNodes(2, max_connections_per_user=3)
    a, b = nodes
    on_a = [a.client() for _ in range(2)]
    on_b = b.client()
    for client in on_a:
        a.signin(client, {"id": "alice"})
    b.signin(on_b, {"id": "alice"})
    a.close(on_a[0])
    assert counted(nodes, "alice") == [on_a[1].socket_id, on_b.socket_id]
    nodes.cluster.leave("node-1")  # node b dies (or stops)
    assert counted(nodes, "alice") == [on_a[1].socket_id]
    a.close(on_a[1])
    assert (APP_ID, "alice") not in nodes.cluster.connections


def test_without_a_cap_nothing_is_counted() -> None:
    nodes = MemoryNodes(1)
    (a,) = nodes
    clients = [a.client() for _ in range(3)]
    for client in clients:
        a.signin(client, {"id": "alice"})
    assert all(signed_in(a, client) for client in clients)
    assert nodes.cluster.connections == {}


def test_a_refused_sign_in_that_closes_leaves_no_count_behind() -> None:
    nodes = MemoryNodes(1, max_connections_per_user=1)
    (a,) = nodes
    first, second = a.client(), a.client()
    a.signin(first, {"id": "alice"})
    a.signin(second, {"id": "alice"})
    assert reasons(second) == [Reason.USER_CONNECTION_LIMIT]
    a.close(second)
    assert a.app.signing_in == {} and a.app.unsigned == 0
    assert counted(nodes, "alice") == [first.socket_id]


# --- suspensions (user_error_budget) ----------------------------------------------------------


def test_a_suspension_closes_the_users_connections_everywhere_and_refuses_sign_ins() -> None:
    nodes = MemoryNodes(2, user_error_budget={"rate": 1, "burst": 50, "cooldown_seconds": 60})
    a, b = nodes
    on_a, on_b, bob = a.client(), b.client(), b.client()
    a.signin(on_a, {"id": "mallory"})
    b.signin(on_b, {"id": "mallory"})
    b.signin(bob, {"id": "bob"})
    notices: list[Any] = []
    a.hub.notices.append(notices.append)
    on_other_node: list[Any] = []
    b.hub.notices.append(on_other_node.append)
    assert a.hub.suspend_user(a.app, "mallory", 60) == 1
    assert reasons(on_a) == [Reason.USER_SUSPENDED]
    nodes.settle()
    assert reasons(on_b) == [Reason.USER_SUSPENDED] and reasons(bob) == []
    assert notices == [ev.UserSuspended(APP_ID, "mallory", 60, 1)]
    assert on_other_node == []  # reported (audited) by the deciding node only
    for node in (a, b):  # refused on both nodes until the cool-down ends
        again = node.client()
        with pytest.raises(Refused) as refused:
            node.signin(again, {"id": "mallory"})
        assert refused.value.reason is Reason.SIGNIN_SUSPENDED
        assert again.session.user_id is None
    nodes.clock.advance(60)
    for node in (a, b):
        later = node.client()
        node.signin(later, {"id": "mallory"})
        assert signed_in(node, later)
        assert "mallory" not in node.app.suspended


def test_suspensions_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.core import users

    monkeypatch.setattr(users, "MAX_SUSPENDED", 3)
    (a,) = MemoryNodes(1)
    for index, cooldown in enumerate((50, 10, 30)):
        a.hub.users.suspend_local(a.app, f"u{index}", cooldown)
    a.hub.users.suspend_local(a.app, "u3", 40)  # full: u1 (ends soonest) goes
    assert sorted(a.app.suspended) == ["u0", "u2", "u3"]
    a.clock.advance(35)  # u2 ended: it goes first
    a.hub.users.suspend_local(a.app, "u4", 5)
    assert sorted(a.app.suspended) == ["u0", "u3", "u4"]
