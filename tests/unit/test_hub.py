"""The hub, driven with fake sessions, a counting frame function and a fake clock.

No sockets: a session's ``write`` appends the framed bytes to a list and its
``refuse`` records the refusal; ``frame`` is the identity with a call count,
so "frame once per channel per publish" is observable.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Any

import pytest

from bastion.adapters.base import Cached
from bastion.adapters.local import local_cluster
from bastion.adapters.memory import MemoryBus
from bastion.config import settings_from_mapping
from bastion.core import events as ev
from bastion.core.hub import AppState, Hub
from bastion.core.hub import Session as HubSession
from bastion.eager import start
from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.counts import COUNT_THROTTLE_SECONDS, COUNT_THROTTLE_THRESHOLD
from bastion.protocol.refusals import Reason
from bastion.protocol.signing import channel_auth_string, sign, signin_auth_string
from bastion.server.apps import app_states

KEY = "app-key"
SECRET = "app-secret"
APP_ID = "12345"


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingFrame:
    """Identity-like framing that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str) -> bytes:
        self.calls += 1
        return text


class Client:
    """A fake connection: what it was sent and what it was refused."""

    def __init__(self, socket_id: str) -> None:
        self.written: list[bytes] = []
        self.refusals: list[Refused] = []
        self.session = HubSession(socket_id, self.written.append, self.refusals.append)

    @property
    def socket_id(self) -> str:
        return self.session.socket_id

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.written]

    def events(self) -> list[str]:
        return [f["event"] for f in self.frames()]

    def take(self) -> list[dict[str, Any]]:
        frames = self.frames()
        self.written.clear()
        return frames


class World:
    """One hub with one app, plus helpers to sign and act as clients."""

    def __init__(self, **app_fields: Any) -> None:
        self.clock = Clock()
        self.frame = CountingFrame()
        settings = settings_from_mapping(
            {"apps": [{"id": APP_ID, "key": KEY, "secret": SECRET, **app_fields}]},
            environ={},
        )
        self.hub = Hub(
            settings, self.frame, self.clock, local_cluster(self.clock), app_states(settings)
        )
        self.app: AppState = self.hub.apps_by_key[KEY]
        self.events: list[ev.HubEvent] = []
        self.hub.listeners.append(self.events.append)
        self._ids = itertools.count(1)

    def client(self) -> Client:
        client = Client(f"{next(self._ids)}.{next(self._ids)}")
        assert self.hub.admit(self.app) is None
        return client

    def cached(self, channel: str) -> Cached | None:
        """The cluster state's cached event of ``channel`` (answered at once on one node)."""
        found = start(self.hub.state.cached(APP_ID, channel))
        assert found is None or isinstance(found, Cached)
        return found

    # --- signing, as the app's auth endpoint would ---------------------------------

    @staticmethod
    def auth(message: str, secret: str = SECRET, key: str = KEY) -> str:
        return f"{key}:{sign(secret.encode(), message)}"

    def channel_auth(self, client: Client, channel: str, channel_data: str | None = None) -> str:
        return self.auth(channel_auth_string(client.socket_id, channel, channel_data))

    # --- acting ------------------------------------------------------------------------

    def subscribe(
        self,
        client: Client,
        channel: str,
        *,
        auth: str | None = None,
        channel_data: str | None = None,
        sign_it: bool = True,
    ) -> None:
        if auth is None and sign_it and channel.startswith(("private-", "presence-")):
            auth = self.channel_auth(client, channel, channel_data)
        request = msg.Subscribe(channel=channel, auth=auth, channel_data=channel_data)
        self.hub.subscribe(self.app, client.session, request)

    def refused_subscribe(self, client: Client, channel: str, **kw: Any) -> Refused:
        with pytest.raises(Refused) as info:
            self.subscribe(client, channel, **kw)
        assert channel not in client.session.channels
        return info.value

    def join_presence(
        self, client: Client, channel: str, user_id: Any, user_info: Any = None
    ) -> None:
        data = {"user_id": user_id}
        if user_info is not None:
            data["user_info"] = user_info
        self.subscribe(client, channel, channel_data=json.dumps(data))

    def signin(self, client: Client, user: dict[str, Any] | str, auth: str | None = None) -> None:
        user_data = user if isinstance(user, str) else json.dumps(user)
        if auth is None:
            auth = self.auth(signin_auth_string(client.socket_id, user_data))
        self.hub.signin(self.app, client.session, msg.Signin(auth=auth, user_data=user_data))

    def refused_signin(self, client: Client, user: dict[str, Any] | str, **kw: Any) -> Reason:
        with pytest.raises(Refused) as info:
            self.signin(client, user, **kw)
        return info.value.reason

    def client_event(self, client: Client, channel: str, data: Any = None, event: str = "") -> None:
        request = msg.ClientEvent(event or "client-typing", channel, data)
        self.hub.client_event(self.app, client.session, request)

    def refused_client_event(self, client: Client, channel: str, **kw: Any) -> Reason:
        with pytest.raises(Refused) as info:
            self.client_event(client, channel, **kw)
        return info.value.reason

    def publish(
        self, channels: list[str], event: str = "my-event", data: str = "{}", **kw: Any
    ) -> None:
        self.hub.publish(self.app, channels, event, data, **kw)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def world() -> World:
    return World(enable_client_messages=True)


def presence_of(frame: dict[str, Any]) -> dict[str, Any]:
    assert frame["event"] == "pusher_internal:subscription_succeeded"
    return json.loads(frame["data"])["presence"]


# --- connections -------------------------------------------------------------------------


def test_admit_counts_and_disconnect_uncounts() -> None:
    w = World(max_connections=2)
    a, b = w.client(), w.client()
    assert w.app.connections == 2
    assert w.hub.admit(w.app) is Reason.APP_OVER_QUOTA
    w.hub.disconnect(w.app, a.session)
    assert w.app.connections == 1
    assert w.hub.admit(w.app) is None
    w.hub.disconnect(w.app, b.session)


