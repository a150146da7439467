"""Presence channels with two (or three) real pusher-js clients.

Member identities come from the Node SDK's ``authorizeChannel(socketId, channel,
presenceData)`` inside pusher-js's customHandler, exactly as an app's auth endpoint.
"""

from __future__ import annotations

from .node_driver import NodeDriver

ROOM = "presence-room"
ALICE = {"user_id": "alice", "user_info": {"name": "Alice"}}
BOB = {"user_id": "bob", "user_info": {"name": "Bob"}}


def _ids(snapshot: dict) -> list[str]:
    return [m["id"] for m in snapshot["members"]]


def test_member_list_member_added_and_member_removed(driver: NodeDriver) -> None:
    driver.connect("a", presenceData=ALICE)
    driver.connect("b", presenceData=BOB)

    first = driver.subscribe("a", ROOM)
    assert first["data"]["count"] == 1
    assert first["data"]["me"] == {"id": "alice", "info": {"name": "Alice"}}
    assert first["data"]["members"] == [{"id": "alice", "info": {"name": "Alice"}}]

    second = driver.subscribe("b", ROOM)
    # The joiner's list includes everyone, itself too.
    assert second["data"]["count"] == 2
    assert second["data"]["me"] == {"id": "bob", "info": {"name": "Bob"}}
    assert second["data"]["members"] == [
        {"id": "alice", "info": {"name": "Alice"}},
        {"id": "bob", "info": {"name": "Bob"}},
    ]
    added = driver.channel_event("a", ROOM, "pusher:member_added")
    assert added["data"] == {"id": "bob", "info": {"name": "Bob"}}
    assert driver.request("members", client="a", channel=ROOM)["count"] == 2
    # The joiner is not told about its own arrival (checked after a barrier event).
    driver.sdk("trigger", ROOM, "barrier", {})
    driver.channel_event("b", ROOM, "barrier")
    assert not driver.events(kind="channel", client="b", event="pusher:member_added")

    driver.request("disconnect", client="b")

    removed = driver.channel_event("a", ROOM, "pusher:member_removed")
    assert removed["data"] == {"id": "bob", "info": {"name": "Bob"}}
    snapshot = driver.request("members", client="a", channel=ROOM)
    assert snapshot["count"] == 1
    assert _ids(snapshot) == ["alice"]


def test_unsubscribe_removes_the_member(driver: NodeDriver) -> None:
    driver.connect("a", presenceData=ALICE)
    driver.connect("b", presenceData=BOB)
    driver.subscribe("a", ROOM)
    driver.subscribe("b", ROOM)
    driver.channel_event("a", ROOM, "pusher:member_added")

    driver.request("unsubscribe", client="b", channel=ROOM)

    removed = driver.channel_event("a", ROOM, "pusher:member_removed")
    assert removed["data"]["id"] == "bob"


def test_same_user_on_two_sockets_is_one_member(driver: NodeDriver) -> None:
    # "sync" is a plain channel whose subscription_count events tell the observer, without
    # sleeping, that the server has processed a socket's disconnect.
    driver.connect("observer", presenceData=BOB)
    driver.subscribe("observer", ROOM)
    driver.subscribe("observer", "sync")

    driver.connect("tab1", presenceData=ALICE)
    driver.subscribe("tab1", ROOM)
    driver.subscribe("tab1", "sync")
    added = driver.channel_event("observer", ROOM, "pusher:member_added")
    assert added["data"]["id"] == "alice"
    two_on_sync = driver.wait_event(
        kind="channel",
        client="observer",
        channel="sync",
        event="pusher:subscription_count",
        where=lambda e: e["data"]["subscription_count"] == 2,
    )

    driver.connect("tab2", presenceData=ALICE)
    tab2 = driver.subscribe("tab2", ROOM)

    # tab2 sees two users (alice once), not three entries.
    assert tab2["data"]["count"] == 2
    assert _ids(tab2["data"]) == ["alice", "bob"]
    # Barrier: an event published after tab2 joined reaches the observer after any
    # member_added that tab2's join could have caused.
    driver.sdk("trigger", ROOM, "barrier-1", {})
    driver.channel_event("observer", ROOM, "barrier-1")
    assert len(driver.events(kind="channel", client="observer", event="pusher:member_added")) == 1
    assert driver.request("members", client="observer", channel=ROOM)["count"] == 2
    users = driver.sdk("get", {"path": f"/channels/{ROOM}/users"})
    assert users["status"] == 200
    assert sorted(u["id"] for u in users["body"]["users"]) == ["alice", "bob"]

    # Closing one of alice's two sockets must not remove her.
    driver.request("disconnect", client="tab1")
    driver.wait_event(
        kind="channel",
        client="observer",
        channel="sync",
        event="pusher:subscription_count",
        where=lambda e: e["seq"] > two_on_sync["seq"] and e["data"]["subscription_count"] == 1,
    )
    driver.sdk("trigger", ROOM, "barrier-2", {})
    driver.channel_event("observer", ROOM, "barrier-2")
    assert not driver.events(kind="channel", client="observer", event="pusher:member_removed")
    assert driver.request("members", client="observer", channel=ROOM)["count"] == 2

    # Closing her last socket does.
    driver.request("disconnect", client="tab2")
    removed = driver.channel_event("observer", ROOM, "pusher:member_removed")
    assert removed["data"]["id"] == "alice"
    assert driver.request("members", client="observer", channel=ROOM)["count"] == 1


def test_presence_rest_queries_match_what_clients_see(driver: NodeDriver, py_pusher) -> None:
    driver.connect("a", presenceData=ALICE)
    driver.connect("b", presenceData=BOB)
    driver.subscribe("a", ROOM)
    driver.subscribe("b", ROOM)

    assert sorted(u["id"] for u in py_pusher.users_info(ROOM)["users"]) == ["alice", "bob"]
    info = py_pusher.channel_info(ROOM, ["user_count"])
    assert info["occupied"] is True
    assert info["user_count"] == 2


def test_presence_identity_from_signin_without_channel_data(driver: NodeDriver) -> None:
    # pusher-js supports an auth response without channel_data when the connection is
    # signed in: the member is the signed-in user (spec §6.1 step 3).
    driver.connect(
        "a", userData={"id": "alice", "user_info": {"name": "Alice"}}, omitChannelData=True
    )
    driver.connect("b", presenceData=BOB)
    driver.request("signin", client="a")
    driver.wait_event(kind="message", client="a", event="pusher:signin_success")
    driver.subscribe("b", ROOM)

    joined = driver.subscribe("a", ROOM)

    assert joined["data"]["me"] == {"id": "alice", "info": {"name": "Alice"}}
    assert _ids(joined["data"]) == ["alice", "bob"]
    added = driver.channel_event("b", ROOM, "pusher:member_added")
    assert added["data"] == {"id": "alice", "info": {"name": "Alice"}}
