"""History and recovery through the hub: positions on frames, resumes, their order and refusals.

Fake sessions (tests/support/hubs.py): one node is the production ``local``
cluster; several share one in-memory cluster. A history whose reads wait on a
gate stands in for Redis, to hold live events while a resume is read.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from support.hubs import Client, Clock, HubNode, MemoryNodes

from bastion.adapters.base import Cluster
from bastion.adapters.memory import MemoryCluster, MemoryHistory
from bastion.config import settings_from_mapping
from bastion.core.history import Recovery
from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.positions import Position, Resume, parse_position
from bastion.protocol.refusals import Reason
from bastion.server.apps import app_states

HISTORY: dict[str, Any] = {"channel_prefixes": ["chat-", "private-chat-", "presence-chat-"]}


def node(**history: Any) -> HubNode:
    clock = Clock()
    return HubNode(MemoryCluster(clock).join("local"), clock, history={**HISTORY, **history})


def events_of(client: Client) -> list[dict[str, Any]]:
    """Channel events and recovery answers, in order (subscription answers left out)."""
    return [f for f in client.take() if not f["event"].startswith("pusher_internal:")]


def recovery_of(frame: dict[str, Any]) -> dict[str, Any]:
    assert frame["event"] == "bastion:recovery"
    answer: dict[str, Any] = json.loads(frame["data"])
    return answer


def label(frame: dict[str, Any]) -> str:
    """An event's data, or ``recovery`` for the answer."""
    if frame["event"] == "bastion:recovery":
        return "recovery"
    data: str = frame["data"]
    return data


def resume_from(position: str | None, socket_id: str | None = None) -> Resume:
    parsed = None
    if position is not None:
        epoch, _, offset = position.partition(":")
        parsed = Position(epoch, int(offset))
    return Resume(parsed, socket_id)


# --- positions on frames --------------------------------------------------------------------


def test_events_of_history_channels_carry_their_position() -> None:
    one = node()
    client = one.client()
    one.subscribe(client, "chat-1")
    one.subscribe(client, "news")
    client.take()
    one.publish("chat-1", data="a")
    one.publish("chat-1", data="b")
    one.publish("news", data="c")
    frames = client.take()
    positions = [parse_position(frame.get("bastion_position")) for frame in frames]
    assert positions[2] is None  # no history on news
    first, second = positions[:2]
    assert first is not None and second is not None
    assert first.epoch == second.epoch
    assert (first.offset, second.offset) == (1, 2)
    # Everything else is the frame pusher-js knows.
    assert {key: frames[0][key] for key in ("event", "channel", "data")} == {
        "event": "update",
        "channel": "chat-1",
        "data": "a",
    }


def test_an_app_without_history_sends_no_position() -> None:
    clock = Clock()
    plain = HubNode(MemoryCluster(clock).join("local"), clock)
    client = plain.client()
    plain.subscribe(client, "chat-1")
    client.take()
    plain.publish("chat-1")
    assert "bastion_position" not in client.take()[0]


def test_client_events_are_relayed_without_a_position() -> None:
    one = node()
    one.app.settings = one.app.settings.model_copy(update={"enable_client_messages": True})
    sender, receiver = one.client(), one.client()
    for client in (sender, receiver):
        one.subscribe(client, "private-chat-1")
        client.take()
    one.client_event(sender, "private-chat-1", {"typing": True})
    (frame,) = receiver.take()
    assert "bastion_position" not in frame


# --- resumes on one node ---------------------------------------------------------------------


def test_a_first_subscribe_learns_where_the_channel_is() -> None:
    one = node()
    client = one.client()
    one.subscribe(client, "chat-1", resume=Resume())
    (answer,) = events_of(client)
    assert answer["channel"] == "chat-1"
    assert recovery_of(answer) == {
        "recovered": True,
        "replayed": 0,
        "position": recovery_of(answer)["position"],
    }
    assert recovery_of(answer)["position"].endswith(":0")