def test_admit_refuses_a_disabled_app() -> None:
    w = World(enabled=False)
    assert w.hub.admit(w.app) is Reason.APP_DISABLED
    assert w.app.connections == 0


def test_admit_refuses_over_node_capacity() -> None:
    settings = settings_from_mapping(
        {
            "server": {"max_connections": 1},
            "apps": [{"id": APP_ID, "key": KEY, "secret": SECRET}],
        },
        environ={},
    )
    hub = Hub(settings, CountingFrame(), Clock(), local_cluster(), app_states(settings))
    app = hub.apps_by_key[KEY]
    assert hub.admit(app) is None
    assert hub.admit(app) is Reason.OVER_CAPACITY
    assert hub.connections == 1


# --- public and private subscriptions ---------------------------------------------------------


def test_public_subscribe_success_frame(world: World) -> None:
    a = world.client()
    world.subscribe(a, "my-channel")
    assert a.written == [
        b'{"event":"pusher_internal:subscription_succeeded","channel":"my-channel","data":"{}"}'
    ]
    assert a.session.channels == {"my-channel": None}
    assert world.app.channels["my-channel"].subscription_count == 1


def test_public_subscribe_ignores_auth(world: World) -> None:
    a = world.client()
    world.subscribe(a, "my-channel", auth="garbage")
    assert a.events() == ["pusher_internal:subscription_succeeded"]


@pytest.mark.parametrize(
    "channel",
    ["private-a", "private-cache-a", "private-encrypted-a", "private-encrypted-cache-a"],
)
def test_private_subscribe_with_valid_auth(world: World, channel: str) -> None:
    a = world.client()
    world.subscribe(a, channel)
    assert a.frames()[0] == {
        "event": "pusher_internal:subscription_succeeded",
        "channel": channel,
        "data": "{}",
    }
    assert channel in a.session.channels


@pytest.mark.parametrize(
    "channel",
    ["private-a", "private-cache-a", "private-encrypted-a", "presence-a", "presence-cache-a"],
)
@pytest.mark.parametrize("auth", [None, ""])
def test_subscribe_without_auth_is_refused(world: World, channel: str, auth: str | None) -> None:
    a = world.client()
    refusal = world.refused_subscribe(a, channel, auth=auth, sign_it=False, channel_data="{}")
    assert refusal.reason is Reason.SUBSCRIBE_AUTH_MISSING
    assert refusal.channel == channel
    assert a.written == []
    assert channel not in world.app.channels
    assert world.events == []


@pytest.mark.parametrize(
    "auth",
    [
        f"{KEY}:{'0' * 64}",
        f"other-key:{sign(SECRET.encode(), 'x')}",
        "no-colon",
        f"{KEY}:",
    ],
)
def test_private_subscribe_with_invalid_auth_is_refused(world: World, auth: str) -> None:
    a = world.client()
    refusal = world.refused_subscribe(a, "private-a", auth=auth)
    assert refusal.reason is Reason.SUBSCRIBE_AUTH_INVALID
    assert refusal.channel == "private-a"
    assert "private-a" not in world.app.channels


def test_private_signature_under_another_secret_is_refused(world: World) -> None:
    a = world.client()
    auth = world.auth(channel_auth_string(a.socket_id, "private-a"), secret="other")
    assert world.refused_subscribe(a, "private-a", auth=auth).reason is (
        Reason.SUBSCRIBE_AUTH_INVALID
    )


def test_signature_for_another_socket_is_refused(world: World) -> None:
    a, b = world.client(), world.client()
    stolen = world.channel_auth(b, "private-a")  # captured from b's auth response
    assert world.refused_subscribe(a, "private-a", auth=stolen).reason is (
        Reason.SUBSCRIBE_AUTH_INVALID
    )
    world.subscribe(b, "private-a", auth=stolen)
    assert "private-a" in b.session.channels


def test_signature_for_another_channel_is_refused(world: World) -> None:
    a = world.client()
    auth = world.channel_auth(a, "private-b")
    assert world.refused_subscribe(a, "private-a", auth=auth).reason is (
        Reason.SUBSCRIBE_AUTH_INVALID
    )


@pytest.mark.parametrize("channel", ["my-private-a", "my-presence-a", "x-cache-private-a"])
def test_names_containing_a_prefix_mid_string_need_no_auth(world: World, channel: str) -> None:
    a = world.client()
    world.subscribe(a, channel, auth=None, sign_it=False)
    assert a.events() == ["pusher_internal:subscription_succeeded"]


@pytest.mark.parametrize("channel", ["has space", "a" * 165, "hash#x", "é", "private-a:b"])
def test_invalid_channel_name_is_refused(world: World, channel: str) -> None:
    a = world.client()
    refusal = world.refused_subscribe(a, channel)
    assert refusal.reason is Reason.SUBSCRIBE_INVALID_CHANNEL
    assert a.written == []


def test_invalid_channel_name_is_echoed_only_when_short_and_printable(world: World) -> None:
    a = world.client()
    assert world.refused_subscribe(a, "has space").channel == "has space"
    assert world.refused_subscribe(a, "x" * 500).channel is None
    assert world.refused_subscribe(a, "bad\nname").channel is None


def test_channel_length_limit_is_per_app() -> None:
    w = World(max_channel_name_length=200)
    a = w.client()
    w.subscribe(a, "a" * 200)
    assert w.refused_subscribe(a, "a" * 201).reason is Reason.SUBSCRIBE_INVALID_CHANNEL


def test_subscribing_twice_is_idempotent(world: World) -> None:
    a = world.client()
    world.subscribe(a, "private-a")
    world.subscribe(a, "private-a")
    assert a.events() == ["pusher_internal:subscription_succeeded"] * 2
    assert world.app.channels["private-a"].subscription_count == 1
    assert len(world.of(ev.ChannelOccupied)) == 1


