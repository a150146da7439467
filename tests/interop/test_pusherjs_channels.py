"""Every channel type with the real pusher-js client and both real server SDKs.

Publishing goes through the Node ``pusher`` SDK or the PyPI ``pusher`` SDK against the
REST API of a real Bastion process; pusher-js authorises private/presence/encrypted
channels through a customHandler that signs with the Node SDK (a real auth flow).
"""

from __future__ import annotations

import re

import pytest

from .node_driver import DriverError, NodeDriver


def test_pusherjs_connects_and_gets_a_valid_socket_id(driver: NodeDriver) -> None:
    socket_id = driver.connect("a")
    assert re.fullmatch(r"\d+\.\d+", socket_id), socket_id
    # pusher-js refuses a handshake without activity_timeout, so being connected proves it.
    assert driver.request("state", client="a")["state"] == "connected"


def test_public_channel_receives_node_sdk_trigger(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.subscribe("a", "news")

    response = driver.sdk("trigger", "news", "headline", {"title": "hello", "n": 1})

    assert response["status"] == 200
    event = driver.channel_event("a", "news", "headline")
    assert event["data"] == {"title": "hello", "n": 1}


def test_public_channel_receives_python_sdk_trigger(driver: NodeDriver, py_pusher) -> None:
    driver.connect("a")
    driver.subscribe("a", "news")

    assert py_pusher.trigger("news", "headline", {"title": "from python"}) == {}

    assert driver.channel_event("a", "news", "headline")["data"] == {"title": "from python"}


def test_private_channel_authorised_by_node_sdk(driver: NodeDriver, py_pusher) -> None:
    driver.connect("a")
    driver.subscribe("a", "private-orders")
    auth = driver.wait_event(kind="auth", client="a", channel="private-orders")
    assert "error" not in auth

    driver.sdk("trigger", "private-orders", "created", {"id": 7})
    py_pusher.trigger("private-orders", "shipped", {"id": 7})

    assert driver.channel_event("a", "private-orders", "created")["data"] == {"id": 7}
    assert driver.channel_event("a", "private-orders", "shipped")["data"] == {"id": 7}


def test_private_channel_with_bad_signature_gets_subscription_error_and_stays_connected(
    driver: NodeDriver,
) -> None:
    driver.connect("mallory", authSecret="not-the-app-secret")
    driver.subscribe("mallory", "private-orders", wait=False)

    error = driver.wait_event(
        kind="channel",
        client="mallory",
        channel="private-orders",
        where=lambda e: (
            e["event"] in ("pusher:subscription_error", "pusher:subscription_succeeded")
        ),
    )

    assert error["event"] == "pusher:subscription_error", error
    assert error["data"]["type"] == "AuthError"
    assert error["data"]["status"] == 401
    assert isinstance(error["data"]["error"], str) and error["data"]["error"]
    # A per-channel failure never closes the socket: the same connection still works.
    driver.subscribe("mallory", "news")
    driver.sdk("trigger", "news", "still-here", {"ok": True})
    assert driver.channel_event("mallory", "news", "still-here")["data"] == {"ok": True}
    assert driver.request("state", client="mallory")["state"] == "connected"
    assert not driver.events(kind="conn_error", client="mallory")


def test_encrypted_channel_end_to_end_with_node_sdk(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.subscribe("a", "private-encrypted-vault")
    auth = driver.wait_event(kind="auth", client="a", channel="private-encrypted-vault")
    assert auth["hasSharedSecret"] is True

    response = driver.sdk(
        "trigger", "private-encrypted-vault", "secret", {"pin": "1234", "msg": "héllo"}
    )

    assert response["status"] == 200
    # pusher-js decrypted it with the shared secret from the Node SDK's authorizeChannel.
    assert driver.channel_event("a", "private-encrypted-vault", "secret")["data"] == {
        "pin": "1234",
        "msg": "héllo",
    }
    # ... and what crossed the wire (relayed untouched by Bastion) was ciphertext.
    wire = driver.wait_event(
        kind="message", client="a", channel="private-encrypted-vault", event="secret"
    )
    assert set(wire["data"]) == {"nonce", "ciphertext"}
    assert "1234" not in str(wire["data"])


def test_encrypted_channel_end_to_end_with_python_sdk(driver: NodeDriver, py_pusher) -> None:
    # py_pusher and the driver share the test's encryption master key.
    driver.connect("a")
    driver.subscribe("a", "private-encrypted-vault")

    assert py_pusher.trigger("private-encrypted-vault", "secret", {"from": "python"}) == {}

    assert driver.channel_event("a", "private-encrypted-vault", "secret")["data"] == {
        "from": "python"
    }
    wire = driver.wait_event(
        kind="message", client="a", channel="private-encrypted-vault", event="secret"
    )
    assert set(wire["data"]) == {"nonce", "ciphertext"}


def test_encrypted_channel_refuses_client_events_in_pusherjs(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.subscribe("a", "private-encrypted-vault")

    with pytest.raises(DriverError) as excinfo:
        driver.request(
            "trigger", client="a", channel="private-encrypted-vault", event="client-x", data={}
        )

    assert "not currently supported" in str(excinfo.value)


def test_cache_channel_replays_last_rest_event_to_a_new_subscriber(
    driver: NodeDriver, py_pusher
) -> None:
    assert driver.sdk("trigger", "cache-scores", "score", {"v": 1})["status"] == 200
    assert py_pusher.trigger("cache-scores", "score", {"v": 2}) == {}
    driver.connect("late")

    succeeded = driver.subscribe("late", "cache-scores")

    replay = driver.channel_event("late", "cache-scores", "score")
    assert replay["data"] == {"v": 2}
    assert replay["seq"] > succeeded["seq"], "the cached event comes after subscription_succeeded"
    assert not driver.events(
        kind="channel", client="late", channel="cache-scores", event="pusher:cache_miss"
    )
    # Only the last event is kept.
    assert [e["data"] for e in driver.events(kind="channel", client="late", event="score")] == [
        {"v": 2}
    ]


def test_cache_channel_without_value_sends_cache_miss(driver: NodeDriver) -> None:
    driver.connect("a")

    succeeded = driver.subscribe("a", "cache-empty")

    miss = driver.channel_event("a", "cache-empty", "pusher:cache_miss")
    assert miss["seq"] > succeeded["seq"]
    raw = driver.wait_event(kind="message", client="a", event="pusher:cache_miss")
    assert raw["channel"] == "cache-empty"


def test_private_cache_channel_replays_to_an_authorised_subscriber(driver: NodeDriver) -> None:
    assert driver.sdk("trigger", "private-cache-state", "state", {"phase": "b"})["status"] == 200
    driver.connect("a")

    driver.subscribe("a", "private-cache-state")

    assert driver.channel_event("a", "private-cache-state", "state")["data"] == {"phase": "b"}


def test_live_events_on_a_cache_channel_reach_current_subscribers(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.subscribe("a", "cache-live")
    driver.channel_event("a", "cache-live", "pusher:cache_miss")

    driver.sdk("trigger", "cache-live", "tick", {"n": 1})

    assert driver.channel_event("a", "cache-live", "tick")["data"] == {"n": 1}