def test_a_resume_replays_exactly_what_was_missed_then_goes_live() -> None:
    one = node()
    first = one.client()
    one.subscribe(first, "chat-1", resume=Resume())
    position = recovery_of(events_of(first)[0])["position"]
    one.publish("chat-1", data="seen")
    position = first.take()[0]["bastion_position"]
    one.close(first)
    for text in ("m1", "m2", "m3"):
        one.publish("chat-1", data=text)
    again = one.client()
    one.subscribe(again, "chat-1", resume=resume_from(position))
    frames = again.take()
    assert frames[0]["event"] == "pusher_internal:subscription_succeeded"
    replay, answer = frames[1:4], frames[4]
    assert [f["data"] for f in replay] == ["m1", "m2", "m3"]
    assert recovery_of(answer)["recovered"] is True
    assert recovery_of(answer)["replayed"] == 3
    assert recovery_of(answer)["position"] == replay[-1]["bastion_position"]
    # Each replayed frame is the live one, position included.
    epoch = position.split(":")[0]
    assert [f["bastion_position"] for f in replay] == [f"{epoch}:{n}" for n in (2, 3, 4)]
    one.publish("chat-1", data="live")
    assert [f["data"] for f in again.take()] == ["live"]


def test_a_resume_at_the_top_recovers_nothing_missing() -> None:
    one = node()
    client = one.client()
    one.subscribe(client, "chat-1")
    client.take()
    one.publish("chat-1")
    position = client.take()[0]["bastion_position"]
    again = one.client()
    one.subscribe(again, "chat-1", resume=resume_from(position))
    (answer,) = events_of(again)
    assert recovery_of(answer) == {"recovered": True, "replayed": 0, "position": position}


def test_events_the_publisher_excluded_are_not_replayed_to_that_connection() -> None:
    one = node()
    client = one.client()
    one.subscribe(client, "chat-1", resume=Resume())
    position = recovery_of(events_of(client)[0])["position"]
    one.hub.publish(one.app, ["chat-1"], "mine", "x", client.socket_id)
    assert client.take() == []  # excluded live
    one.publish("chat-1", event="other")
    one.close(client)
    again = one.client()
    one.subscribe(again, "chat-1", resume=resume_from(position, client.socket_id))
    names = [f["event"] for f in events_of(again)]
    assert names == ["other", "bastion:recovery"]


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("too_old", "too_old"),
        ("too_many", "too_many"),
        ("epoch", "epoch_changed"),
    ],
)
def test_an_incomplete_recovery_replays_nothing(setup: str, reason: str) -> None:
    one = node(max_events=3, max_replay_events=2)
    client = one.client()
    one.subscribe(client, "chat-1", resume=Resume())
    position = recovery_of(events_of(client)[0])["position"]
    count = {"too_old": 5, "too_many": 3, "epoch": 1}[setup]
    for index in range(count):
        one.publish("chat-1", data=str(index))
    if setup == "epoch":
        position = "someother:0"
    again = one.client()
    one.subscribe(again, "chat-1", resume=resume_from(position))
    (answer,) = events_of(again)
    found = recovery_of(answer)
    assert found["recovered"] is False
    assert found["reason"] == reason
    # The client is told where the channel is, to go on from once it refetched.
    assert found["position"].endswith(f":{count}")


def test_a_resume_on_a_channel_without_history_is_false() -> None:
    one = node()
    client = one.client()
    one.subscribe(client, "news", resume=Resume())
    (answer,) = events_of(client)
    assert recovery_of(answer) == {"recovered": False, "reason": "history_off"}


def test_a_repeated_subscribe_with_a_resume_replays_nothing() -> None:
    one = node()
    client = one.client()
    one.subscribe(client, "chat-1")
    one.publish("chat-1")
    client.take()
    one.subscribe(client, "chat-1", resume=resume_from("x:0"))
    frames = client.take()
    assert frames[0]["event"] == "pusher_internal:subscription_succeeded"
    assert recovery_of(frames[1]) == {"recovered": False, "reason": "already_subscribed"}


def test_a_malformed_resume_is_refused_as_a_resume_and_the_subscribe_stands() -> None:
    one = node()
    client = one.client()
    one.subscribe(client, "chat-1", resume=Resume(problem="bad"))
    assert [r.reason for r in client.refusals] == [Reason.RESUME_INVALID]
    assert client.refusals[0].channel == "chat-1"
    assert "chat-1" in client.session.channels
    one.publish("chat-1")
    assert [f["event"] for f in events_of(client)] == ["update"]


def test_a_position_past_the_last_event_is_refused_as_forged() -> None:
    one = node()
    client = one.client()
    one.subscribe(client, "chat-1", resume=Resume())
    position = recovery_of(events_of(client)[0])["position"]
    epoch = position.split(":")[0]
    again = one.client()
    one.subscribe(again, "chat-1", resume=resume_from(f"{epoch}:99"))
    assert [r.reason for r in again.refusals] == [Reason.RESUME_FUTURE]
    assert events_of(again) == []  # the refusal path answers (bastion:recovery false)