def test_unsubscribe_from_a_channel_never_joined(world: World) -> None:
    a, b = world.client(), world.client()
    world.subscribe(b, "my-channel")
    before_events, before_frames = list(world.events), world.frame.calls
    assert world.hub.unsubscribe(world.app, a.session, "my-channel") is False
    assert world.hub.unsubscribe(world.app, a.session, "nope") is False
    assert world.events == before_events
    assert world.frame.calls == before_frames
    assert world.app.channels["my-channel"].subscription_count == 1
    assert a.session.channels == {}


def test_unsubscribe_leaves_and_vacates(world: World) -> None:
    a, b = world.client(), world.client()
    world.subscribe(a, "my-channel")
    world.subscribe(b, "my-channel")
    assert world.hub.unsubscribe(world.app, a.session, "my-channel") is True
    assert "my-channel" not in a.session.channels
    assert world.app.channels["my-channel"].subscription_count == 1
    assert world.of(ev.ChannelVacated) == []
    assert world.hub.unsubscribe(world.app, b.session, "my-channel") is True
    assert "my-channel" not in world.app.channels
    assert world.of(ev.ChannelVacated) == [ev.ChannelVacated(APP_ID, "my-channel")]
    assert world.hub.unsubscribe(world.app, b.session, "my-channel") is False


def test_occupied_and_vacated_are_emitted_once_per_transition(world: World) -> None:
    a, b = world.client(), world.client()
    world.subscribe(a, "my-channel")
    world.subscribe(b, "my-channel")
    world.hub.disconnect(world.app, a.session)
    world.hub.disconnect(world.app, b.session)
    world.subscribe(world.client(), "my-channel")
    kinds = [type(e) for e in world.events if not isinstance(e, ev.SubscriptionCountChanged)]
    assert kinds == [ev.ChannelOccupied, ev.ChannelVacated, ev.ChannelOccupied]


def test_subscription_count_changes_are_emitted_to_listeners(world: World) -> None:
    a, b = world.client(), world.client()
    world.subscribe(a, "my-channel")
    world.subscribe(b, "my-channel")
    world.hub.unsubscribe(world.app, a.session, "my-channel")
    counts = [e.subscription_count for e in world.of(ev.SubscriptionCountChanged)]
    assert counts == [1, 2, 1]


# --- presence -------------------------------------------------------------------------------


def test_presence_member_lists_and_member_added(world: World) -> None:
    a, b = world.client(), world.client()
    world.join_presence(a, "presence-room", "alice", {"name": "Alice"})
    assert presence_of(a.take()[0]) == {
        "ids": ["alice"],
        "hash": {"alice": {"name": "Alice"}},
        "count": 1,
    }
    world.join_presence(b, "presence-room", 7)  # numbers become strings
    assert presence_of(b.take()[0]) == {
        "ids": ["alice", "7"],
        "hash": {"alice": {"name": "Alice"}, "7": None},
        "count": 2,
    }
    assert a.take() == [
        {
            "event": "pusher_internal:member_added",
            "channel": "presence-room",
            "data": '{"user_id":"7","user_info":null}',
        }
    ]
    assert b.session.channels == {"presence-room": "7"}
    assert world.of(ev.MemberAdded) == [
        ev.MemberAdded(APP_ID, "presence-room", "alice"),
        ev.MemberAdded(APP_ID, "presence-room", "7"),
    ]


def test_second_socket_of_a_user_adds_no_member(world: World) -> None:
    a1, a2, b = world.client(), world.client(), world.client()
    world.join_presence(a1, "presence-room", "alice")
    world.join_presence(b, "presence-room", "bob")
    a1.take()
    b.take()
    world.join_presence(a2, "presence-room", "alice")
    assert presence_of(a2.take()[0])["count"] == 2
    assert a1.written == []
    assert b.written == []
    assert len(world.of(ev.MemberAdded)) == 2
    channel = world.app.channels["presence-room"]
    assert channel.user_count == 2
    assert channel.subscription_count == 3


def test_last_socket_leaving_removes_the_member(world: World) -> None:
    a1, a2, b = world.client(), world.client(), world.client()
    for client, user in ((a1, "alice"), (a2, "alice"), (b, "bob")):
        world.join_presence(client, "presence-room", user)
    b.take()
    world.hub.unsubscribe(world.app, a1.session, "presence-room")
    assert b.written == []
    assert world.of(ev.MemberRemoved) == []
    world.hub.disconnect(world.app, a2.session)  # disconnect is an implicit unsubscribe
    assert b.take() == [
        {
            "event": "pusher_internal:member_removed",
            "channel": "presence-room",
            "data": '{"user_id":"alice"}',
        }
    ]
    assert world.of(ev.MemberRemoved) == [ev.MemberRemoved(APP_ID, "presence-room", "alice")]
    assert world.app.channels["presence-room"].user_count == 1


def test_leaving_socket_gets_no_member_removed_for_itself(world: World) -> None:
    a, b = world.client(), world.client()
    world.join_presence(a, "presence-room", "alice")
    world.join_presence(b, "presence-room", "bob")
    a.take()
    world.hub.unsubscribe(world.app, a.session, "presence-room")
    assert a.written == []


def test_presence_resubscribe_is_idempotent(world: World) -> None:
    a, b = world.client(), world.client()
    world.join_presence(a, "presence-room", "alice")
    world.join_presence(b, "presence-room", "bob")
    a.take()
    world.join_presence(b, "presence-room", "bob")
    assert presence_of(b.frames()[-1])["count"] == 2
    assert a.written == []
    assert len(world.of(ev.MemberAdded)) == 2
    assert world.app.channels["presence-room"].subscription_count == 2


