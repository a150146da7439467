"""What travels between nodes, and what the cluster state hands back to the hub.

Each is a small frozen dataclass: a channel event to deliver, or one of the
control messages that carry a decision taken once for the cluster (a member
added or removed, a channel's subscription count, a user's first sign-in or
last connection anywhere, a ``terminate_connections``, a user's connections
replaced by a newer one, a user suspended). A node's hub receives
every one of them through :meth:`bastion.core.hub.Hub.receive`, whether it was
decided on this node or arrived over the bus, and delivers it to its own
connections only.

Pure: no I/O. The wire form, signed with the cluster key, is in
:mod:`bastion.adapters.wire`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "ChannelEvent",
    "MemberAdded",
    "MemberRemoved",
    "Message",
    "Replaced",
    "SubscriptionCount",
    "Suspend",
    "Terminate",
    "UserOffline",
    "UserOnline",
]


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    """An event on a channel (``#server-to-user-{id}`` for a user).

    Attributes:
        app_id: the app.
        channel: the Pusher channel.
        event: the event name.
        data: a server event's string as published, or a client event's decoded
            JSON value as the client sent it.
        exclude_socket_id: the socket that must not receive it, if any.
        user_id: the sender's presence user id (client events on presence channels).
        client: a client event (never updates a cache channel's cache).
        position: its place in the channel's history (``"{epoch}:{offset}"``), for
            a server event the history recorded.
    """

    app_id: str
    channel: str
    event: str
    data: Any
    exclude_socket_id: str | None = None
    user_id: str | None = None
    client: bool = False
    position: str | None = None


@dataclass(frozen=True, slots=True)
class MemberAdded:
    """``user_id`` became present in a presence channel somewhere in the cluster.

    ``exclude_socket_id`` is the socket that joined: it learns of itself from its
    member list, not from a ``member_added``.
    """

    app_id: str
    channel: str
    user_id: str
    user_info: Any
    exclude_socket_id: str | None = None


@dataclass(frozen=True, slots=True)
class MemberRemoved:
    """``user_id``'s last connection anywhere left a presence channel."""

    app_id: str
    channel: str
    user_id: str


@dataclass(frozen=True, slots=True)
class SubscriptionCount:
    """A channel's subscription count over the cluster (already throttled)."""

    app_id: str
    channel: str
    count: int


@dataclass(frozen=True, slots=True)
class UserOnline:
    """``user_id``'s first connection in the cluster signed in (watchlists)."""

    app_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class UserOffline:
    """``user_id``'s last signed-in connection in the cluster closed (watchlists)."""

    app_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class Terminate:
    """Close every connection signed in as ``user_id`` (``terminate_connections``)."""

    app_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class Replaced:
    """Close ``user_id``'s connections ``socket_ids``: newer ones took their place.

    Decided by the cluster state when a sign-in finds the user at
    ``max_connections_per_user`` with ``user_connection_policy = "close_oldest"``;
    each node closes those of the sockets it holds.
    """

    app_id: str
    user_id: str
    socket_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Suspend:
    """``user_id`` spent its error budget: close its connections, refuse its sign-ins.

    For ``cooldown_ms`` milliseconds from receipt (each node's own clock).
    """

    app_id: str
    user_id: str
    cooldown_ms: int


Message = (
    ChannelEvent
    | MemberAdded
    | MemberRemoved
    | SubscriptionCount
    | UserOnline
    | UserOffline
    | Terminate
    | Replaced
    | Suspend
)