def test_resume_only_follows_a_successful_subscribe() -> None:
    one = node()
    one.publish("private-chat-1", data="secret")
    client = one.client()
    request = msg.Subscribe(
        channel="private-chat-1", auth="app-key:" + "0" * 64, resume=resume_from("x:0")
    )
    with pytest.raises(Refused) as refused:
        one.hub.subscribe(one.app, client.session, request)
    assert refused.value.reason is Reason.SUBSCRIBE_AUTH_INVALID
    assert client.take() == []  # no replay, no recovery answer
    assert "private-chat-1" not in one.app.channels  # never joined, nothing held


def test_a_private_channel_resume_after_its_auth() -> None:
    one = node()
    client = one.client()
    one.subscribe(client, "private-chat-1", resume=Resume())
    position = recovery_of(events_of(client)[0])["position"]
    one.close(client)
    one.publish("private-chat-1", data="secret")
    again = one.client()
    one.subscribe(again, "private-chat-1", resume=resume_from(position))
    assert events_of(again)[0]["data"] == "secret"


def test_a_reload_that_stops_recording_restarts_the_history() -> None:
    one = node()
    client = one.client()
    one.subscribe(client, "chat-1", resume=Resume())
    position = recovery_of(events_of(client)[0])["position"]

    def reload(history: dict[str, Any] | None) -> None:
        fields: dict[str, Any] = {"id": "12345", "key": "app-key", "secret": "app-secret"}
        if history is not None:
            fields["history"] = history
        settings = settings_from_mapping({"apps": [fields]}, environ={})
        one.hub.apply_settings(settings, {state.id: state for state in app_states(settings)})

    reload(None)
    one.publish("chat-1", data="unrecorded")
    reload(HISTORY)
    again = one.client()
    one.subscribe(again, "chat-1", resume=resume_from(position))
    (answer,) = events_of(again)
    assert recovery_of(answer)["reason"] == "epoch_changed"


# --- across nodes of one cluster -------------------------------------------------------------


def test_a_client_reconnecting_to_another_node_recovers() -> None:
    nodes = MemoryNodes(2, history=HISTORY)
    a, b = nodes[0], nodes[1]
    client = a.client()
    a.subscribe(client, "chat-1", resume=Resume())
    position = recovery_of(events_of(client)[0])["position"]
    a.close(client)
    watcher = b.client()
    b.subscribe(watcher, "chat-1")
    b.publish("chat-1", data="from-b")
    a.publish("chat-1", data="from-a")
    nodes.settle()
    # Every node, the publishing one included, delivers in position order.
    assert [f["data"] for f in events_of(watcher)] == ["from-b", "from-a"]
    again = b.client()
    b.subscribe(again, "chat-1", resume=resume_from(position))
    frames = events_of(again)
    assert [f["data"] for f in frames[:2]] == ["from-b", "from-a"]
    assert recovery_of(frames[2])["recovered"] is True


# --- live events held while a resume is read -------------------------------------------------


class GatedHistory:
    """The in-memory history, whose reads wait for the test to open a gate (like Redis).

    With ``read_first`` a read takes its answer at once and waits before handing it
    over (events recorded meanwhile are newer than the answer).
    """

    def __init__(self, inner: MemoryHistory) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.read_first = False

    def attach(self, deliver: Any) -> None:
        self.inner.attach(deliver)

    def publish(self, *args: Any) -> None:
        self.inner.publish(*args)

    async def since(self, *args: Any) -> Recovery:
        if self.read_first:
            found = await self.inner.since(*args)
            await self.gate.wait()
            return found
        await self.gate.wait()
        return await self.inner.since(*args)

    def restart(self, app_id: str) -> None:
        self.inner.restart(app_id)

    def tick(self) -> None:
        self.inner.tick()


def gated_node(**history: Any) -> tuple[HubNode, GatedHistory]:
    clock = Clock()
    cluster = MemoryCluster(clock).join("local")
    assert isinstance(cluster.history, MemoryHistory)
    gated = GatedHistory(cluster.history)
    node = HubNode(
        Cluster(cluster.bus, cluster.state, cluster.replay, gated),  # type: ignore[arg-type]
        clock,
        history={**HISTORY, **history},
    )
    return node, gated