def test_presence_full() -> None:
    w = World(max_presence_members=2)
    a, b, c, b2 = w.client(), w.client(), w.client(), w.client()
    w.join_presence(a, "presence-room", "alice")
    w.join_presence(b, "presence-room", "bob")
    refusal = w.refused_subscribe(c, "presence-room", channel_data=json.dumps({"user_id": "carol"}))
    assert refusal.reason is Reason.SUBSCRIBE_PRESENCE_FULL
    assert refusal.channel == "presence-room"
    assert w.app.channels["presence-room"].user_count == 2
    w.join_presence(b2, "presence-room", "bob")  # an existing member's new tab still fits
    assert w.app.channels["presence-room"].subscription_count == 3


def test_presence_member_too_large(world: World) -> None:
    a = world.client()
    big = {"bio": "x" * 2048}
    refusal = world.refused_subscribe(
        a, "presence-room", channel_data=json.dumps({"user_id": "alice", "user_info": big})
    )
    assert refusal.reason is Reason.SUBSCRIBE_MEMBER_TOO_LARGE
    world.join_presence(a, "presence-room", "alice", {"bio": "x" * 1900})


def test_presence_member_size_is_measured_in_utf8_bytes(world: World) -> None:
    a = world.client()
    info = {"name": "\u00e9" * 900}
    assert len(json.dumps(info, ensure_ascii=False).encode()) < 2 * 1024
    world.join_presence(a, "presence-room", "alice", info)


@pytest.mark.parametrize(
    "channel_data",
    [
        "not json",
        "",
        "[]",
        '"alice"',
        "{}",
        '{"user_info":{}}',
        '{"user_id":true}',
        '{"user_id":false}',
        '{"user_id":null}',
        '{"user_id":1.5}',
        '{"user_id":["a"]}',
        '{"user_id":{"id":"a"}}',
        '{"user_id":""}',
        json.dumps({"user_id": "u" * 129}),
        '{"user_id":"a\\u0000b"}',
        "[" * 5000,
    ],
)
def test_invalid_channel_data_is_refused(world: World, channel_data: str) -> None:
    a = world.client()
    refusal = world.refused_subscribe(a, "presence-room", channel_data=channel_data)
    assert refusal.reason is Reason.SUBSCRIBE_CHANNEL_DATA
    assert "presence-room" not in world.app.channels


def test_channel_data_is_verified_before_it_is_parsed(world: World) -> None:
    a = world.client()
    auth = world.channel_auth(a, "presence-room", '{"user_id":"alice"}')
    refusal = world.refused_subscribe(
        a, "presence-room", auth=auth, channel_data='{"user_id":"mallory"}'
    )
    assert refusal.reason is Reason.SUBSCRIBE_AUTH_INVALID


def test_presence_without_channel_data_needs_a_signin(world: World) -> None:
    a = world.client()
    auth = world.channel_auth(a, "presence-room")
    refusal = world.refused_subscribe(a, "presence-room", auth=auth)
    assert refusal.reason is Reason.SUBSCRIBE_CHANNEL_DATA
    world.signin(a, {"id": "alice", "user_info": {"name": "Alice"}})
    world.subscribe(a, "presence-room", auth=auth)
    assert presence_of(a.frames()[-1]) == {
        "ids": ["alice"],
        "hash": {"alice": {"name": "Alice"}},
        "count": 1,
    }


# --- client events ----------------------------------------------------------------------------


def test_client_events_disabled_by_default() -> None:
    w = World()
    a = w.client()
    w.subscribe(a, "private-a")
    assert w.refused_client_event(a, "private-a") is Reason.CLIENT_EVENTS_DISABLED


@pytest.mark.parametrize("channel", ["my-channel", "cache-a", "my-private-a"])
def test_client_events_refused_on_public_channels(world: World, channel: str) -> None:
    a = world.client()
    world.subscribe(a, channel)
    assert world.refused_client_event(a, channel) is Reason.CLIENT_EVENT_CHANNEL


@pytest.mark.parametrize("channel", ["private-encrypted-a", "private-encrypted-cache-a"])
def test_client_events_refused_on_encrypted_channels(world: World, channel: str) -> None:
    a = world.client()
    world.subscribe(a, channel)
    assert world.refused_client_event(a, channel) is Reason.CLIENT_EVENT_ENCRYPTED


def test_client_events_refused_on_server_to_user_channels(world: World) -> None:
    a = world.client()
    world.signin(a, {"id": "alice"})
    world.subscribe(a, "#server-to-user-alice")
    reason = world.refused_client_event(a, "#server-to-user-alice")
    assert reason is Reason.CLIENT_EVENT_CHANNEL


def test_client_events_need_a_subscription(world: World) -> None:
    a, b = world.client(), world.client()
    world.subscribe(b, "private-a")  # the channel exists, but a is not in it
    assert world.refused_client_event(a, "private-a") is Reason.CLIENT_EVENT_NOT_SUBSCRIBED
    assert world.refused_client_event(a, "private-b") is Reason.CLIENT_EVENT_NOT_SUBSCRIBED
    assert b.events() == ["pusher_internal:subscription_succeeded"]


def test_client_event_name_length(world: World) -> None:
    a = world.client()
    world.subscribe(a, "private-a")
    name = "client-" + "x" * 194  # 201 characters
    assert world.refused_client_event(a, "private-a", event=name) is Reason.CLIENT_EVENT_NAME
    world.client_event(a, "private-a", event=name[:-1])


def test_client_event_too_large(world: World) -> None:
    a = world.client()
    world.subscribe(a, "private-a")
    data = {"x": "y" * (10 * 1024)}
    assert world.refused_client_event(a, "private-a", data=data) is (Reason.CLIENT_EVENT_TOO_LARGE)


def test_client_event_size_is_measured_in_utf8_bytes(world: World) -> None:
    a = world.client()
    world.subscribe(a, "private-a")
    data = "\u00e9" * 2000
    assert len(json.dumps(data, ensure_ascii=False).encode()) < 10 * 1024
    world.client_event(a, "private-a", data=data)


