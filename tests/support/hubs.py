"""Hubs without sockets: fake connections, a fake clock, and N nodes in one process.

* :class:`Clock` — monotonic seconds the test moves by hand.
* :class:`Client` — a fake connection: what its session was sent and refused.
* :class:`HubNode` — one hub of an app (id ``12345``, key ``app-key``) over a given
  cluster, with the app's auth endpoint and helpers to act as its clients.
* :class:`MemoryNodes` — ``n`` hubs sharing one in-memory cluster
  (:class:`bastion.adapters.memory.MemoryCluster`); :meth:`MemoryNodes.settle`
  delivers what the bus queued, so a test decides when other nodes hear of
  something, as h11's ``ConnectionPair`` lets a test drive both ends.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from bastion.adapters.base import Cluster
from bastion.adapters.memory import MemoryCluster
from bastion.config import settings_from_mapping
from bastion.core import events as ev
from bastion.core.hub import AppState, Hub, Session
from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.positions import Resume
from bastion.protocol.signing import channel_auth_string, sign, signin_auth_string
from bastion.server.apps import app_states

__all__ = ["APP_ID", "KEY", "SECRET", "Client", "Clock", "HubNode", "MemoryNodes"]

APP_ID = "12345"
KEY = "app-key"
SECRET = "app-secret"

_socket_ids = itertools.count(1)


class Clock:
    """Monotonic seconds, moved by the test."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Client:
    """A fake connection: the frames its session was written and its refusals."""

    def __init__(self, socket_id: str | None = None) -> None:
        self.written: list[bytes] = []
        self.refusals: list[Refused] = []
        socket_id = socket_id or f"{next(_socket_ids)}.{next(_socket_ids)}"
        self.session = Session(socket_id, self.written.append, self.refusals.append)

    @property
    def socket_id(self) -> str:
        return self.session.socket_id

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.written]

    def events(self) -> list[str]:
        return [frame["event"] for frame in self.frames()]

    def take(self) -> list[dict[str, Any]]:
        """The frames so far, forgotten (the next call sees only newer ones)."""
        frames = self.frames()
        self.written.clear()
        return frames


class HubNode:
    """One hub of the test app, over ``cluster``, acting as its clients would."""

    def __init__(
        self,
        cluster: Cluster,
        clock: Clock,
        server: dict[str, Any] | None = None,
        **app_fields: Any,
    ) -> None:
        settings = settings_from_mapping(
            {
                "server": server or {},
                "apps": [{"id": APP_ID, "key": KEY, "secret": SECRET, **app_fields}],
            },
            environ={},
        )
        self.clock = clock
        self.hub = Hub(settings, bytes, clock, cluster, app_states(settings))
        self.app: AppState = self.hub.apps_by_id[APP_ID]
        #: Every hub event this node emitted (what its webhooks would get).
        self.events: list[ev.HubEvent] = []
        self.hub.listeners.append(self.events.append)

    def client(self) -> Client:
        client = Client()
        assert self.hub.admit(self.app) is None
        return client

    @staticmethod
    def auth(message: str) -> str:
        return f"{KEY}:{sign(SECRET.encode(), message)}"

    def subscribe(
        self,
        client: Client,
        channel: str,
        channel_data: str | None = None,
        *,
        resume: Resume | None = None,
    ) -> None:
        auth = None
        if channel.startswith(("private-", "presence-")):
            auth = self.auth(channel_auth_string(client.socket_id, channel, channel_data))
        request = msg.Subscribe(
            channel=channel, auth=auth, channel_data=channel_data, resume=resume
        )
        self.hub.subscribe(self.app, client.session, request)

    def join(self, client: Client, channel: str, user_id: str, user_info: Any = None) -> None:
        data = json.dumps({"user_id": user_id, "user_info": user_info})
        self.subscribe(client, channel, channel_data=data)

    def leave(self, client: Client, channel: str) -> None:
        self.hub.unsubscribe(self.app, client.session, channel)

    def close(self, client: Client) -> None:
        self.hub.disconnect(self.app, client.session)

    def signin(self, client: Client, user: dict[str, Any]) -> None:
        user_data = json.dumps(user)
        auth = self.auth(signin_auth_string(client.socket_id, user_data))
        self.hub.signin(self.app, client.session, msg.Signin(auth=auth, user_data=user_data))

    def client_event(self, client: Client, channel: str, data: Any) -> None:
        request = msg.ClientEvent("client-typing", channel, data)
        self.hub.client_event(self.app, client.session, request)

    def publish(self, channel: str, event: str = "update", data: str = "{}") -> None:
        self.hub.publish(self.app, [channel], event, data)

    def of(self, kind: type[Any]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


class MemoryNodes:
    """``count`` hubs sharing one in-memory cluster and one clock."""

    def __init__(self, count: int, server: dict[str, Any] | None = None, **app_fields: Any) -> None:
        self.clock = Clock()
        self.cluster = MemoryCluster(self.clock)
        self.nodes = [
            HubNode(self.cluster.join(f"node-{index}"), self.clock, server, **app_fields)
            for index in range(count)
        ]

    def __getitem__(self, index: int) -> HubNode:
        return self.nodes[index]

    def settle(self) -> int:
        """Deliver everything the bus queued (and what that queues); how many."""
        return self.cluster.pump()

    def events(self, kind: type[Any]) -> list[Any]:
        """Every node's hub events of ``kind`` (each is decided on one node only)."""
        return [event for node in self.nodes for event in node.of(kind)]
