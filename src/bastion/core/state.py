"""What the hub holds: one app's runtime state, its channels, and each connection's session.

Only what delivery needs on this node: a channel's subscribers and this node's
presence members with their sockets, the signed-in sessions per user, the
watchers per watched user. What spans nodes is the cluster state's
(:mod:`bastion.adapters.base`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bastion.config import RECONNECT_MARGIN, AppSettings, EventLimit, RateSettings
from bastion.core.history import HistoryPolicy
from bastion.core.session import Deadlines, SessionPhase
from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.names import ChannelType
from bastion.security.event_limits import EventLimits
from bastion.security.limits import RateLimiter
from bastion.security.payload import ClientEventPolicy
from bastion.security.roles import ANONYMOUS, Tiers
from bastion.security.secrets import SecretSet
from bastion.security.tokens import JwtVerifier

__all__ = ["MAX_SUSPENDED", "MAX_UNKNOWN_ROLES", "AppState", "Channel", "Member", "Session"]

#: Suspended users an app remembers at most (the soonest to end go first past it).
MAX_SUSPENDED = 100_000

#: Unconfigured roles an app remembers (and reports) at most.
MAX_UNKNOWN_ROLES = 100


def _gone(_: object) -> None:
    """What a session's callbacks become once its connection is gone."""


class Session:
    """One connection's protocol state, as the hub sees it.

    Attributes:
        socket_id: the connection's id (``digits.digits``).
        write: writes pre-framed bytes without blocking.
        refuse: runs the refusal path for this connection (may close it).
        phase: where the session is in its life (:mod:`bastion.core.session`).
        channels: channel name → presence user id (``None`` for other channels).
        user_id: the signed-in user id, if any.
        user_info: the signed-in user's ``user_info``.
        watchlist: the user ids it watches.
        watch_pending: online/offline frames waiting for the first watchlist report.
        opened_at: when the connection opened (hub clock), for the sign-in deadline.
        token_expires_at: when the sign-in token expires (hub clock), JWT sign-ins only.
        grants: the sign-in token's ``channels`` claim.
        events_full_at: the client-event bucket, folded into the time it is full again
            (:func:`~bastion.security.ratelimit.take_folded`; read against the app's
            current rate, so a live reload applies at the next event).
        subscribes_full_at: the subscribe-attempt bucket, folded the same way.
        tier: whose per-connection limits apply (:mod:`bastion.security.roles`):
            anonymous until it signs in, then its role's or the signed-in default.
        event_buckets: the buckets of ``client_event_limits`` rules it used (rule →
            folded bucket), made at its first limited event.
    """

    __slots__ = (
        "channels",
        "event_buckets",
        "events_full_at",
        "grants",
        "opened_at",
        "phase",
        "refuse",
        "socket_id",
        "subscribes_full_at",
        "tier",
        "token_expires_at",
        "user_id",
        "user_info",
        "watch_pending",
        "watchlist",
        "write",
    )

    def __init__(
        self,
        socket_id: str,
        write: Callable[[bytes], object],
        refuse: Callable[[Refused], None],
        *,
        opened_at: float | None = None,
    ) -> None:
        self.socket_id = socket_id
        self.write = write
        self.refuse = refuse
        self.phase = SessionPhase.UNSIGNED
        self.channels: dict[str, str | None] = {}
        self.user_id: str | None = None
        self.user_info: Any = None
        self.watchlist: tuple[str, ...] = ()
        self.watch_pending: list[bytes] | None = None
        #: ``None`` until known: the first session check then starts the clock.
        self.opened_at = opened_at
        self.token_expires_at: float | None = None
        self.grants: tuple[str, ...] = ()
        # Full buckets (one float each: a connection's memory is the product's scale).
        self.events_full_at = 0.0
        self.subscribes_full_at = 0.0
        self.tier = ANONYMOUS
        self.event_buckets: dict[str, float] | None = None

    def detach(self) -> None:
        """The connection is gone: drop its callbacks.

        They are the connection's bound methods, and the connection holds this
        session: dropped, the pair is freed as soon as the last reference goes,
        without waiting for the cycle collector (which pauses the whole server
        for as long as it takes to scan every live object).
        """
        self.write = _gone
        self.refuse = _gone


class Member:
    """A user present in a presence channel on this node, and its sockets here."""

    __slots__ = ("sockets", "user_info")

    def __init__(self, user_info: Any) -> None:
        self.user_info = user_info
        self.sockets: set[str] = set()