def test_client_event_relayed_to_others_not_the_sender(world: World) -> None:
    a, b, c = world.client(), world.client(), world.client()
    for client in (a, b, c):
        world.subscribe(client, "private-a")
        client.take()
    world.client_event(a, "private-a", data={"text": "hi"})
    assert a.written == []
    expected = b'{"event":"client-typing","channel":"private-a","data":{"text":"hi"}}'
    assert b.written == [expected]
    assert c.written == [expected]
    assert b.written[0] is c.written[0]  # the same bytes object: framed once
    assert world.of(ev.ClientEventSent) == [
        ev.ClientEventSent(APP_ID, "private-a", "client-typing", {"text": "hi"}, a.socket_id, None)
    ]


def test_client_event_on_presence_carries_the_sender_user_id(world: World) -> None:
    a, b = world.client(), world.client()
    world.join_presence(a, "presence-room", "alice")
    world.join_presence(b, "presence-room", "bob")
    b.take()
    world.client_event(a, "presence-room", data={"user_id": "spoofed"})
    assert b.take() == [
        {
            "event": "client-typing",
            "channel": "presence-room",
            "data": {"user_id": "spoofed"},
            "user_id": "alice",
        }
    ]
    assert world.of(ev.ClientEventSent)[-1].user_id == "alice"


def test_client_event_rate_limit_and_recovery(world: World) -> None:
    a, b = world.client(), world.client()
    world.subscribe(a, "private-a")
    world.subscribe(b, "private-a")
    b.take()
    for _ in range(10):
        world.client_event(a, "private-a")
    assert world.refused_client_event(a, "private-a") is Reason.CLIENT_EVENT_RATE
    assert len(b.take()) == 10
    world.clock.advance(0.15)  # one token back at 10/s
    world.client_event(a, "private-a")
    assert world.refused_client_event(a, "private-a") is Reason.CLIENT_EVENT_RATE
    world.clock.advance(1.0)
    for _ in range(10):
        world.client_event(a, "private-a")
    assert world.refused_client_event(a, "private-a") is Reason.CLIENT_EVENT_RATE
    assert len(b.take()) == 11


def test_client_event_rate_limit_is_per_connection_and_configurable() -> None:
    w = World(enable_client_messages=True, max_client_events_per_second=3)
    a, b = w.client(), w.client()
    w.subscribe(a, "private-a")
    w.subscribe(b, "private-a")
    for _ in range(3):
        w.client_event(a, "private-a")
    assert w.refused_client_event(a, "private-a") is Reason.CLIENT_EVENT_RATE
    for _ in range(3):
        w.client_event(b, "private-a")


# --- publish -----------------------------------------------------------------------------


def test_publish_frames_once_per_channel(world: World) -> None:
    clients = [world.client() for _ in range(50)]
    for client in clients:
        world.subscribe(client, "my-channel")
        world.subscribe(client, "other-channel")
        client.take()
    world.frame.calls = 0
    world.publish(["my-channel"], data='{"n":1}')
    assert world.frame.calls == 1
    world.publish(["my-channel", "other-channel", "empty-channel"], data='{"n":2}')
    assert world.frame.calls == 3  # one per channel with subscribers
    first = clients[0].written
    assert first == [
        b'{"event":"my-event","channel":"my-channel","data":"{\\"n\\":1}"}',
        b'{"event":"my-event","channel":"my-channel","data":"{\\"n\\":2}"}',
        b'{"event":"my-event","channel":"other-channel","data":"{\\"n\\":2}"}',
    ]
    for client in clients[1:]:
        assert client.written == first
        assert all(x is y for x, y in zip(client.written, first, strict=True))


def test_publish_honours_exclude_socket_id(world: World) -> None:
    a, b = world.client(), world.client()
    world.subscribe(a, "my-channel")
    world.subscribe(b, "my-channel")
    a.take()
    b.take()
    world.publish(["my-channel"], exclude_socket_id=a.socket_id)
    assert a.written == []
    assert len(b.written) == 1
    world.publish(["my-channel"], exclude_socket_id="999.999")  # unknown: nobody excluded
    assert len(a.written) == 1
    assert len(b.written) == 2


def test_publish_to_an_empty_channel_frames_nothing(world: World) -> None:
    world.publish(["nobody-here"])
    assert world.frame.calls == 0


def test_publish_data_is_relayed_as_the_publisher_sent_it(world: World) -> None:
    a = world.client()
    world.subscribe(a, "my-channel")
    a.take()
    world.publish(["my-channel"], data="not json at all \u00e9")
    assert a.take() == [
        {"event": "my-event", "channel": "my-channel", "data": "not json at all \u00e9"}
    ]


# --- cache channels -----------------------------------------------------------------------


def test_cache_miss_then_hit(world: World) -> None:
    a = world.client()
    world.subscribe(a, "cache-news")
    assert a.take() == [
        {"event": "pusher_internal:subscription_succeeded", "channel": "cache-news", "data": "{}"},
        {"event": "pusher:cache_miss", "channel": "cache-news", "data": "{}"},
    ]
    assert world.of(ev.CacheMiss) == [ev.CacheMiss(APP_ID, "cache-news")]
    world.publish(["cache-news"], event="headline", data='{"t":1}')
    assert a.take() == [{"event": "headline", "channel": "cache-news", "data": '{"t":1}'}]
    b = world.client()
    world.subscribe(b, "cache-news")
    assert b.take() == [
        {"event": "pusher_internal:subscription_succeeded", "channel": "cache-news", "data": "{}"},
        {"event": "headline", "channel": "cache-news", "data": '{"t":1}'},
    ]
    assert len(world.of(ev.CacheMiss)) == 1


def test_cache_is_kept_without_subscribers_and_only_the_last_event(world: World) -> None:
    world.publish(["cache-news"], event="first", data="1")
    world.publish(["cache-news"], event="second", data="2")
    a = world.client()
    world.subscribe(a, "cache-news")
    assert a.frames()[-1] == {"event": "second", "channel": "cache-news", "data": "2"}


