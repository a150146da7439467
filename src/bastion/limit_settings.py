"""The settings tables of limits: token buckets, and the limits that follow users.

Part of the one settings object of :mod:`bastion.config`, which re-exports every
name here: a token bucket (:class:`RateSettings`), the per-connection limits of a
role (``[apps.roles.NAME]``) and of anonymous connections (``[apps.anonymous]``),
a client event name's bucket (``client_event_limits``) and a user's error budget
(``[apps.user_error_budget]``), with the checks their names and keys must pass.
The checks raise ``ValueError`` naming the offending entry (never a secret: none
of these hold one); pydantic puts the field's location in front.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from bastion.security.event_limits import is_valid_pattern

__all__ = [
    "STRICT",
    "AnonymousSettings",
    "ClientEventLimits",
    "ConnectionLimits",
    "EventLimit",
    "PositiveFloat",
    "PositiveInt",
    "RateSettings",
    "RestEventLimits",
    "RoleClaim",
    "RoleKey",
    "RoleTables",
    "UserErrorBudget",
    "check_client_event_patterns",
    "check_rest_event_patterns",
    "check_role_claim",
    "check_role_key",
    "check_role_names",
    "check_roles_and_anonymous",
]

#: Strict (a string is not a number), closed (an unknown field is an error), frozen.
STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

#: A role's name in ``[apps.roles.NAME]``.
_ROLE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
#: Claims Bastion reads for themselves: none of them can also name the role.
_RESERVED_CLAIMS = frozenset(
    {"sub", "exp", "nbf", "iat", "aud", "iss", "channels", "user_info", "socket_id", "watchlist"}
)
#: ``user_data`` keys of a sign-in that mean something else than a role.
_RESERVED_USER_DATA = frozenset({"id", "user_info", "watchlist"})


class RateSettings(BaseModel):
    """A token bucket: ``rate`` tokens a second, at most ``burst`` held (and at start)."""

    model_config = STRICT

    rate: PositiveFloat
    burst: PositiveInt


class ConnectionLimits(BaseModel):
    """Per-connection limits of a role (``[apps.roles.NAME]``); unset: the app's own."""

    model_config = STRICT

    #: Client events per second and at once (over it: 4301 ``client_event_rate``).
    max_client_events_per_second: PositiveInt | None = None
    #: Frames of any kind per connection (over it: 4301 ``message_rate``).
    max_messages_per_second: RateSettings | None = None
    #: Subscribe attempts per connection (over it: subscription_error 429).
    subscribe_attempts: RateSettings | None = None
    #: Channels one connection may be subscribed to (over it: subscription_error 403).
    max_channels_per_connection: PositiveInt | None = None
    #: A presence member's ``user_info`` size in KiB (over it: subscription_error 413).
    max_presence_member_size_kb: PositiveFloat | None = None


class AnonymousSettings(ConnectionLimits):
    """Connections that have not signed in (``[apps.anonymous]``)."""

    #: Concurrent connections of this app that have not signed in (over it: 4100);
    #: the same as the app's ``max_unsigned_connections``, which still works.
    max_connections: PositiveInt | None = None


class EventLimit(BaseModel):
    """One client event name's bucket (``client_event_limits``): per connection, and
    with ``per_user`` also per signed-in user across the cluster."""

    model_config = STRICT

    rate: PositiveFloat
    burst: PositiveInt
    #: Also one bucket per signed-in user, all their connections on every node together.
    per_user: bool = False


class UserErrorBudget(BaseModel):
    """Refusals one signed-in user may earn, all connections and nodes together.

    Each refusal of a connection signed in as the user spends its reputation weight
    (``[security.reputation] points``); a user past the budget is signed out
    everywhere (4009) and their sign-ins are refused for ``cooldown_seconds``.
    """

    model_config = STRICT

    #: Points the budget regains a second.
    rate: PositiveFloat = 0.2
    #: Points it holds at most (and at first).
    burst: PositiveInt = 100
    #: Seconds a suspended user's sign-ins are refused (4009 ``signin_suspended``).
    cooldown_seconds: PositiveFloat = 300


# --- the checks ---------------------------------------------------------------------------


def check_role_names(value: dict[str, ConnectionLimits]) -> dict[str, ConnectionLimits]:
    """``[apps.roles]``: every table is named like a role."""
    for name in value:
        if not _ROLE_NAME.match(name):
            raise ValueError(f"{name!r} is not a role name (1-64 of A-Z a-z 0-9 _ - .)")
    return value


def check_role_key(value: str) -> str:
    """``role_key``: not a ``user_data`` key that means something else."""
    if value in _RESERVED_USER_DATA:
        raise ValueError(f"{value!r} is a user_data key Bastion reads for itself")
    return value


def check_role_claim(value: str) -> str:
    """``[apps.jwt] role_claim``: not a claim Bastion reads for itself."""
    if value in _RESERVED_CLAIMS:
        raise ValueError(f"{value!r} is a claim Bastion reads for itself")
    return value


def check_client_event_patterns(value: dict[str, EventLimit]) -> dict[str, EventLimit]:
    """``client_event_limits``: client event names, or prefixes ending in ``*``."""
    for name in value:
        if not is_valid_pattern(name, "client-"):
            raise ValueError(
                f"{name!r} is not a client event name or a prefix ending in * (client-…)"
            )
    return value


def check_rest_event_patterns(value: dict[str, RateSettings]) -> dict[str, RateSettings]:
    """``rest_event_limits``: event names, or prefixes ending in ``*``."""
    for name in value:
        if not name or not is_valid_pattern(name):
            raise ValueError(f"{name!r} is not an event name or a prefix ending in *")
    return value


def check_roles_and_anonymous(
    default_role: str | None,
    roles: Mapping[str, Any],
    anonymous: AnonymousSettings | None,
    max_unsigned_connections: int | None,
) -> None:
    """An app's ``default_role`` is one of its roles; its two anonymous caps agree."""
    if default_role is not None and default_role not in roles:
        raise ValueError(f"default_role {default_role!r} is not a role of [apps.roles]")
    if (
        anonymous is not None
        and anonymous.max_connections is not None
        and max_unsigned_connections is not None
        and anonymous.max_connections != max_unsigned_connections
    ):
        raise ValueError(
            "max_unsigned_connections and anonymous.max_connections differ: keep one"
            " (anonymous.max_connections is the new place)"
        )


# --- the annotated types of AppSettings' fields (checked at load) ---------------------------

#: ``[apps.roles.NAME]`` tables, named like roles.
RoleTables = Annotated[dict[str, ConnectionLimits], AfterValidator(check_role_names)]
#: ``role_key``: a ``user_data`` key that means nothing else.
RoleKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,64}$"), AfterValidator(check_role_key)]
#: ``role_claim``: a printable claim name that means nothing else.
RoleClaim = Annotated[str, Field(pattern=r"^[!-~]{1,128}$"), AfterValidator(check_role_claim)]
#: ``client_event_limits``: client event names or prefixes → their buckets.
ClientEventLimits = Annotated[dict[str, EventLimit], AfterValidator(check_client_event_patterns)]
#: ``rest_event_limits``: event names or prefixes → their buckets.
RestEventLimits = Annotated[dict[str, RateSettings], AfterValidator(check_rest_event_patterns)]