async def settle_reads() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_live_events_wait_for_the_missed_ones_and_are_never_sent_twice() -> None:
    one, gated = gated_node()
    gated.gate.set()
    first = one.client()
    one.subscribe(first, "chat-1", resume=Resume())
    await settle_reads()
    position = recovery_of(events_of(first)[0])["position"]
    one.close(first)
    one.publish("chat-1", data="missed")
    gated.gate.clear()
    again = one.client()
    one.subscribe(again, "chat-1", resume=resume_from(position))
    one.publish("chat-1", data="live-1")
    one.publish("chat-1", data="live-2")
    assert events_of(again) == []  # held until the read answers
    gated.gate.set()
    await settle_reads()
    frames = events_of(again)
    # The read saw all three (it ran after them): each is written once, in order.
    assert [label(f) for f in frames] == ["missed", "live-1", "live-2", "recovery"]
    assert recovery_of(frames[3])["replayed"] == 3
    one.publish("chat-1", data="after")
    assert [f["data"] for f in events_of(again)] == ["after"]


async def test_held_events_newer_than_the_read_follow_the_answer() -> None:
    one, gated = gated_node()
    gated.gate.set()
    first = one.client()
    one.subscribe(first, "chat-1", resume=Resume())
    await settle_reads()
    position = recovery_of(events_of(first)[0])["position"]
    one.close(first)
    one.publish("chat-1", data="missed")
    gated.gate.clear()
    gated.read_first = True
    again = one.client()
    one.subscribe(again, "chat-1", resume=resume_from(position))
    # Recorded after the read took its answer, before the answer is written.
    one.publish("chat-1", data="between")
    assert events_of(again) == []
    gated.gate.set()
    await settle_reads()
    frames = events_of(again)
    assert [label(f) for f in frames] == ["missed", "recovery", "between"]
    assert recovery_of(frames[1])["position"] == frames[0]["bastion_position"]


async def test_too_many_live_events_while_reading_flow_out_and_answer_overflow() -> None:
    one, gated = gated_node(max_replay_events=2)
    gated.gate.set()
    first = one.client()
    one.subscribe(first, "chat-1", resume=Resume())
    await settle_reads()
    position = recovery_of(events_of(first)[0])["position"]
    gated.gate.clear()
    again = one.client()
    one.subscribe(again, "chat-1", resume=resume_from(position))
    for index in range(4):
        one.publish("chat-1", data=str(index))
    # Past the cap the held events went out, in order, and the rest follows live.
    assert [f["data"] for f in events_of(again)] == ["0", "1", "2", "3"]
    gated.gate.set()
    await settle_reads()
    (answer,) = events_of(again)
    assert recovery_of(answer)["recovered"] is False
    assert recovery_of(answer)["reason"] == "overflow"


async def test_a_client_that_leaves_while_its_resume_is_read_holds_nothing() -> None:
    one, gated = gated_node()
    client = one.client()
    one.subscribe(client, "chat-1", resume=Resume())
    channel = one.app.channels["chat-1"]
    assert client.socket_id in channel.held
    one.leave(client, "chat-1")
    assert not channel.held
    gated.gate.set()
    await settle_reads()
    assert events_of(client) == []


def test_channels_without_history_are_never_recorded() -> None:
    clock = Clock()
    cluster = MemoryCluster(clock)
    one = HubNode(cluster.join("local"), clock, history=HISTORY)
    one.publish("news", data="not kept")
    one.publish("private-news", data="not kept")
    one.publish("chat-1", data="kept")
    (app_history,) = cluster.histories.values()
    assert list(app_history.channels) == ["chat-1"]
    kept = app_history.channels["chat-1"].entries
    assert [entry.data for entry in kept] == ["kept"]


def test_encrypted_channels_keep_the_ciphertext_as_published() -> None:
    clock = Clock()
    cluster = MemoryCluster(clock)
    one = HubNode(cluster.join("local"), clock, history={"channel_prefixes": [""]})
    ciphertext = '{"nonce":"bm9uY2U=","ciphertext":"c2VjcmV0"}'
    one.publish("private-encrypted-room", data=ciphertext)
    (app_history,) = cluster.histories.values()
    (entry,) = app_history.channels["private-encrypted-room"].entries
    assert entry.data == ciphertext