def test_cache_expires_with_the_clock() -> None:
    w = World(cache_ttl=60)
    w.publish(["cache-news"], event="headline", data="1")
    w.clock.advance(59)
    assert w.cached("cache-news") is not None
    a = w.client()
    w.subscribe(a, "cache-news")
    assert a.events()[-1] == "headline"
    w.clock.advance(1)
    assert w.cached("cache-news") is None
    b = w.client()
    w.subscribe(b, "cache-news")
    assert b.events()[-1] == "pusher:cache_miss"


def test_private_cache_channels_cache_too(world: World) -> None:
    world.publish(["private-cache-a"], event="e", data="1")
    a = world.client()
    world.subscribe(a, "private-cache-a")
    assert a.events() == ["pusher_internal:subscription_succeeded", "e"]


def test_non_cache_channels_do_not_cache(world: World) -> None:
    world.publish(["my-channel"], event="e", data="1")
    assert world.cached("my-channel") is None
    a = world.client()
    world.subscribe(a, "my-channel")
    assert a.events() == ["pusher_internal:subscription_succeeded"]


def test_client_events_are_not_cached(world: World) -> None:
    a = world.client()
    world.subscribe(a, "private-cache-a")
    world.client_event(a, "private-cache-a", data={"x": 1})
    assert world.cached("private-cache-a") is None


# --- sign-in ------------------------------------------------------------------------------


def test_signin_success(world: World) -> None:
    a = world.client()
    world.signin(a, '{"id":"alice","user_info":{"name":"Alice"}}')
    assert a.written == [
        b'{"event":"pusher:signin_success","data":'
        b'{"user_data":"{\\"id\\":\\"alice\\",\\"user_info\\":{\\"name\\":\\"Alice\\"}}"}}'
    ]
    assert a.session.user_id == "alice"
    assert a.session.user_info == {"name": "Alice"}
    assert world.app.users == {"alice": {a.socket_id: a.session}}


def test_signin_invalid_signature(world: World) -> None:
    a, b = world.client(), world.client()
    user_data = '{"id":"alice"}'
    for auth in (
        world.auth(signin_auth_string(b.socket_id, user_data)),  # another socket's
        world.auth(signin_auth_string(a.socket_id, '{"id":"bob"}')),  # other data
        world.auth(signin_auth_string(a.socket_id, user_data), secret="wrong"),
        world.auth(f"{a.socket_id}:{user_data}"),  # single colon: channel form
        "app-key:nope",
    ):
        assert world.refused_signin(a, user_data, auth=auth) is Reason.SIGNIN_INVALID
    assert a.session.user_id is None
    assert a.written == []


@pytest.mark.parametrize(
    "user_data",
    [
        "{}",
        '{"user_info":{}}',
        '{"id":""}',
        '{"id":12345}',
        '{"id":null}',
        '{"id":["a"]}',
        "not json",
        "[]",
        '"alice"',
        '{"id":"alice","watchlist":"bob"}',
        '{"id":"alice","watchlist":[1]}',
        '{"id":"alice","watchlist":[""]}',
        "[" * 5000,
    ],
)
def test_signin_with_invalid_user_data(world: World, user_data: str) -> None:
    a = world.client()
    assert world.refused_signin(a, user_data) is Reason.SIGNIN_DATA_INVALID
    assert a.session.user_id is None
    assert world.app.users == {}


def test_signin_conflict_with_another_user(world: World) -> None:
    a = world.client()
    world.signin(a, {"id": "alice"})
    assert world.refused_signin(a, {"id": "bob"}) is Reason.SIGNIN_CONFLICT
    assert a.session.user_id == "alice"
    assert "bob" not in world.app.users
    world.signin(a, {"id": "alice"})  # the same user again is fine
    assert a.events() == ["pusher:signin_success"] * 2


# --- watchlists -----------------------------------------------------------------------------


def watchlist(frame: dict[str, Any]) -> list[tuple[str, list[str]]]:
    assert frame["event"] == "pusher_internal:watchlist_events"
    assert "channel" not in frame
    return [(e["name"], e["user_ids"]) for e in json.loads(frame["data"])["events"]]


def test_watchlist_initial_status_and_changes(world: World) -> None:
    alice, watcher = world.client(), world.client()
    world.signin(alice, {"id": "alice"})
    world.signin(watcher, {"id": "w", "watchlist": ["alice", "bob"]})
    frames = watcher.take()
    assert [f["event"] for f in frames] == [
        "pusher:signin_success",
        "pusher_internal:watchlist_events",
    ]
    assert watchlist(frames[1]) == [("online", ["alice"]), ("offline", ["bob"])]

    bob1, bob2 = world.client(), world.client()
    world.signin(bob1, {"id": "bob"})
    assert [watchlist(f) for f in watcher.take()] == [[("online", ["bob"])]]
    world.signin(bob2, {"id": "bob"})  # a second connection: already online
    assert watcher.written == []
    world.hub.disconnect(world.app, bob1.session)
    assert watcher.written == []
    world.hub.disconnect(world.app, bob2.session)
    assert [watchlist(f) for f in watcher.take()] == [[("offline", ["bob"])]]
    assert watcher.refusals == []


def test_watchlist_all_offline(world: World) -> None:
    watcher = world.client()
    world.signin(watcher, {"id": "w", "watchlist": ["x", "y", "x"]})
    assert watchlist(watcher.frames()[1]) == [("offline", ["x", "y"])]


def test_watchers_that_disconnect_are_forgotten(world: World) -> None:
    watcher, bob = world.client(), world.client()
    world.signin(watcher, {"id": "w", "watchlist": ["bob"]})
    world.hub.disconnect(world.app, watcher.session)
    watcher.take()
    world.signin(bob, {"id": "bob"})
    assert watcher.written == []
    assert world.app.watchers == {}


