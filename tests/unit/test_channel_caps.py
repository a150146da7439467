"""Channel caps (#11 item 3): per connection, per app and per node, refused before any work."""

from __future__ import annotations

import asyncio

import pytest
from support.hubs import APP_ID, HubNode, MemoryNodes

from bastion.adapters.base import ChannelState
from bastion.eager import start
from bastion.errors import Refused
from bastion.protocol.refusals import Reason


def refused(node: HubNode, client: object, channel: str) -> Refused:
    with pytest.raises(Refused) as info:
        node.subscribe(client, channel)  # type: ignore[arg-type]
    assert info.value.channel == channel
    return info.value


def test_a_connection_holds_at_most_its_channel_cap() -> None:
    (node,) = MemoryNodes(1, max_channels_per_connection=3)
    client = node.client()
    for index in range(3):
        node.subscribe(client, f"room-{index}")
    node.subscribe(client, "room-0")  # subscribing again is not a new channel
    assert refused(node, client, "room-3").reason is Reason.SUBSCRIBE_TOO_MANY_CHANNELS
    # The refusal comes before authorization: no signature is checked for it.
    assert refused(node, client, "private-x").reason is Reason.SUBSCRIBE_TOO_MANY_CHANNELS
    node.leave(client, "room-0")
    node.subscribe(client, "room-3")
    other = node.client()
    node.subscribe(other, "room-9")  # the cap is per connection


def test_an_app_and_a_node_open_at_most_their_channel_caps() -> None:
    (node,) = MemoryNodes(1, server={"max_channels": 5}, max_channels=3)
    clients = [node.client() for _ in range(4)]
    for index in range(3):
        node.subscribe(clients[index], f"room-{index}")
    full = refused(node, clients[3], "room-3")
    assert full.reason is Reason.SUBSCRIBE_APP_CHANNELS_FULL
    assert full.reason.value.severity == "info"  # capacity, not the peer's fault
    node.subscribe(clients[3], "room-0")  # an existing channel still takes subscribers
    node.close(clients[0])  # room-0 keeps clients[3]
    node.leave(clients[1], "room-1")  # room-1 vacates
    node.subscribe(clients[1], "room-3")
    assert node.hub.channels.count == 3


def test_the_node_cap_counts_every_apps_channels() -> None:
    (node,) = MemoryNodes(1, server={"max_channels": 2})
    a, b = node.client(), node.client()
    node.subscribe(a, "one")
    node.subscribe(b, "two")
    assert refused(node, a, "three").reason is Reason.SUBSCRIBE_NODE_CHANNELS_FULL
    node.leave(b, "two")
    node.subscribe(a, "three")


def test_a_channels_query_is_bounded_and_says_so() -> None:
    (node,) = MemoryNodes(1)
    for index in range(30):
        node.subscribe(node.client(), f"room-{index:02d}")
    states = start(node.hub.state.channel_states(APP_ID, None, "room-", limit=10))
    assert not isinstance(states, asyncio.Task)
    assert len(states) == 11  # the limit and one more: "there were more"
    assert all(state == ChannelState(True, 1, 0) for state in states.values())
    everything = start(node.hub.state.channel_states(APP_ID, None))
    assert not isinstance(everything, asyncio.Task) and len(everything) == 30
