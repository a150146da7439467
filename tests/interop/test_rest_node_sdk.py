"""Every REST endpoint through the npm ``pusher`` SDK (pusher-http-node) against Bastion.

Deliveries are observed by real pusher-js clients in the same Node driver.
(terminateUserConnections and sendToUser: see ``test_pusherjs_user.py``.)
"""

from __future__ import annotations

import pytest

from .node_driver import DriverError, NodeDriver


def test_trigger(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.subscribe("a", "news")
    driver.subscribe("a", "private-desk")

    single = driver.sdk("trigger", "news", "one", {"n": 1})
    multi = driver.sdk("trigger", ["news", "private-desk"], "many", "plain string")

    assert single == {"status": 200, "body": {}}
    assert multi == {"status": 200, "body": {}}
    assert driver.channel_event("a", "news", "one")["data"] == {"n": 1}
    assert driver.channel_event("a", "news", "many")["data"] == "plain string"
    assert driver.channel_event("a", "private-desk", "many")["data"] == "plain string"


def test_trigger_with_socket_id_excludes_that_connection(driver: NodeDriver) -> None:
    origin = driver.connect("origin")
    driver.connect("other")
    driver.subscribe("origin", "room")
    driver.subscribe("other", "room")

    driver.sdk("trigger", "room", "echo", {"n": 1}, {"socket_id": origin})
    driver.channel_event("other", "room", "echo")
    driver.sdk("trigger", "room", "barrier", {})

    driver.channel_event("origin", "room", "barrier")
    assert not driver.events(kind="channel", client="origin", event="echo")


def test_trigger_with_info(driver: NodeDriver) -> None:
    driver.connect("a", presenceData={"user_id": "alice"})
    driver.connect("b", presenceData={"user_id": "bob"})
    for client in ("a", "b"):
        driver.subscribe(client, "presence-hall")
        driver.subscribe(client, "plain")

    response = driver.sdk(
        "trigger",
        ["presence-hall", "plain"],
        "ev",
        {},
        {"info": "user_count,subscription_count"},
    )

    assert response["status"] == 200
    channels = response["body"]["channels"]
    assert channels["presence-hall"]["user_count"] == 2
    assert channels["plain"]["subscription_count"] == 2


def test_trigger_batch(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.subscribe("a", "b-one")
    driver.subscribe("a", "private-b-two")

    response = driver.sdk(
        "triggerBatch",
        [
            {"channel": "b-one", "name": "first", "data": {"i": 1}},
            {"channel": "private-b-two", "name": "second", "data": {"i": 2}},
        ],
    )

    assert response == {"status": 200, "body": {}}
    assert driver.channel_event("a", "b-one", "first")["data"] == {"i": 1}
    assert driver.channel_event("a", "private-b-two", "second")["data"] == {"i": 2}


def test_trigger_batch_with_info(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.subscribe("a", "counted")

    response = driver.sdk(
        "triggerBatch",
        [
            {"channel": "counted", "name": "x", "data": {}, "info": "subscription_count"},
            {"channel": "nobody", "name": "y", "data": {}},
        ],
    )

    assert response["status"] == 200
    assert response["body"]["batch"] == [{"subscription_count": 1}, {}]


def test_trigger_batch_to_an_encrypted_channel(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.subscribe("a", "private-encrypted-box")

    response = driver.sdk(
        "triggerBatch", [{"channel": "private-encrypted-box", "name": "s", "data": {"k": "v"}}]
    )

    assert response["status"] == 200
    assert driver.channel_event("a", "private-encrypted-box", "s")["data"] == {"k": "v"}


def test_get_channels(driver: NodeDriver) -> None:
    driver.connect("a", presenceData={"user_id": "alice"})
    driver.connect("b", presenceData={"user_id": "bob"})
    driver.subscribe("a", "presence-lobby")
    driver.subscribe("b", "presence-lobby")
    driver.subscribe("a", "news")

    everything = driver.sdk("get", {"path": "/channels"})
    presence = driver.sdk(
        "get",
        {"path": "/channels", "params": {"filter_by_prefix": "presence-", "info": "user_count"}},
    )

    assert everything["status"] == 200
    assert set(everything["body"]["channels"]) == {"presence-lobby", "news"}
    assert presence == {"status": 200, "body": {"channels": {"presence-lobby": {"user_count": 2}}}}


def test_get_channel(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.connect("b")
    driver.subscribe("a", "news")
    driver.subscribe("b", "news")

    news = driver.sdk("get", {"path": "/channels/news", "params": {"info": "subscription_count"}})
    empty = driver.sdk("get", {"path": "/channels/ghost-town"})

    assert news == {"status": 200, "body": {"occupied": True, "subscription_count": 2}}
    assert empty == {"status": 200, "body": {"occupied": False}}


def test_get_channel_user_count_on_a_public_channel_is_400(driver: NodeDriver) -> None:
    with pytest.raises(DriverError) as excinfo:
        driver.sdk("get", {"path": "/channels/news", "params": {"info": "user_count"}})

    assert excinfo.value.status == 400


def test_get_users(driver: NodeDriver) -> None:
    driver.connect("a", presenceData={"user_id": "alice", "user_info": {"name": "A"}})
    driver.connect("b", presenceData={"user_id": "bob"})
    driver.subscribe("a", "presence-team")
    driver.subscribe("b", "presence-team")

    users = driver.sdk("get", {"path": "/channels/presence-team/users"})

    assert users["status"] == 200
    assert sorted(u["id"] for u in users["body"]["users"]) == ["alice", "bob"]


def test_wrong_secret_is_rejected_with_401(driver: NodeDriver) -> None:
    impostor = {"secret": "not-the-app-secret"}

    for method, args in (
        ("trigger", ["news", "x", {}]),
        ("triggerBatch", [[{"channel": "news", "name": "x", "data": {}}]]),
        ("get", [{"path": "/channels"}]),
        ("terminateUserConnections", ["alice"]),
    ):
        with pytest.raises(DriverError) as excinfo:
            driver.sdk(method, *args, sdk=impostor)
        assert excinfo.value.status == 401, (method, excinfo.value)


def test_unknown_app_id_is_refused(driver: NodeDriver) -> None:
    with pytest.raises(DriverError) as excinfo:
        driver.sdk("trigger", "news", "x", {}, sdk={"appId": "99999"})

    assert excinfo.value.status in (401, 404)
