"""One session per user with real pusher-js (issue #15): the old tab is closed, and stays so.

An app with ``max_connections_per_user = 1`` and ``user_connection_policy =
"close_oldest"``: when the same user signs in from a second "tab", the first is
closed with 4009 ``session_replaced``. pusher-js treats 4000-4099 as "do not
reconnect", so the old tab goes to ``disconnected`` and stays there instead of
reconnecting, signing in, and replacing the new tab in a loop. The sign-ins run
through pusher-js's own ``pusher.signin()`` flow (a customHandler signing with the
Node SDK's ``authenticateUser``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from support.server import BastionProcess, app_spec

from .node_driver import NodeDriver

ALICE = {"id": "alice", "user_info": {"name": "Alice"}}


def _signin(driver: NodeDriver, client: str, user: dict[str, Any]) -> None:
    driver.connect(client, userData=user)
    driver.request("signin", client=client)
    driver.wait_event(kind="message", client=client, event="pusher:signin_success")


def test_a_second_tab_closes_the_first_with_4009_and_it_does_not_reconnect(
    make_bastion: Callable[..., BastionProcess], make_driver: Callable[..., NodeDriver]
) -> None:
    app = app_spec(max_connections_per_user=1, user_connection_policy="close_oldest")
    server = make_bastion(apps=[app])
    driver = make_driver(server, app=app)
    _signin(driver, "old-tab", ALICE)
    _signin(driver, "bob", {"id": "bob"})

    _signin(driver, "new-tab", ALICE)

    error = driver.wait_event(
        kind="conn_error",
        client="old-tab",
        where=lambda e: (e["error"].get("data") or {}).get("code") == 4009,
    )
    assert error["error"]["type"] == "PusherError"
    driver.wait_event(kind="state", client="old-tab", current="disconnected")
    # A round trip through the server and back to both tabs: anything the old tab
    # would do on its own (reconnect, sign in again) has had time to start.
    assert driver.sdk("sendToUser", "alice", "barrier", {})["status"] == 200
    driver.wait_event(kind="user", client="new-tab", event="barrier")
    driver.sdk("sendToUser", "bob", "barrier", {})
    driver.wait_event(kind="user", client="bob", event="barrier")
    assert driver.request("state", client="old-tab")["state"] == "disconnected"
    states = [e["current"] for e in driver.events(kind="state", client="old-tab")]
    assert (
        states[-1] == "disconnected" and "connecting" not in states[states.index("disconnected") :]
    )
    assert states.count("connected") == 1  # never came back
    # The new tab, and another user, are untouched.
    assert driver.request("state", client="new-tab")["state"] == "connected"
    assert not driver.events(kind="conn_error", client="new-tab")
    assert not driver.events(kind="conn_error", client="bob")
    assert not driver.events(kind="user", client="old-tab", event="barrier")
