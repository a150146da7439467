"""Per-connection limits by role: anonymous, signed in, and each configured role. Pure.

A connection's limits (client events per second, the message budget, subscribe
attempts, channels per connection, presence member size) are the app's own
settings, overridden by a table:

* ``[apps.anonymous]`` while the connection has not signed in;
* ``[apps.roles.NAME]`` once it signed in with role ``NAME``: a role comes only
  from what the app signed, a JWT claim (``[apps.jwt] role_claim``) or the
  ``user_data`` of an HMAC sign-in (``role_key``), never from a client frame;
* the app's settings (or ``default_role``'s table) for a signed-in connection
  without a role, or with a role the app does not configure (the caller audits
  that once; it is never an error for the user).

:class:`Tiers` resolves every table of an app once (at start and at each live
reload) into :class:`Limits`, so a frame costs one dictionary lookup. A
connection holds its *tier* (a string key), not the limits themselves, so a
reload applies at its next frame without walking the connections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bastion.protocol.names import is_valid_identity

if TYPE_CHECKING:
    from bastion.config import AppSettings, ConnectionLimits

__all__ = [
    "ANONYMOUS",
    "MAX_ROLE_LENGTH",
    "SIGNED_IN",
    "Limits",
    "Tiers",
    "is_valid_role",
]

#: The tier of a connection that has not signed in.
ANONYMOUS = "\x00anonymous"
#: The tier of a signed-in connection without a configured role.
SIGNED_IN = "\x00signed-in"
#: Longest role a sign-in may carry (a longer one is refused like any bad token).
MAX_ROLE_LENGTH = 64


def is_valid_role(role: object) -> bool:
    """Whether ``role`` is a role a sign-in may carry: a string of 1-64 characters,
    no control character, no surrogate (so no tier key, which start with NUL)."""
    return isinstance(role, str) and len(role) <= MAX_ROLE_LENGTH and is_valid_identity(role)


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-connection limits of one tier, resolved.

    Attributes:
        client_events_per_second: the client-event bucket's rate and burst.
        message_rate: the message budget's rate (frames a second).
        message_burst: its burst, never below a reconnect's frames.
        subscribe_rate: subscribe attempts a second.
        subscribe_burst: their burst, never below a reconnect's subscribes.
        max_channels_per_connection: channels one connection may hold.
        max_presence_member_bytes: a presence member's ``user_info`` size.
    """

    client_events_per_second: float
    message_rate: float
    message_burst: float
    subscribe_rate: float
    subscribe_burst: float
    max_channels_per_connection: int
    max_presence_member_bytes: int


def resolve(app: AppSettings, table: ConnectionLimits | None, margin: int) -> Limits:
    """The app's limits with ``table``'s overrides (``None``: the app's own).

    ``margin`` is the frames a reconnect sends besides one subscribe per channel.
    """
    channels = app.max_channels_per_connection
    events = app.max_client_events_per_second
    messages = app.max_messages_per_second
    subscribes = app.subscribe_attempts
    member_kb = app.max_presence_member_size_kb
    if table is not None:
        channels = table.max_channels_per_connection or channels
        events = table.max_client_events_per_second or events
        messages = table.max_messages_per_second or messages
        subscribes = table.subscribe_attempts or subscribes
        member_kb = table.max_presence_member_size_kb or member_kb
    return Limits(
        client_events_per_second=float(events),
        message_rate=messages.rate,
        message_burst=max(float(messages.burst), channels + margin),
        subscribe_rate=subscribes.rate,
        subscribe_burst=max(float(subscribes.burst), channels + margin),
        max_channels_per_connection=channels,
        max_presence_member_bytes=int(member_kb * 1024),
    )


class Tiers:
    """An app's limits by tier: anonymous, signed in, and each role.

    Args:
        app: the app's settings.
        margin: :data:`bastion.config.RECONNECT_MARGIN`.
    """

    __slots__ = ("_by_tier", "roles")

    def __init__(self, app: AppSettings, margin: int) -> None:
        roles: Mapping[str, ConnectionLimits] = app.roles
        default = roles.get(app.default_role) if app.default_role is not None else None
        self._by_tier: dict[str, Limits] = {
            ANONYMOUS: resolve(app, app.anonymous, margin),
            SIGNED_IN: resolve(app, default, margin),
        }
        for name, table in roles.items():
            self._by_tier[name] = resolve(app, table, margin)
        #: The configured role names.
        self.roles = frozenset(roles)

    def __getitem__(self, tier: str) -> Limits:
        """The limits of ``tier`` (a role the app no longer has: signed in)."""
        found = self._by_tier.get(tier)
        return found if found is not None else self._by_tier[SIGNED_IN]

    def tier_of(self, role: str | None) -> str:
        """The tier of a sign-in carrying ``role`` (unconfigured or none: signed in)."""
        return role if role is not None and role in self.roles else SIGNED_IN