class Channel:
    """A channel with at least one local subscriber."""

    __slots__ = ("held", "members", "name", "subscribers", "type", "waiting")

    def __init__(self, name: str, channel_type: ChannelType) -> None:
        self.name = name
        self.type = channel_type
        self.subscribers: dict[str, Session] = {}
        #: This node's members (the cluster's are the cluster state's).
        self.members: dict[str, Member] = {}
        #: Subscribers not yet answered (waiting for the bus, or for the cluster's
        #: member list), with the control frames (member events, counts) that
        #: arrived meanwhile: sent after ``subscription_succeeded``.
        self.waiting: dict[str, list[bytes]] = {}
        #: Subscribers whose resume is being read, with the history events (position,
        #: frame) that arrived meanwhile: sent after the missed ones. ``None``: more
        #: arrived than can be held; they went out, and the resume answers false.
        self.held: dict[str, list[tuple[str, bytes]] | None] = {}

    @property
    def subscription_count(self) -> int:
        """Connections subscribed to the channel here."""
        return len(self.subscribers)

    @property
    def user_count(self) -> int:
        """Unique users present here (presence channels)."""
        return len(self.members)

    def presence_data(self, cluster: dict[str, Any] | None = None) -> str:
        """The presence block of ``subscription_succeeded``.

        ``cluster`` is the members the whole cluster has (``None`` when the cluster
        could not say); this node's own members are always in, with their own info.
        """
        hash_ = dict(cluster) if cluster else {}
        hash_.update((user_id, member.user_info) for user_id, member in self.members.items())
        return msg.dumps({"presence": {"ids": list(hash_), "hash": hash_, "count": len(hash_)}})


class AppState:
    """One app's runtime state, and what it derives from its settings.

    Args:
        settings: the app's configuration.
        jwt: its JWT verifier (read from its key files by the caller), in JWT mode.
        wall_clock: Unix seconds, only for the expiry of retiring secrets.

    Raises:
        ValueError: the app is in JWT mode but no verifier was given.
    """

    def __init__(
        self,
        settings: AppSettings,
        jwt: JwtVerifier | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._wall_clock = wall_clock
        self.channels: dict[str, Channel] = {}
        self.users: dict[str, dict[str, Session]] = {}
        self.watchers: dict[str, set[Session]] = {}
        self.connections = 0
        #: Open connections that have not signed in (``max_unsigned_connections``).
        self.unsigned = 0
        #: Sign-ins waiting for the cluster's count of their user's connections
        #: (``max_connections_per_user``): socket id → session.
        self.signing_in: dict[str, Session] = {}
        #: Roles seen in sign-ins that the app does not configure (each reported
        #: once; bounded by :data:`MAX_UNKNOWN_ROLES`).
        self.unknown_roles: set[str] = set()
        #: Suspended users (``user_error_budget``): user id → end of the cool-down,
        #: hub clock (bounded by :data:`MAX_SUSPENDED`).
        self.suspended: dict[str, float] = {}
        #: The app-wide client event bucket (keyed by app id; cluster-wide with redis).
        self.client_event_bucket: RateLimiter | None = None
        #: ``client_event_limits`` rule → its per-user limiter (cluster-wide with redis).
        self.user_event_buckets: dict[str, RateLimiter] = {}
        self.apply(settings, jwt)

    def apply(self, settings: AppSettings, jwt: JwtVerifier | None) -> None:
        """Take ``settings`` (a live reload): runtime state stays, derived state is rebuilt.

        The secrets, the JWT verifier, the client-event policy and the session
        deadlines follow the settings; the app-wide client-event bucket starts full
        when its rate changed. Per-connection buckets follow by themselves (they are
        read against the current settings).
        """
        if settings.jwt is not None and jwt is None:
            raise ValueError(f"apps[{settings.id}]: the JWT verifier is built by the caller")
        previous: AppSettings | None = getattr(self, "settings", None)
        self.settings = settings
        self.secret_set = SecretSet.from_settings(settings)
        self.jwt = jwt
        self.client_events = ClientEventPolicy(
            settings.client_event_allowlist, settings.client_event_schemas
        )
        if (
            previous is not None
            and previous.client_events_per_app != settings.client_events_per_app
        ):
            self.client_event_bucket = None
        #: Per-connection limits by tier: anonymous, signed in, each role.
        self.tiers = Tiers(settings, RECONNECT_MARGIN)
        #: The rule of each client event name, and of each REST event name.
        self.event_limits: EventLimits[EventLimit] = EventLimits(settings.client_event_limits)
        self.rest_event_limits: EventLimits[RateSettings] = EventLimits(settings.rest_event_limits)
        if previous is not None and previous.client_event_limits != settings.client_event_limits:
            self.user_event_buckets = {}  # rebuilt, full, at their next event
        #: Which channels have history, and its bounds (``None``: history off).
        self.history = HistoryPolicy(settings.history) if settings.history is not None else None
        token = settings.jwt
        self.deadlines = Deadlines(
            settings.signin_deadline_seconds,
            token.expiry_warning_seconds if token is not None else None,
            token.expiry_grace_seconds if token is not None else None,
        )

    @property
    def id(self) -> str:
        """The app id."""
        return self.settings.id

    @property
    def secrets(self) -> tuple[bytes, ...]:
        """The secrets that verify right now, newest first."""
        return self.secret_set.active(self._wall_clock())
