"""The cluster's rules across nodes, on N hubs sharing one in-memory cluster (no Redis).

The same decisions the Redis scripts take, decided at the call and delivered to
the other nodes when the test settles the bus queue. The Redis integration tests
(tests/integration/test_cluster_*.py) hold the same assertions over a real Redis.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from support.hubs import APP_ID, Client, MemoryNodes

from bastion.adapters.base import ChannelState
from bastion.core import events as ev
from bastion.eager import start
from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.counts import COUNT_THROTTLE_SECONDS, COUNT_THROTTLE_THRESHOLD
from bastion.protocol.refusals import Reason
from bastion.security.replay import Verdict

ROOM = "presence-room"


def members_of(frame: dict[str, Any]) -> dict[str, Any]:
    assert frame["event"] == "pusher_internal:subscription_succeeded"
    presence: dict[str, Any] = json.loads(frame["data"])["presence"]
    assert presence["count"] == len(presence["hash"]) == len(presence["ids"])
    hash_: dict[str, Any] = presence["hash"]
    return hash_


def of(client: Client, event: str) -> list[dict[str, Any]]:
    return [frame for frame in client.frames() if frame["event"] == event]


def read(coroutine: Any) -> Any:
    """A cluster read, answered at once by the in-memory cluster."""
    result = start(coroutine)
    assert not isinstance(result, asyncio.Task)
    return result


# --- events -----------------------------------------------------------------------------


def test_an_event_reaches_the_nodes_with_interest_once_and_only_them() -> None:
    nodes = MemoryNodes(3)
    a, b, c = nodes
    here, there = a.client(), b.client()
    a.subscribe(here, "news")
    b.subscribe(there, "news")
    idle = c.client()
    c.subscribe(idle, "other")
    nodes.settle()
    for client in (here, there, idle):
        client.take()
    c.publish("news", "update", '{"n":1}')
    assert nodes.settle() == 2  # a and b have interest; c delivered its own (none)
    expected = {"event": "update", "channel": "news", "data": '{"n":1}'}
    assert here.take() == [expected] and there.take() == [expected]
    assert idle.take() == []


def test_a_client_event_skips_its_sender_everywhere_and_carries_the_user_id() -> None:
    nodes = MemoryNodes(2, enable_client_messages=True)
    a, b = nodes
    alice, bob, carol = a.client(), b.client(), b.client()
    a.join(alice, ROOM, "alice")
    b.join(bob, ROOM, "bob")
    b.join(carol, ROOM, "carol")
    nodes.settle()
    for client in (alice, bob, carol):
        client.take()
    a.client_event(alice, ROOM, {"typing": True})
    nodes.settle()
    assert alice.take() == []
    frame = {"event": "client-typing", "channel": ROOM, "data": {"typing": True}}
    assert bob.take() == [{**frame, "user_id": "alice"}]
    assert carol.take() == [{**frame, "user_id": "alice"}]


# --- occupancy ----------------------------------------------------------------------------


def test_occupied_and_vacated_are_decided_once_for_the_cluster() -> None:
    nodes = MemoryNodes(2)
    a, b = nodes
    one, two = a.client(), b.client()
    a.subscribe(one, "news")
    b.subscribe(two, "news")
    a.leave(one, "news")
    assert nodes.events(ev.ChannelOccupied) == [ev.ChannelOccupied(APP_ID, "news")]
    assert nodes.events(ev.ChannelVacated) == []
    b.leave(two, "news")
    assert nodes.events(ev.ChannelVacated) == [ev.ChannelVacated(APP_ID, "news")]
    assert b.of(ev.ChannelVacated) == [ev.ChannelVacated(APP_ID, "news")]  # the last holder


def test_a_node_that_leaves_vacates_what_only_it_held_and_removes_its_members() -> None:
    nodes = MemoryNodes(2)
    a, b = nodes
    doomed, stays = a.client(), b.client()
    a.subscribe(doomed, "only-a")
    a.join(doomed, ROOM, "dora")
    b.join(stays, ROOM, "sam")
    nodes.settle()
    stays.take()
    asyncio.run(a.hub.bus.stop())  # the node leaves the cluster (its clients are gone)
    nodes.settle()
    assert nodes.events(ev.ChannelVacated) == [ev.ChannelVacated(APP_ID, "only-a")]
    assert nodes.events(ev.MemberRemoved) == [ev.MemberRemoved(APP_ID, ROOM, "dora")]
    assert [json.loads(f["data"]) for f in of(stays, "pusher_internal:member_removed")] == [
        {"user_id": "dora"}
    ]


# --- presence -------------------------------------------------------------------------------


def test_members_are_the_whole_clusters_and_added_once() -> None:
    nodes = MemoryNodes(3)
    a, b, c = nodes
    alice, bob, carol = a.client(), b.client(), c.client()
    a.join(alice, ROOM, "alice", {"name": "A"})
    nodes.settle()
    b.join(bob, ROOM, "bob", {"name": "B"})
    nodes.settle()
    c.join(carol, ROOM, "carol")
    nodes.settle()
    assert members_of(carol.frames()[0]) == {
        "alice": {"name": "A"},
        "bob": {"name": "B"},
        "carol": None,
    }
    added = [json.loads(f["data"])["user_id"] for f in of(alice, "pusher_internal:member_added")]
    assert added == ["bob", "carol"]
    assert of(carol, "pusher_internal:member_added") == []  # it learns of itself from its list
    assert len(nodes.events(ev.MemberAdded)) == 3  # one webhook event per user


def test_one_user_on_two_nodes_is_one_member_until_the_last_one_leaves() -> None:
    nodes = MemoryNodes(2)
    a, b = nodes
    watcher, first, second = a.client(), a.client(), b.client()
    a.join(watcher, ROOM, "wendy")
    a.join(first, ROOM, "alice")
    nodes.settle()
    b.join(second, ROOM, "alice")  # a second tab on another node
    nodes.settle()
    assert members_of(second.frames()[0]) == {"wendy": None, "alice": None}
    assert [e.user_id for e in nodes.events(ev.MemberAdded)] == ["wendy", "alice"]
    a.close(first)
    nodes.settle()
    assert of(watcher, "pusher_internal:member_removed") == []
    b.close(second)
    nodes.settle()
    assert len(of(watcher, "pusher_internal:member_removed")) == 1
    assert nodes.events(ev.MemberRemoved) == [ev.MemberRemoved(APP_ID, ROOM, "alice")]


def test_member_events_that_arrive_before_the_member_list_follow_it() -> None:
    nodes = MemoryNodes(2)
    a, b = nodes
    early, late = a.client(), b.client()
    a.join(early, ROOM, "early")
    b.join(late, ROOM, "late")
    # The answer to "late" is written; "early" has not heard of it yet.
    assert late.events() == ["pusher_internal:subscription_succeeded"]
    nodes.settle()
    assert early.events()[-1] == "pusher_internal:member_added"


def test_subscribing_again_answers_with_the_clusters_members() -> None:
    nodes = MemoryNodes(2)
    a, b = nodes
    alice, bob = a.client(), b.client()
    a.join(alice, ROOM, "alice")
    nodes.settle()
    b.join(bob, ROOM, "bob")
    nodes.settle()
    alice.take()
    a.join(alice, ROOM, "alice")
    assert members_of(alice.take()[0]) == {"alice": None, "bob": None}


# --- counts -------------------------------------------------------------------------------


def test_subscription_counts_carry_the_clusters_total_to_every_node() -> None:
    nodes = MemoryNodes(2, enable_subscription_count=True)
    a, b = nodes
    one, two, three = a.client(), b.client(), b.client()
    a.subscribe(one, "news")
    nodes.settle()
    b.subscribe(two, "news")
    nodes.settle()
    b.subscribe(three, "news")
    nodes.settle()

    def counts(client: Client) -> list[int]:
        found = of(client, "pusher_internal:subscription_count")
        return [json.loads(f["data"])["subscription_count"] for f in found]

    assert counts(one) == [1, 2, 3]
    assert counts(three) == [3]
    changes = [e.subscription_count for e in nodes.events(ev.SubscriptionCountChanged)]
    assert changes == [1, 2, 3]
    b.leave(three, "news")
    nodes.settle()
    assert counts(one)[-1] == 2


def test_counts_above_the_threshold_are_throttled_once_for_event_and_webhook() -> None:
    nodes = MemoryNodes(1, enable_subscription_count=True)
    (a,) = nodes
    clients = [a.client() for _ in range(COUNT_THROTTLE_THRESHOLD + 3)]
    for client in clients:
        a.subscribe(client, "big")
    reported = [e.subscription_count for e in a.of(ev.SubscriptionCountChanged)]
    assert reported == list(range(1, COUNT_THROTTLE_THRESHOLD + 1))
    nodes.clock.advance(COUNT_THROTTLE_SECONDS)
    a.hub.tick()
    reported = [e.subscription_count for e in a.of(ev.SubscriptionCountChanged)]
    assert reported[-1] == COUNT_THROTTLE_THRESHOLD + 3
    last = of(clients[0], "pusher_internal:subscription_count")[-1]
    assert json.loads(last["data"]) == {"subscription_count": COUNT_THROTTLE_THRESHOLD + 3}


# --- cache channels -----------------------------------------------------------------------


def test_a_cache_channels_last_event_is_known_on_every_node_until_it_expires() -> None:
    nodes = MemoryNodes(2, cache_ttl=60)
    a, b = nodes
    a.publish("cache-scores", "update", '{"home":2}')  # nobody subscribed anywhere
    reader = b.client()
    b.subscribe(reader, "cache-scores")
    assert reader.frames()[-1] == {
        "event": "update",
        "channel": "cache-scores",
        "data": '{"home":2}',
    }
    nodes.clock.advance(60)
    late = b.client()
    b.subscribe(late, "cache-scores")
    assert late.events()[-1] == "pusher:cache_miss"
    assert b.of(ev.CacheMiss) == [ev.CacheMiss(APP_ID, "cache-scores")]


# --- sign-ins, watchlists, terminations ---------------------------------------------------


def test_watchlists_see_users_on_other_nodes_online_until_their_last_connection() -> None:
    nodes = MemoryNodes(2)
    a, b = nodes
    alice_a, alice_b, watcher = a.client(), b.client(), b.client()
    a.signin(alice_a, {"id": "alice"})
    nodes.settle()
    b.signin(watcher, {"id": "wes", "watchlist": ["alice", "zed"]})
    statuses = [json.loads(f["data"]) for f in of(watcher, "pusher_internal:watchlist_events")]
    assert statuses == [
        {
            "events": [
                {"name": "online", "user_ids": ["alice"]},
                {"name": "offline", "user_ids": ["zed"]},
            ]
        }
    ]
    watcher.take()
    b.signin(alice_b, {"id": "alice"})  # online already: nothing to tell
    nodes.settle()
    a.close(alice_a)
    nodes.settle()
    assert watcher.take() == []
    b.close(alice_b)
    nodes.settle()
    offline = [json.loads(f["data"]) for f in watcher.take()]
    assert offline == [{"events": [{"name": "offline", "user_ids": ["alice"]}]}]


def test_terminate_closes_the_users_connections_on_every_node() -> None:
    nodes = MemoryNodes(3)
    a, b, c = nodes
    on_a, on_b, other = a.client(), b.client(), c.client()
    a.signin(on_a, {"id": "mallory"})
    b.signin(on_b, {"id": "mallory"})
    c.signin(other, {"id": "olivia"})
    nodes.settle()
    assert c.hub.terminate_user(c.app, "mallory") == 0
    nodes.settle()
    for client in (on_a, on_b):
        assert [refused.reason for refused in client.refusals] == [Reason.TERMINATED]
    assert other.refusals == []


# --- queries and replay claims ------------------------------------------------------------


def test_queries_answer_for_the_whole_cluster_from_any_node() -> None:
    nodes = MemoryNodes(3)
    a, b, c = nodes
    a.join(a.client(), ROOM, "alice")
    b.join(b.client(), ROOM, "bob")
    b.join(b.client(), ROOM, "bob")
    a.subscribe(a.client(), "news")
    nodes.settle()
    state = c.hub.state
    assert read(state.channel_states(APP_ID, None)) == {
        ROOM: ChannelState(True, 3, 2),
        "news": ChannelState(True, 1, 0),
    }
    assert read(state.channel_states(APP_ID, None, "presence-")) == {ROOM: ChannelState(True, 3, 2)}
    assert read(state.channel_states(APP_ID, ["nobody"])) == {"nobody": ChannelState(False, 0, 0)}
    assert sorted(read(state.members(APP_ID, ROOM))) == ["alice", "bob"]


def test_a_signature_is_claimed_once_for_the_whole_cluster() -> None:
    nodes = MemoryNodes(2)
    claims = nodes.cluster.replay
    first = read(claims.claim(APP_ID, "sig", 1_000, 1_000.0, max_entries=10))
    # Replayed to another node after the SDKs' repeat grace.
    again = read(claims.claim(APP_ID, "sig", 1_000, 1_010.0, max_entries=10))
    assert (first, again) == (Verdict.ACCEPTED, Verdict.REPLAYED)


def test_a_refusal_on_one_node_touches_no_other() -> None:
    nodes = MemoryNodes(2)
    a, _ = nodes
    client = a.client()
    with pytest.raises(Refused):
        a.hub.subscribe(a.app, client.session, msg.Subscribe("private-x", "app-key:" + "0" * 64))
    assert nodes.settle() == 0
    assert nodes.events(ev.ChannelOccupied) == []
