"""User sign-in, server-to-user messages, watchlists and terminate_connections.

pusher-js's ``pusher.signin()`` runs a real user-authentication flow through a
customHandler that signs with the Node SDK's ``authenticateUser``.
"""

from __future__ import annotations

import json

import pusher.errors
import pytest

from .node_driver import NodeDriver

ALICE = {"id": "alice", "user_info": {"name": "Alice"}}


def _signin(driver: NodeDriver, client: str, user: dict) -> dict:
    """Connect + signin; wait for signin_success and the #server-to-user subscription."""
    driver.connect(client, userData=user)
    driver.request("signin", client=client)
    success = driver.wait_event(kind="message", client=client, event="pusher:signin_success")
    driver.wait_event(
        kind="message",
        client=client,
        event="pusher_internal:subscription_succeeded",
        channel=f"#server-to-user-{user['id']}",
    )
    return success


def test_signin_success(driver: NodeDriver) -> None:
    success = _signin(driver, "a", ALICE)

    assert json.loads(success["data"]["user_data"]) == ALICE
    # pusher-js accepted it: it parsed user_data and knows who it is.
    assert driver.request("user_data", client="a") == ALICE
    assert driver.request("state", client="a")["state"] == "connected"


def test_signin_with_a_bad_signature_is_closed_with_4009(driver: NodeDriver) -> None:
    driver.connect("mallory", userData={"id": "alice"}, authSecret="not-the-app-secret")

    driver.request("signin", client="mallory")

    error = driver.wait_event(
        kind="conn_error",
        client="mallory",
        where=lambda e: (e["error"].get("data") or {}).get("code") == 4009,
    )
    assert error["error"]["type"] == "PusherError"
    driver.wait_event(kind="state", client="mallory", current="disconnected")
    assert not driver.events(kind="message", client="mallory", event="pusher:signin_success")


def test_send_to_user_with_node_sdk(driver: NodeDriver) -> None:
    _signin(driver, "a", ALICE)
    _signin(driver, "a2", ALICE)  # a second tab of the same user
    _signin(driver, "b", {"id": "bob"})

    response = driver.sdk("sendToUser", "alice", "notice", {"text": "hello alice"})

    assert response["status"] == 200
    assert driver.wait_event(kind="user", client="a", event="notice")["data"] == {
        "text": "hello alice"
    }
    assert driver.wait_event(kind="user", client="a2", event="notice")["data"] == {
        "text": "hello alice"
    }
    driver.sdk("sendToUser", "bob", "barrier", {})
    driver.wait_event(kind="user", client="b", event="barrier")
    assert not driver.events(kind="user", client="b", event="notice")


def test_send_to_user_with_python_sdk(driver: NodeDriver, py_pusher) -> None:
    _signin(driver, "a", ALICE)

    assert py_pusher.send_to_user("alice", "notice", {"from": "python"}) == {}

    assert driver.wait_event(kind="user", client="a", event="notice")["data"] == {"from": "python"}


def test_watchlist_online_and_offline_events(driver: NodeDriver) -> None:
    _signin(driver, "alice", ALICE)

    _signin(driver, "bob", {"id": "bob", "watchlist": ["alice", "carol"]})

    # Current status first: alice is online.
    online = driver.wait_event(
        kind="watchlist",
        client="bob",
        event="online",
        where=lambda e: "alice" in e["data"]["user_ids"],
    )
    assert online["data"]["name"] == "online"

    _signin(driver, "carol", {"id": "carol"})
    driver.wait_event(
        kind="watchlist",
        client="bob",
        event="online",
        where=lambda e: "carol" in e["data"]["user_ids"],
    )

    driver.request("disconnect", client="alice")
    offline = driver.wait_event(
        kind="watchlist",
        client="bob",
        event="offline",
        where=lambda e: "alice" in e["data"]["user_ids"],
    )
    assert offline["data"]["name"] == "offline"
    # The wire format pusher-js consumed: pusher_internal:watchlist_events with an events list.
    raw = driver.events(kind="message", client="bob", event="pusher_internal:watchlist_events")
    assert raw and all(isinstance(m["data"]["events"], list) for m in raw)
    # A user who does not watch anyone gets no watchlist events.
    assert not driver.events(kind="watchlist", client="carol")


def _assert_terminated(driver: NodeDriver, client: str) -> None:
    driver.wait_event(
        kind="conn_error",
        client=client,
        where=lambda e: (e["error"].get("data") or {}).get("code") == 4009,
    )
    driver.wait_event(kind="state", client=client, current="disconnected")


def test_terminate_user_connections_with_node_sdk(driver: NodeDriver) -> None:
    _signin(driver, "a", ALICE)
    _signin(driver, "a2", ALICE)
    _signin(driver, "b", {"id": "bob"})
    driver.connect("anon")
    driver.subscribe("anon", "news")

    response = driver.sdk("terminateUserConnections", "alice")

    assert response["status"] == 200
    _assert_terminated(driver, "a")
    _assert_terminated(driver, "a2")
    # Other users' and anonymous sockets are untouched.
    driver.sdk("sendToUser", "bob", "still-here", {})
    driver.wait_event(kind="user", client="b", event="still-here")
    driver.sdk("trigger", "news", "still-here", {})
    driver.channel_event("anon", "news", "still-here")
    assert not driver.events(kind="conn_error", client="b")
    assert not driver.events(kind="conn_error", client="anon")
    # 4009 means "do not reconnect": pusher-js stays disconnected.
    assert driver.request("state", client="a")["state"] == "disconnected"


def test_terminate_user_connections_with_python_sdk(driver: NodeDriver, py_pusher) -> None:
    # PyPI pusher 3.3.x POSTs to /users/{user_id}/terminate_connections, without the
    # /apps/{app_id} prefix (signed over that path): Bastion must accept it as is.
    _signin(driver, "a", ALICE)

    try:
        result = py_pusher.terminate_user_connections("alice")
    except pusher.errors.PusherError as exc:
        pytest.fail(f"PyPI pusher terminate_user_connections was refused: {exc!r}")

    assert result == {}
    _assert_terminated(driver, "a")


def test_terminate_user_connections_signed_by_python_sdk_on_the_documented_path(
    driver: NodeDriver, py_pusher
) -> None:
    # The same request the SDK builds (its Request class: signing, body "{}", body_md5),
    # sent to the documented /apps/{app_id}/users/{user_id}/terminate_connections path.
    from pusher.http import POST, Request

    _signin(driver, "a", ALICE)
    client = py_pusher._pusher_client
    request = Request(client, POST, f"/apps/{client.app_id}/users/alice/terminate_connections", {})

    assert client.http.send_request(request) == {}
    _assert_terminated(driver, "a")
