"""JWT mode with the real pusher-js: sign-in with a token, channel grants without an
auth round trip, a ticket, and the expiry warning → renewal → close lifecycle.

The app's back end is played by this test: it mints the tokens (PyJWT) and hands them
to pusher-js's customHandlers (driver scenario ``jwt_connect`` / ``jwt_renew``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from support.server import BastionProcess, app_spec

from .node_driver import NodeDriver

JWT_SECRET = "interop-jwt-secret-at-least-32-characters"
ALICE = {"id": "alice"}


def token(sub: str = "alice", ttl: float = 600, **claims: Any) -> str:
    payload = {"sub": sub, "exp": time.time() + ttl, **claims}
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


@pytest.fixture
def jwt_driver(
    make_bastion: Callable[..., BastionProcess], make_driver: Callable[..., NodeDriver]
) -> Callable[..., NodeDriver]:
    def factory(**jwt_fields: Any) -> NodeDriver:
        app = app_spec(jwt={"algorithms": ["HS256"], "secret": JWT_SECRET, **jwt_fields})
        # pong_timeout 1: the heartbeat that checks token expiry ticks every 0.25 s.
        server = make_bastion(apps=[app], server={"pong_timeout": 1})
        return make_driver(server)

    return factory


def signin(driver: NodeDriver, client: str) -> dict[str, Any]:
    driver.request("signin", client=client)
    return driver.wait_event(kind="message", client=client, event="pusher:signin_success")


def test_signin_and_grants_without_an_auth_endpoint(jwt_driver: Callable[..., NodeDriver]) -> None:
    driver = jwt_driver()
    sign_in = token(channels=["private-orders-*", "presence-room-1"], user_info={"name": "Alice"})
    driver.request("jwt_connect", client="a", token=sign_in, userData=ALICE)
    success = signin(driver, "a")
    assert json.loads(success["data"]["user_data"]) == ALICE
    assert driver.request("user_data", client="a") == ALICE

    driver.subscribe("a", "private-orders-42")
    driver.subscribe("a", "presence-room-1")
    members = driver.request("members", client="a", channel="presence-room-1")
    assert members["myID"] == "alice"
    assert members["members"] == [{"id": "alice", "info": {"name": "Alice"}}]

    driver.request("subscribe", client="a", channel="private-payroll")
    error = driver.wait_event(
        kind="channel", client="a", channel="private-payroll", event="pusher:subscription_error"
    )
    assert error["data"]["type"] == "AuthError"
    assert error["data"]["status"] == 401


def test_ticket_for_a_channel(jwt_driver: Callable[..., NodeDriver]) -> None:
    driver = jwt_driver()
    ticket = token(sub="guest-1", channels=["presence-lobby"], user_info={"guest": True})
    channel_data = json.dumps({"user_id": "guest-1"})
    auth = {"presence-lobby": {"auth": ticket, "channel_data": channel_data}}
    driver.request("jwt_connect", client="g", token=token(), userData=ALICE, channelAuth=auth)
    driver.subscribe("g", "presence-lobby")  # no sign-in at all: the ticket is enough
    members = driver.request("members", client="g", channel="presence-lobby")
    assert members["myID"] == "guest-1"
    assert members["members"] == [{"id": "guest-1", "info": {"guest": True}}]


def test_expiry_warning_renewal_and_close(jwt_driver: Callable[..., NodeDriver]) -> None:
    driver = jwt_driver(leeway_seconds=0, expiry_warning_seconds=1, expiry_grace_seconds=0.3)
    # "a" renews when warned; "b" does not. Both tokens would close them ~1.3 s from now.
    for client in ("a", "b"):
        driver.request("jwt_connect", client=client, token=token(ttl=1), userData=ALICE)
        signin(driver, client)
    for client in ("a", "b"):
        warning = driver.wait_event(kind="global", client=client, event="bastion:token_expiring")
        assert 0 <= warning["data"]["expires_in"] <= 1
    driver.request("jwt_renew", client="a", token=token(ttl=2.5))
    driver.wait_event(kind="message", client="a", event="pusher:signin_success")

    error = driver.wait_event(
        kind="conn_error",
        client="b",
        where=lambda e: (e["error"].get("data") or {}).get("code") == 4009,
    )
    assert error["error"]["data"]["message"] == "Sign-in token expired and was not renewed"
    # "a" gets the renewed token's warning ~1.5 s after renewal, past the first close.
    driver.wait_event(kind="global", client="a", event="bastion:token_expiring")
    assert driver.request("state", client="a")["state"] == "connected"