def test_watchlist_too_long() -> None:
    w = World(max_watchlist_size=3)
    watcher = w.client()
    w.signin(watcher, {"id": "w", "watchlist": ["a", "b", "c", "d", "e"]})
    assert watcher.events()[0] == "pusher:signin_success"
    assert watchlist(watcher.frames()[1]) == [("offline", ["a", "b", "c"])]
    assert [r.reason for r in watcher.refusals] == [Reason.WATCHLIST_TOO_LONG]
    assert watcher.session.watchlist == ("a", "b", "c")
    watcher.take()
    c, d = w.client(), w.client()
    w.signin(d, {"id": "d"})  # beyond the limit: not watched
    assert watcher.written == []
    w.signin(c, {"id": "c"})
    assert [watchlist(f) for f in watcher.take()] == [[("online", ["c"])]]


def test_watchlist_at_the_limit_is_accepted() -> None:
    w = World(max_watchlist_size=3)
    watcher = w.client()
    w.signin(watcher, {"id": "w", "watchlist": ["a", "b", "c"]})
    assert watcher.refusals == []


# --- server-to-user ----------------------------------------------------------------------------


def test_server_to_user_needs_a_signin_as_that_user(world: World) -> None:
    a = world.client()
    refusal = world.refused_subscribe(a, "#server-to-user-alice")
    assert refusal.reason is Reason.SUBSCRIBE_NOT_SIGNED_IN
    world.signin(a, {"id": "bob"})
    refusal = world.refused_subscribe(a, "#server-to-user-alice")
    assert refusal.reason is Reason.SUBSCRIBE_NOT_SIGNED_IN
    world.subscribe(a, "#server-to-user-bob", auth="")
    assert a.frames()[-1] == {
        "event": "pusher_internal:subscription_succeeded",
        "channel": "#server-to-user-bob",
        "data": "{}",
    }


def test_publish_to_server_to_user_reaches_all_the_users_sockets(world: World) -> None:
    a1, a2, a3, b = world.client(), world.client(), world.client(), world.client()
    for client in (a1, a2, a3):
        world.signin(client, {"id": "alice"})
    world.signin(b, {"id": "bob"})
    world.subscribe(a1, "#server-to-user-alice")  # subscribed or not, delivery is by user
    for client in (a1, a2, a3, b):
        client.take()
    world.frame.calls = 0
    world.publish(["#server-to-user-alice"], event="notice", data='{"n":1}')
    expected = [{"event": "notice", "channel": "#server-to-user-alice", "data": '{"n":1}'}]
    assert a1.take() == expected
    assert a2.take() == expected
    assert a3.take() == expected
    assert b.written == []
    assert world.frame.calls == 1
    world.publish(["#server-to-user-alice"], exclude_socket_id=a2.socket_id)
    assert len(a1.written) == 1
    assert a2.written == []


def test_publish_to_an_unknown_user_does_nothing(world: World) -> None:
    world.publish(["#server-to-user-nobody"])
    assert world.frame.calls == 0


def test_a_signed_in_user_can_always_subscribe_to_their_own_channel(world: World) -> None:
    a = world.client()
    try:
        world.signin(a, {"id": "alice smith"})
    except Refused as refused:  # refusing the sign-in is also consistent
        assert refused.reason is Reason.SIGNIN_DATA_INVALID
        return
    world.subscribe(a, "#server-to-user-alice smith", auth="")


# --- terminate -------------------------------------------------------------------------------


def test_terminate_user_refuses_each_of_the_users_sessions(world: World) -> None:
    a1, a2, b, presence_only = world.client(), world.client(), world.client(), world.client()
    world.signin(a1, {"id": "alice"})
    world.signin(a2, {"id": "alice"})
    world.signin(b, {"id": "bob"})
    world.join_presence(presence_only, "presence-room", "alice")  # not signed in
    assert world.hub.terminate_user(world.app, "alice") == 2
    assert [r.reason for r in a1.refusals] == [Reason.TERMINATED]
    assert [r.reason for r in a2.refusals] == [Reason.TERMINATED]
    assert b.refusals == []
    assert presence_only.refusals == []
    assert world.hub.terminate_user(world.app, "nobody") == 0


def test_terminate_user_tolerates_refuse_disconnecting_synchronously(world: World) -> None:
    clients = [world.client() for _ in range(3)]
    for client in clients:
        client.session.refuse = lambda _r, s=client.session: world.hub.disconnect(world.app, s)
        world.signin(client, {"id": "alice"})
    assert world.hub.terminate_user(world.app, "alice") == 3
    assert world.app.users == {}


# --- subscription_count ---------------------------------------------------------------------


def counts(client: Client) -> list[int]:
    return [
        json.loads(f["data"])["subscription_count"]
        for f in client.frames()
        if f["event"] == "pusher_internal:subscription_count"
    ]


def test_subscription_count_is_off_by_default(world: World) -> None:
    a = world.client()
    world.subscribe(a, "my-channel")
    assert counts(a) == []


def test_subscription_count_broadcast() -> None:
    w = World(enable_subscription_count=True)
    a, b = w.client(), w.client()
    w.subscribe(a, "my-channel")
    w.subscribe(b, "my-channel")
    w.hub.unsubscribe(w.app, b.session, "my-channel")
    assert counts(a) == [1, 2, 1]
    assert counts(b) == [2]
    assert a.frames()[1] == {
        "event": "pusher_internal:subscription_count",
        "channel": "my-channel",
        "data": '{"subscription_count":1}',
    }


def test_subscription_count_is_not_sent_on_presence_channels() -> None:
    w = World(enable_subscription_count=True)
    a = w.client()
    w.join_presence(a, "presence-room", "alice")
    assert counts(a) == []


