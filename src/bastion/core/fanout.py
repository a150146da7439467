"""Fan-out: an event framed once and the same bytes written to every local subscriber.

Every delivery of the node goes through :class:`FanOut`: REST publishes, client
events relayed, events other nodes sent, and the control frames of the cluster
(member events, counts, watchlists), so the deliveries counter is exact and the
encode-once rule lives in one place. Writes never block: a session's ``write``
queues pre-framed bytes (the server's outbox flushes them once per loop
iteration), so a broadcast never awaits a subscriber.

A server event on a channel with history goes to the history instead
(:class:`~bastion.adapters.base.History`), which records it and delivers it,
with its position, to every node, this one included. An app without history
pays one attribute check per channel published to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from bastion.adapters.base import Bus, ClusterState, History
from bastion.core.state import AppState, Channel, Session
from bastion.protocol import messages as msg
from bastion.protocol.names import SERVER_TO_USER_PREFIX, classify_channel

__all__ = ["FanOut", "Frame"]

#: Turns a message's UTF-8 JSON into WebSocket frame bytes (server-side, unmasked).
Frame = Callable[[bytes], bytes]


class FanOut:
    """Frames and writes to local sessions; hands publishes to the bus.

    Args:
        frame: the framing function.
        bus: the node's bus (other nodes' subscribers).
        state: the node's cluster state (cache channels' last events).
        history: the node's channel history.
    """

    __slots__ = ("bus", "deliveries", "frame", "history", "state")

    def __init__(self, frame: Frame, bus: Bus, state: ClusterState, history: History) -> None:
        self.frame = frame
        self.bus = bus
        self.state = state
        self.history = history
        #: Frames written to sessions, all kinds together (``/metrics``).
        self.deliveries = 0

    def to_channel(self, channel: Channel, text: bytes, exclude_socket_id: str | None) -> None:
        """Frame ``text`` once and write the same bytes to every subscriber but one."""
        frame = self.frame(text)
        subscribers = channel.subscribers
        if exclude_socket_id is None or exclude_socket_id not in subscribers:
            for session in subscribers.values():
                session.write(frame)
            self.deliveries += len(subscribers)
        else:
            for socket_id, session in subscribers.items():
                if socket_id != exclude_socket_id:
                    session.write(frame)
            self.deliveries += len(subscribers) - 1

    def to_sessions(self, sessions: Iterable[Session], text: bytes) -> None:
        """Frame ``text`` once and write it to each of ``sessions``."""
        frame = self.frame(text)
        for session in sessions:
            session.write(frame)
            self.deliveries += 1

    def publish(
        self,
        app: AppState,
        channels: Iterable[str],
        event: str,
        data: str,
        exclude_socket_id: str | None = None,
    ) -> None:
        """A server event: local subscribers first, then the bus (and a cache's record).

        On a channel with history: recorded, and delivered by the history.
        """
        policy = app.history
        for name in channels:
            if policy is not None and policy.covers(name):
                self.history.publish(app.id, name, event, data, exclude_socket_id, policy.limits)
            else:
                self.deliver(app, name, event, data, exclude_socket_id, None)
                self.bus.publish(app.id, name, event, data, exclude_socket_id)
            if classify_channel(name).cached:
                self.state.cache(app.id, name, event, data, app.settings.cache_ttl)

    def relay(
        self,
        app: AppState,
        channel: Channel,
        session: Session,
        event: msg.ClientEvent,
        data: msgspec.Raw,
    ) -> None:
        """A client event the gate let through: the channel's other subscribers, everywhere.

        ``data`` is the event's data already encoded (written as is, never again).
        """
        user_id = session.channels[event.channel]
        text = msg.channel_event(event.event, event.channel, data, user_id)
        self.to_channel(channel, text, session.socket_id)
        # Other nodes' subscribers too; the sender is excluded there by socket id.
        self.bus.publish(
            app.id, event.channel, event.event, event.data, session.socket_id, user_id, client=True
        )

    def deliver(
        self,
        app: AppState,
        name: str,
        event: str,
        data: Any,
        exclude_socket_id: str | None,
        user_id: str | None,
        position: str | None = None,
    ) -> None:
        """An event on ``name`` to its subscribers here.

        On ``#server-to-user-{id}``: to that user's signed-in sessions here. With a
        ``position`` (a recorded event), subscribers whose resume is being read get
        it after their missed events (:meth:`hold`).
        """
        if name.startswith(SERVER_TO_USER_PREFIX):
            sockets = app.users.get(name[len(SERVER_TO_USER_PREFIX) :])
            if sockets:
                text = msg.channel_event(event, name, data)
                self.to_sessions(
                    (s for sid, s in sockets.items() if sid != exclude_socket_id), text
                )
            return
        channel = app.channels.get(name)
        if channel is not None:
            text = msg.channel_event(event, name, data, user_id, position)
            if position is not None and channel.held:
                self.hold(app, channel, text, exclude_socket_id, position)
            else:
                self.to_channel(channel, text, exclude_socket_id)

    def hold(
        self,
        app: AppState,
        channel: Channel,
        text: bytes,
        exclude_socket_id: str | None,
        position: str,
    ) -> None:
        """A recorded event: held for the subscribers whose resume is being read.

        At most ``max_replay_events`` each; past that, what was held goes out now
        followed by the rest as it comes, and that resume answers ``false``
        (``overflow``), so order is kept either way.
        """
        frame = self.frame(text)
        policy = app.history
        limit = policy.limits.max_replay if policy is not None else 0
        held = channel.held
        written = 0
        for socket_id, session in channel.subscribers.items():
            if socket_id == exclude_socket_id:
                continue
            waiting = held.get(socket_id)  # None: not held, or overflowed
            if waiting is None:
                session.write(frame)
                written += 1
            elif len(waiting) < limit:
                waiting.append((position, frame))
            else:
                for _, earlier in waiting:
                    session.write(earlier)
                session.write(frame)
                written += len(waiting) + 1
                held[socket_id] = None
        self.deliveries += written
