"""Client events between two real pusher-js clients.

"The sender does not receive its own event" is checked after a barrier: a REST event
published once the receiver has the client event. Bastion writes to each socket in
order, so if the sender were going to get its own event it would have it before the
barrier.
"""

from __future__ import annotations

import asyncio

from support.clients import PusherClient, data_of
from support.server import DEFAULT_APP

from .node_driver import NodeDriver

KEY = DEFAULT_APP["key"]


def test_private_client_event_reaches_others_but_not_the_sender(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.connect("b")
    driver.connect("c")
    for client in ("a", "b", "c"):
        driver.subscribe(client, "private-chat")

    sent = driver.request(
        "trigger", client="a", channel="private-chat", event="client-typing", data={"who": "a"}
    )

    assert sent["sent"] is True
    assert driver.channel_event("b", "private-chat", "client-typing")["data"] == {"who": "a"}
    assert driver.channel_event("c", "private-chat", "client-typing")["data"] == {"who": "a"}
    driver.sdk("trigger", "private-chat", "barrier", {})
    driver.channel_event("a", "private-chat", "barrier")
    assert not driver.events(kind="channel", client="a", event="client-typing")


def test_client_event_on_private_channel_has_no_user_id(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.connect("b")
    driver.subscribe("a", "private-chat")
    driver.subscribe("b", "private-chat")

    driver.request("trigger", client="a", channel="private-chat", event="client-x", data={"n": 1})

    wire = driver.wait_event(kind="message", client="b", channel="private-chat", event="client-x")
    assert wire["data"] == {"n": 1}
    assert wire["user_id"] is None


def test_presence_client_event_carries_sender_user_id_in_metadata(driver: NodeDriver) -> None:
    driver.connect("a", presenceData={"user_id": "alice", "user_info": {"name": "Alice"}})
    driver.connect("b", presenceData={"user_id": "bob", "user_info": {"name": "Bob"}})
    driver.subscribe("a", "presence-chat")
    driver.subscribe("b", "presence-chat")
    driver.request("bind", client="b", channel="presence-chat", event="client-msg")
    driver.request("bind", client="a", channel="presence-chat", event="client-msg")

    driver.request(
        "trigger", client="a", channel="presence-chat", event="client-msg", data={"text": "hi"}
    )

    bound = driver.wait_event(kind="bound", client="b", channel="presence-chat", event="client-msg")
    assert bound["data"] == {"text": "hi"}
    assert bound["metadata"] == {"user_id": "alice"}
    wire = driver.wait_event(
        kind="message", client="b", channel="presence-chat", event="client-msg"
    )
    assert wire["user_id"] == "alice"

    # ... and the reply the other way round carries bob.
    driver.request(
        "trigger", client="b", channel="presence-chat", event="client-msg", data={"text": "yo"}
    )
    reply = driver.wait_event(kind="bound", client="a", channel="presence-chat", event="client-msg")
    assert reply["data"] == {"text": "yo"}
    assert reply["metadata"] == {"user_id": "bob"}
    # Neither got its own message back (each got the other's, which came later).
    assert len(driver.events(kind="bound", client="a")) == 1
    assert len(driver.events(kind="bound", client="b")) == 1


def test_client_event_on_public_channel_is_not_relayed(driver: NodeDriver) -> None:
    driver.connect("a")
    driver.connect("b")
    driver.subscribe("a", "lobby")
    driver.subscribe("b", "lobby")

    # pusher-js lets an app try this; the server must not relay it.
    driver.request("trigger", client="a", channel="lobby", event="client-spam", data={})

    driver.sdk("trigger", "lobby", "barrier", {})
    driver.channel_event("b", "lobby", "barrier")
    assert not driver.events(kind="channel", client="b", event="client-spam")


async def test_client_event_on_encrypted_channel_is_refused(bastion, py_pusher) -> None:
    # pusher-js cannot even send one (see test_pusherjs_channels); a raw client can, and
    # Bastion must answer pusher:error and relay nothing.
    channel = "private-encrypted-vault"
    sender = await PusherClient.connect(bastion.ws_url(KEY))
    receiver = await PusherClient.connect(bastion.ws_url(KEY))
    try:
        for client in (sender, receiver):
            auth = py_pusher.authenticate(channel, client.socket_id)
            assert "shared_secret" in auth
            frame = await client.subscribe(channel, auth["auth"], interleaved=True)
            assert frame["event"] == "pusher_internal:subscription_succeeded", frame

        leak = {"event": "client-leak", "data": {"plain": "text"}, "channel": channel}
        await sender.send(leak)

        error = await sender.wait_for("pusher:error")
        assert isinstance(data_of(error), dict), error
        assert data_of(error).get("message"), error
        await asyncio.to_thread(py_pusher.trigger, channel, "barrier", {"n": 1})
        await receiver.wait_for("barrier", channel)
        assert not receiver.received("client-leak")
        assert sender.is_open, "a refused client event must not close the socket"
    finally:
        await sender.close()
        await receiver.close()
