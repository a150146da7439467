"""What the hub reports to listeners (webhooks, audit, metrics) as it acts.

These are the Pusher webhook events, decided where the state changes; a
listener must not block (the webhook producer queues them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "CacheMiss",
    "ChannelOccupied",
    "ChannelVacated",
    "ClientEventSent",
    "HubEvent",
    "MemberAdded",
    "MemberRemoved",
    "Notice",
    "RoleUnknown",
    "SubscriptionCountChanged",
    "UserSuspended",
]


@dataclass(frozen=True, slots=True)
class ChannelOccupied:
    """A channel went from 0 to 1 subscriber."""

    app_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class ChannelVacated:
    """A channel's last subscriber left."""

    app_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class MemberAdded:
    """A user id became present on a presence channel (its first socket joined)."""

    app_id: str
    channel: str
    user_id: str


@dataclass(frozen=True, slots=True)
class MemberRemoved:
    """A user id's last socket left a presence channel."""

    app_id: str
    channel: str
    user_id: str


@dataclass(frozen=True, slots=True)
class ClientEventSent:
    """A client event was relayed."""

    app_id: str
    channel: str
    event: str
    data: Any
    socket_id: str
    user_id: str | None


@dataclass(frozen=True, slots=True)
class CacheMiss:
    """A subscriber joined a cache channel that had nothing cached."""

    app_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class SubscriptionCountChanged:
    """A non-presence channel's subscription count changed."""

    app_id: str
    channel: str
    subscription_count: int


@dataclass(frozen=True, slots=True)
class RoleUnknown:
    """A sign-in carried a role the app does not configure (once per app and role).

    A security notice (:attr:`bastion.core.hub.Hub.notices`), not a webhook event.
    """

    app_id: str
    user_id: str
    role: str


@dataclass(frozen=True, slots=True)
class UserSuspended:
    """This node suspended a user who spent their error budget (once per suspension).

    A security notice (:attr:`bastion.core.hub.Hub.notices`), not a webhook event.
    """

    app_id: str
    user_id: str
    cooldown_seconds: float
    closed: int


HubEvent = (
    ChannelOccupied
    | ChannelVacated
    | MemberAdded
    | MemberRemoved
    | ClientEventSent
    | CacheMiss
    | SubscriptionCountChanged
)

#: Security notices for the audit log (:attr:`bastion.core.hub.Hub.notices`).
Notice = RoleUnknown | UserSuspended