def test_subscription_count_is_throttled_above_100_subscribers() -> None:
    w = World(enable_subscription_count=True)
    clients = [w.client() for _ in range(COUNT_THROTTLE_THRESHOLD)]
    for client in clients:
        w.subscribe(client, "big")
    assert counts(clients[0])[-1] == COUNT_THROTTLE_THRESHOLD
    for client in clients:
        client.take()

    extra = [w.client() for _ in range(3)]
    for client in extra:
        w.subscribe(client, "big")  # 101, 102, 103: inside the 5 s window
    assert counts(clients[0]) == []
    w.hub.tick()
    assert counts(clients[0]) == []  # not yet due

    w.clock.advance(COUNT_THROTTLE_SECONDS)
    w.hub.tick()
    assert counts(clients[0]) == [COUNT_THROTTLE_THRESHOLD + 3]
    assert counts(extra[-1]) == [COUNT_THROTTLE_THRESHOLD + 3]
    w.hub.tick()
    assert counts(clients[0]) == [COUNT_THROTTLE_THRESHOLD + 3]  # nothing more pending

    w.clock.advance(1)
    w.hub.unsubscribe(w.app, extra[0].session, "big")  # 102, throttled again
    assert counts(clients[0]) == [COUNT_THROTTLE_THRESHOLD + 3]
    w.clock.advance(COUNT_THROTTLE_SECONDS)
    w.hub.tick()
    assert counts(clients[0]) == [COUNT_THROTTLE_THRESHOLD + 3, COUNT_THROTTLE_THRESHOLD + 2]


def test_throttled_count_of_a_vacated_channel_is_dropped() -> None:
    w = World(enable_subscription_count=True)
    clients = [w.client() for _ in range(COUNT_THROTTLE_THRESHOLD + 1)]
    for client in clients:
        w.subscribe(client, "big")
    last = clients[-1]
    for client in clients[:-1]:
        w.hub.unsubscribe(w.app, client.session, "big")
    last.take()
    held = len(w.of(ev.SubscriptionCountChanged))
    w.hub.unsubscribe(w.app, last.session, "big")  # vacated while a count is held
    w.clock.advance(COUNT_THROTTLE_SECONDS)
    w.hub.tick()
    assert counts(last) == []
    assert len(w.of(ev.SubscriptionCountChanged)) == held  # no late count after the vacate


# --- disconnect cleans up everything ---------------------------------------------------------


def test_disconnect_cleans_up(world: World) -> None:
    a, b = world.client(), world.client()
    world.signin(a, {"id": "alice", "watchlist": ["bob"]})
    world.subscribe(a, "my-channel")
    world.subscribe(a, "private-a")
    world.join_presence(a, "presence-room", "alice")
    world.join_presence(b, "presence-room", "bob")
    world.hub.disconnect(world.app, a.session)
    assert a.session.channels == {}
    assert set(world.app.channels) == {"presence-room"}
    assert world.app.users == {}
    assert world.app.watchers == {}
    assert world.app.connections == 1
    assert world.hub.connections == 1
    vacated = {e.channel for e in world.of(ev.ChannelVacated)}
    assert vacated == {"my-channel", "private-a"}
    assert world.of(ev.MemberRemoved) == [ev.MemberRemoved(APP_ID, "presence-room", "alice")]


# --- REST-side helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("my-event", True),
        ("client-x", True),
        ("x" * 200, True),
        ("x" * 201, False),
        ("", False),
        ("pusher:foo", False),
        ("pusher_internal:member_added", False),
        ("bad\nname", False),
    ],
)
def test_validate_event_name(world: World, name: str, ok: bool) -> None:
    assert world.hub.validate_event_name(world.app, name) is ok


@pytest.mark.parametrize("user_id", ["alice+tag@example.com", "Zoë Smith", "user:42", "u" * 128])
def test_presence_user_ids_are_not_limited_to_the_channel_charset(
    world: World, user_id: str
) -> None:
    # Presence ids never name a channel; real apps use e-mails and display names.
    client = world.client()
    world.join_presence(client, "presence-room", user_id)
    assert presence_of(client.take()[0])["ids"] == [user_id]


@pytest.mark.parametrize("user_id", ["", "a\nb", "tab\there", "u" * 129])
def test_presence_user_ids_with_control_characters_or_too_long_are_refused(
    world: World, user_id: str
) -> None:
    client = world.client()
    data = json.dumps({"user_id": user_id})
    auth = world.channel_auth(client, "presence-room", data)
    with pytest.raises(Refused) as raised:
        world.hub.subscribe(
            world.app,
            client.session,
            msg.Subscribe("presence-room", auth=auth, channel_data=data),
        )
    assert raised.value.reason is Reason.SUBSCRIBE_CHANNEL_DATA


def test_signin_ids_must_fit_the_channel_charset(world: World) -> None:
    # A signed-in id names the #server-to-user- channel, so it follows channel rules.
    client = world.client()
    assert world.refused_signin(client, {"id": "alice smith"}) is Reason.SIGNIN_DATA_INVALID


class _PendingBus(MemoryBus):
    """The local bus, except that subscribe answers wait until ``release()``."""

    def __init__(self, bus: MemoryBus) -> None:
        super().__init__(bus._cluster, bus.node_id)
        self.waiting: list[Any] = []

    def when_ready(self, app_id: str, channel: str, callback: Any) -> None:
        self.waiting.append(callback)

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for callback in waiting:
            callback()


def test_subscribe_is_answered_only_when_the_bus_is_ready() -> None:
    cluster = local_cluster()
    adapter = _PendingBus(cluster.bus)  # type: ignore[arg-type]
    settings = settings_from_mapping({"apps": [{"id": "1", "key": "k", "secret": "s"}]}, environ={})
    hub = Hub(
        settings, CountingFrame(), Clock(), replace(cluster, bus=adapter), app_states(settings)
    )
    app = hub.apps_by_id["1"]
    early, late = Client("1.1"), Client("1.2")
    hub.subscribe(app, early.session, msg.Subscribe("news"))
    assert early.frames() == [] and len(adapter.waiting) == 1
    hub.subscribe(app, late.session, msg.Subscribe("gone"))
    hub.unsubscribe(app, late.session, "gone")  # left before the bus was ready
    adapter.release()
    assert early.events() == ["pusher_internal:subscription_succeeded"]
    assert late.events() == []  # no success for a channel it already left
