"""The hub: apps, channels, presence, signed-in users, and routing of publishes.

It knows nothing of sockets or HTTP. The server gives it a :class:`Session` per
connection (with a ``write`` that takes pre-framed bytes and never blocks, and a
``refuse`` that runs the one refusal path) and a ``frame`` function that turns
a text message into WebSocket frame bytes. A publish is serialized once and
framed once per channel, and the same bytes are written to every subscriber.

The hub keeps what it needs to deliver to its own connections (subscribers,
this node's presence members and signed-in users, watchers) and nothing more:
what spans nodes is the cluster seam's (:mod:`bastion.adapters.base`). The hub
tells the :class:`~bastion.adapters.base.ClusterState` its transitions and
receives the decisions back through :meth:`Hub.receive` (member added, count,
online, …) and :meth:`Hub.emit` (the webhooks' hub events), exactly as it
receives what other nodes send over the :class:`~bastion.adapters.base.Bus`;
with one node the decisions come back in the same call.

Input errors are raised as :class:`~bastion.errors.Refused`; effects on other
connections (terminate, notices) go through their ``refuse``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from bastion.adapters import messages as cm
from bastion.adapters.base import Cached, Cluster, ClusterUnavailable
from bastion.config import AppSettings, Settings
from bastion.core import events as ev
from bastion.eager import drive
from bastion.errors import ConfigError, Refused
from bastion.protocol import messages as msg
from bastion.protocol.names import (
    SERVER_TO_USER_PREFIX,
    ChannelKind,
    ChannelType,
    classify_channel,
    is_client_event_name,
    is_valid_channel_name,
    is_valid_event_name,
    is_valid_presence_user_id,
    is_valid_user_id,
)
from bastion.protocol.refusals import Reason
from bastion.protocol.signing import channel_auth_string, signin_auth_string, verify_auth
from bastion.security.limits import LimiterFactory, RateLimiter, memory_limiters
from bastion.security.payload import ClientEventPolicy
from bastion.security.ratelimit import TokenBucket
from bastion.security.secrets import SecretSet
from bastion.security.tokens import Claims, JwtVerifier, TokenError, grants, looks_like_jwt

__all__ = ["AppState", "Channel", "Hub", "Session"]

#: Channel names echoed back in a subscription error are at most this long.
_ECHO_LIMIT = 200

Frame = Callable[[str], bytes]

#: Longest key file read (a JWKS of a few dozen keys is far smaller).
_KEY_FILE_LIMIT = 1 << 20


def _read_key_file(path: str) -> str:
    """Read a PEM or JWKS file for :class:`JwtVerifier` (``security/`` does no I/O)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read(_KEY_FILE_LIMIT + 1)
    if len(text) > _KEY_FILE_LIMIT:
        raise ValueError(f"{path} is larger than {_KEY_FILE_LIMIT} bytes")
    return text


class Session:
    """One connection's protocol state, as the hub sees it.

    Attributes:
        socket_id: the connection's id (``digits.digits``).
        write: writes pre-framed bytes without blocking.
        refuse: runs the refusal path for this connection (may close it).
        channels: channel name → presence user id (``None`` for other channels).
        user_id: the signed-in user id, if any.
        opened_at: when the connection opened (hub clock), for the sign-in deadline.
        token_expires_at: when the sign-in token expires (hub clock), JWT sign-ins only.
        token_warned: whether ``bastion:token_expiring`` was sent for that token.
        grants: the sign-in token's ``channels`` claim.
    """

    __slots__ = (
        "bucket",
        "channels",
        "grants",
        "opened_at",
        "refuse",
        "socket_id",
        "subscribe_bucket",
        "token_expires_at",
        "token_warned",
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
        self.channels: dict[str, str | None] = {}
        self.user_id: str | None = None
        self.user_info: Any = None
        self.watchlist: tuple[str, ...] = ()
        #: Clustered watchlists: online/offline frames that arrive before the first
        #: report is written wait here and follow it (``None``: none pending).
        self.watch_pending: list[bytes] | None = None
        self.bucket: TokenBucket | None = None
        #: ``None`` until known: the first :meth:`Hub.check_session` then starts the clock.
        self.opened_at = opened_at
        self.token_expires_at: float | None = None
        self.token_warned = False
        self.grants: tuple[str, ...] = ()
        self.subscribe_bucket: TokenBucket | None = None


class _Member:
    __slots__ = ("sockets", "user_info")

    def __init__(self, user_info: Any) -> None:
        self.user_info = user_info
        self.sockets: set[str] = set()


class Channel:
    """A channel with at least one local subscriber."""

    __slots__ = ("members", "name", "subscribers", "type", "waiting")

    def __init__(self, name: str, channel_type: ChannelType) -> None:
        self.name = name
        self.type = channel_type
        self.subscribers: dict[str, Session] = {}
        #: This node's members (the cluster's are the cluster state's).
        self.members: dict[str, _Member] = {}
        #: Subscribers not yet answered (waiting for the bus, or for the cluster's
        #: member list), with the control frames (member events, counts) that
        #: arrived meanwhile: sent after ``subscription_succeeded``.
        self.waiting: dict[str, list[bytes]] = {}

    @property
    def subscription_count(self) -> int:
        """Connections subscribed to the channel."""
        return len(self.subscribers)

    @property
    def user_count(self) -> int:
        """Unique users present (presence channels)."""
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
    """One app's runtime state.

    Args:
        settings: the app's configuration.
        wall_clock: Unix seconds, only for the expiry of retiring secrets.
    """

    def __init__(self, settings: AppSettings, wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.secret_set = SecretSet.from_settings(settings)
        self._wall_clock = wall_clock
        self.channels: dict[str, Channel] = {}
        self.users: dict[str, dict[str, Session]] = {}
        self.watchers: dict[str, set[Session]] = {}
        self.connections = 0
        #: Open connections that have not signed in (``max_unsigned_connections``).
        self.unsigned = 0
        #: JWT mode: key files are read here, once, so a bad path fails start-up.
        self.jwt: JwtVerifier | None = None
        if settings.jwt is not None:
            try:
                self.jwt = JwtVerifier.from_settings(settings.jwt, _read_key_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"apps[{settings.id}].jwt: {exc}") from None
        # --- client event policy (allow-list, schemas, app-wide bucket) ---
        self.client_events = ClientEventPolicy(
            settings.client_event_allowlist, settings.client_event_schemas
        )
        #: The app-wide client event bucket (keyed by app id; cluster-wide with redis).
        self.client_event_bucket: RateLimiter | None = None

    @property
    def id(self) -> str:
        """The app id."""
        return self.settings.id

    @property
    def secrets(self) -> tuple[bytes, ...]:
        """The secrets that verify right now, newest first."""
        return self.secret_set.active(self._wall_clock())


class Hub:
    """Routes subscribes, client events and publishes for every app of a node.

    Args:
        settings: the loaded configuration.
        frame: turns a text message into WebSocket frame bytes (server-side, unmasked).
        clock: monotonic seconds (rate limits, token deadlines).
        cluster: the node's bus and cluster state (the hub attaches itself to both).
        wall_clock: Unix seconds, used only for the expiry of retiring secrets
            (``expires_at`` is an instant, which a monotonic clock cannot express).
    """

    def __init__(
        self,
        settings: Settings,
        frame: Frame,
        clock: Callable[[], float],
        cluster: Cluster,
        *,
        wall_clock: Callable[[], float] = time.time,
        limiters: LimiterFactory | None = None,
    ) -> None:
        self._frame = frame
        self._clock = clock
        self._wall_clock = wall_clock
        #: Builds the app-wide limiters (cluster-wide ones with the redis adapter).
        self.limiters: LimiterFactory = limiters or memory_limiters
        self.bus = cluster.bus
        self.state = cluster.state
        self.apps_by_key: dict[str, AppState] = {}
        self.apps_by_id: dict[str, AppState] = {}
        self.listeners: list[Callable[[ev.HubEvent], None]] = []
        self.bus.attach(self.receive)
        self.state.attach(self.receive, self.emit)
        self.deliveries = 0
        self.connections = 0
        self.max_connections = settings.server.max_connections
        for app in settings.apps:
            state = AppState(app, wall_clock)
            self.apps_by_key[app.key] = state
            self.apps_by_id[app.id] = state

    # --- connection lifecycle ------------------------------------------------------

    def admit(self, app: AppState) -> Reason | None:
        """Whether a new connection to ``app`` may open; counts it when it may."""
        if not app.settings.enabled:
            return Reason.APP_DISABLED
        if self.max_connections is not None and self.connections >= self.max_connections:
            return Reason.OVER_CAPACITY
        limit = app.settings.max_connections
        if limit is not None and app.connections >= limit:
            return Reason.APP_OVER_QUOTA
        unsigned = app.settings.max_unsigned_connections
        if unsigned is not None and app.unsigned >= unsigned:
            return Reason.UNSIGNED_OVER_QUOTA
        app.connections += 1
        app.unsigned += 1  # every connection opens unsigned
        self.connections += 1
        return None

    def disconnect(self, app: AppState, session: Session) -> None:
        """Forget a closed connection: leave its channels, sign it out, uncount it."""
        for channel in list(session.channels):
            self.unsubscribe(app, session, channel)
        if session.user_id is not None:
            sockets = app.users.get(session.user_id)
            if sockets is not None:
                sockets.pop(session.socket_id, None)
                if not sockets:
                    del app.users[session.user_id]
                    self.state.user_off(app.id, session.user_id)
        for watched in session.watchlist:
            watchers = app.watchers.get(watched)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del app.watchers[watched]
        if session.user_id is None:
            app.unsigned -= 1
        app.connections -= 1
        self.connections -= 1

    # --- subscriptions -------------------------------------------------------------

    def subscribe(self, app: AppState, session: Session, request: msg.Subscribe) -> None:
        """Join a channel, answering success (or raising a channel-level refusal)."""
        name = request.channel
        echo = name if len(name) <= _ECHO_LIMIT and name.isprintable() else None
        # First, before any work: bounds channel enumeration and auth-endpoint amplification.
        now = self._clock()
        if session.subscribe_bucket is None:
            rate = app.settings.subscribe_attempts
            session.subscribe_bucket = TokenBucket(rate.rate, rate.burst, now)
        if session.subscribe_bucket.take(now) > 0:
            raise Refused(Reason.SUBSCRIBE_RATE, channel=echo)
        if not is_valid_channel_name(name, app.settings.max_channel_name_length):
            raise Refused(Reason.SUBSCRIBE_INVALID_CHANNEL, channel=echo)
        channel_type = classify_channel(name)
        if channel_type.kind is ChannelKind.SERVER_TO_USER:
            if session.user_id is None or name != SERVER_TO_USER_PREFIX + session.user_id:
                raise Refused(Reason.SUBSCRIBE_NOT_SIGNED_IN, channel=name)
            # Deliveries go by the user index, not channel membership.
            session.write(self._frame(msg.subscription_succeeded(name)))
            return
        existing = app.channels.get(name)
        if name in session.channels and existing is not None:
            # Idempotent: answer again without duplicating membership or member_added.
            if channel_type.kind is not ChannelKind.PRESENCE:
                session.write(self._frame(msg.subscription_succeeded(name)))
            else:

                def again(found: dict[str, Any] | None) -> None:
                    data = existing.presence_data(found)
                    session.write(self._frame(msg.subscription_succeeded(name, data)))

                drive(self._members(app, name), again)
            return

        user_id: str | None = None
        user_info: Any = None
        if channel_type.needs_auth:
            granted = self._token_grant(app, session, request, channel_type, now)
            if granted is not None:
                user_id, user_info = granted
            else:
                user_id, user_info = self._hmac_grant(app, session, request, channel_type)
            if user_id is not None:
                size = msg.utf8_size(user_info)
                if size > app.settings.max_presence_member_bytes:
                    raise Refused(Reason.SUBSCRIBE_MEMBER_TOO_LARGE, channel=name)
                if (
                    existing is not None
                    and user_id not in existing.members
                    and existing.user_count >= app.settings.max_presence_members
                ):
                    raise Refused(Reason.SUBSCRIBE_PRESENCE_FULL, channel=name)

        channel = existing
        if channel is None:
            channel = app.channels[name] = Channel(name, channel_type)
            self.bus.interest_on(app.id, name)
            self.state.channel_on(app.id, name)
        channel.subscribers[session.socket_id] = session
        session.channels[name] = user_id
        # Member and count frames that reach this socket before its answer wait.
        channel.waiting[session.socket_id] = []

        if user_id is not None:
            member = channel.members.get(user_id)
            if member is None:
                member = channel.members[user_id] = _Member(user_info)
                member.sockets.add(session.socket_id)
                # The cluster state decides whether the user is new to the cluster.
                self.state.member_on(app.id, name, user_id, user_info, session.socket_id)
            else:
                member.sockets.add(session.socket_id)

        def still_subscribed() -> bool:
            # False once unsubscribed (or closed) before the bus was ready.
            return session.channels.get(name, "") == user_id and app.channels.get(name) is channel

        def answer() -> None:
            if not still_subscribed():
                return
            if user_id is not None:
                drive(self._members(app, name), succeed)
            else:
                succeed(None)

        def succeed(cluster_members: dict[str, Any] | None) -> None:
            if not still_subscribed():
                return
            if user_id is not None:
                data = channel.presence_data(cluster_members)
                session.write(self._frame(msg.subscription_succeeded(name, data)))
            else:
                session.write(self._frame(msg.subscription_succeeded(name)))
            for frame in channel.waiting.pop(session.socket_id, ()):
                session.write(frame)
            if channel_type.cached:
                drive(self._cached(app, name), send_cache)

        def send_cache(found: Cached | None) -> None:
            if not still_subscribed():
                return
            if found is not None:
                session.write(self._frame(msg.channel_event(found.event, name, found.data)))
            else:
                # Nothing cached, or the cluster could not say: the app's back end
                # learns of the miss and may publish again.
                session.write(self._frame(msg.cache_miss(name)))
                self.emit(ev.CacheMiss(app.id, name))

        # Success only once other nodes' events can reach this channel: with a bus,
        # after its SUBSCRIBE is confirmed; with one node, at once.
        self.bus.when_ready(app.id, name, answer)
        self._count_changed(app, channel)

    def _hmac_grant(
        self, app: AppState, session: Session, request: msg.Subscribe, channel_type: ChannelType
    ) -> tuple[str | None, Any]:
        """Authorize by the auth endpoint's HMAC; the presence member, if any."""
        name = request.channel
        if not request.auth:
            raise Refused(Reason.SUBSCRIBE_AUTH_MISSING, channel=name)
        user_id: str | None = None
        user_info: Any = None
        channel_data = request.channel_data
        if channel_type.kind is ChannelKind.PRESENCE and channel_data is None:
            if session.user_id is None:
                raise Refused(Reason.SUBSCRIBE_CHANNEL_DATA, channel=name)
            # Signed-in user joining without channel_data: pusher-js does this.
            user_id, user_info = session.user_id, session.user_info
        message = channel_auth_string(
            session.socket_id,
            name,
            channel_data if channel_type.kind is ChannelKind.PRESENCE else None,
        )
        if not verify_auth(request.auth, app.settings.key, self._active_secrets(app), message):
            raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, channel=name)
        if channel_type.kind is ChannelKind.PRESENCE and channel_data is not None:
            user_id, user_info = self._parse_channel_data(channel_data, name)
        return user_id, user_info

    def _token_grant(
        self,
        app: AppState,
        session: Session,
        request: msg.Subscribe,
        channel_type: ChannelType,
        now: float,
    ) -> tuple[str | None, Any] | None:
        """Authorize by a JWT grant; ``None`` when no token applies (HMAC decides).

        Two ways: the subscribe's ``auth`` is itself a token (a *ticket*), or it is
        empty and the connection's sign-in token grants the channel. Encrypted
        channels are left to HMAC: the client needs the auth endpoint's
        ``shared_secret`` for them anyway.
        """
        verifier = app.jwt
        kind = channel_type.kind
        if verifier is None or kind not in (ChannelKind.PRIVATE, ChannelKind.PRESENCE):
            return None
        name = request.channel
        auth = request.auth
        if auth and looks_like_jwt(auth):
            try:
                claims = verifier.verify(auth, self._wall_clock())
            except TokenError as error:
                detail = f"Channel token refused: {error.check}"
                raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, detail, channel=name) from None
            if not grants(claims.channels, name):
                detail = "Channel token does not grant this channel"
                raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, detail, channel=name)
            if claims.socket_id is not None and claims.socket_id != session.socket_id:
                detail = "Channel token is bound to another socket_id"
                raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, detail, channel=name)
            if not is_valid_presence_user_id(claims.sub):
                detail = "Channel token sub is not a valid presence user_id"
                raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, detail, channel=name)
            user_id, user_info = claims.sub, claims.user_info
        elif (
            not auth
            and session.user_id is not None
            and session.token_expires_at is not None
            and now < session.token_expires_at
            and grants(session.grants, name)
        ):
            user_id, user_info = session.user_id, session.user_info
        else:
            return None
        if kind is not ChannelKind.PRESENCE:
            return None, None
        if request.channel_data is not None:
            # Not signed by anyone here; tolerated only when it names the token's
            # user (a pusher-js app may send it so the client knows "me").
            stated, _ = self._parse_channel_data(request.channel_data, name)
            if stated != user_id:
                detail = "Token sub does not match channel_data.user_id"
                raise Refused(Reason.SUBSCRIBE_AUTH_INVALID, detail, channel=name)
        return user_id, user_info

    @staticmethod
    def _parse_channel_data(channel_data: str, channel: str) -> tuple[str, Any]:
        try:
            data = msg.loads(channel_data)
        except Refused:
            raise Refused(Reason.SUBSCRIBE_CHANNEL_DATA, channel=channel) from None
        if not isinstance(data, dict):
            raise Refused(Reason.SUBSCRIBE_CHANNEL_DATA, channel=channel)
        raw = data.get("user_id")
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise Refused(Reason.SUBSCRIBE_CHANNEL_DATA, channel=channel)
        user_id = str(raw)
        if not is_valid_presence_user_id(user_id):
            raise Refused(Reason.SUBSCRIBE_CHANNEL_DATA, channel=channel)
        return user_id, data.get("user_info")

    def unsubscribe(self, app: AppState, session: Session, name: str) -> bool:
        """Leave a channel; ``False`` when the session was not subscribed (a no-op)."""
        if name not in session.channels:
            return False
        user_id = session.channels.pop(name)
        channel = app.channels.get(name)
        if channel is None:
            return False
        channel.subscribers.pop(session.socket_id, None)
        channel.waiting.pop(session.socket_id, None)
        if user_id is not None:
            member = channel.members.get(user_id)
            if member is not None:
                member.sockets.discard(session.socket_id)
                if not member.sockets:
                    del channel.members[user_id]
                    self.state.member_off(app.id, name, user_id)
        if not channel.subscribers:
            del app.channels[name]
            self.bus.interest_off(app.id, name)
            self.state.channel_off(app.id, name)
        else:
            self._count_changed(app, channel)
        return True

    def _count_changed(self, app: AppState, channel: Channel) -> None:
        """Tell the cluster state this node's new count (it announces the total)."""
        self.state.count(
            app.id,
            channel.name,
            len(channel.subscribers),
            announce=app.settings.enable_subscription_count,
        )

    def tick(self) -> None:
        """Periodic housekeeping (called on the node's heartbeat)."""
        self.state.tick()

    # --- client events ---------------------------------------------------------------

    def client_event(self, app: AppState, session: Session, event: msg.ClientEvent) -> None:
        """Relay a client event to the channel's other subscribers."""
        settings = app.settings
        if not settings.enable_client_messages:
            raise Refused(Reason.CLIENT_EVENTS_DISABLED)
        if not is_client_event_name(event.event, settings.max_event_name_length):
            raise Refused(Reason.CLIENT_EVENT_NAME)
        channel_type = classify_channel(event.channel)
        if channel_type.kind is ChannelKind.ENCRYPTED:
            raise Refused(Reason.CLIENT_EVENT_ENCRYPTED)
        if not channel_type.allows_client_events:
            raise Refused(Reason.CLIENT_EVENT_CHANNEL)
        channel = app.channels.get(event.channel)
        if event.channel not in session.channels or channel is None:
            raise Refused(Reason.CLIENT_EVENT_NOT_SUBSCRIBED)
        now = self._clock()
        if session.bucket is None:
            rate = settings.max_client_events_per_second
            session.bucket = TokenBucket(rate=rate, burst=rate, now=now)
        if session.bucket.take(now) > 0:
            raise Refused(Reason.CLIENT_EVENT_RATE)
        app_rate = settings.client_events_per_app
        if app_rate is not None:
            if app.client_event_bucket is None:
                app.client_event_bucket = self.limiters(
                    "client_events_app", app_rate.rate, app_rate.burst, 1, self._clock
                )
            if app.client_event_bucket.take(app.id, now) > 0:
                raise Refused(Reason.CLIENT_EVENT_APP_RATE)
        if msg.utf8_size(event.data) > settings.max_event_payload_bytes:
            raise Refused(Reason.CLIENT_EVENT_TOO_LARGE)
        policy = app.client_events
        if policy.active:
            if not policy.allows(event.event):
                raise Refused(Reason.CLIENT_EVENT_NOT_ALLOWED)
            detail = policy.check_data(event.event, event.data)
            if detail is not None:
                raise Refused(Reason.CLIENT_EVENT_SCHEMA, detail)
        user_id = session.channels[event.channel]
        text = msg.channel_event(event.event, event.channel, event.data, user_id)
        self._fan_out(channel, text, session.socket_id)
        # Other nodes' subscribers too; the sender is excluded there by socket id.
        self.bus.publish(
            app.id, event.channel, event.event, event.data, session.socket_id, user_id, client=True
        )
        if self.listeners:
            self.emit(
                ev.ClientEventSent(
                    app.id, event.channel, event.event, event.data, session.socket_id, user_id
                )
            )

    # --- sign-in and watchlists ------------------------------------------------------

    def signin(self, app: AppState, session: Session, request: msg.Signin) -> None:
        """Sign the connection in as the user in ``user_data``.

        The ``auth`` is the auth endpoint's HMAC, or, for an app in JWT mode, a
        token whose ``sub`` must be ``user_data.id``. With a token, nothing else in
        ``user_data`` is trusted (a token does not sign it): ``user_info`` and the
        watchlist come from the token's claims.
        """
        verifier = app.jwt
        claims: Claims | None = None
        if verifier is not None and looks_like_jwt(request.auth):
            claims = self._verify_signin_token(verifier, session, request.auth)
        else:
            message = signin_auth_string(session.socket_id, request.user_data)
            if not verify_auth(request.auth, app.settings.key, self._active_secrets(app), message):
                raise Refused(Reason.SIGNIN_INVALID)
        try:
            user = msg.loads(request.user_data)
        except Refused:
            raise Refused(Reason.SIGNIN_DATA_INVALID) from None
        user_id = user.get("id") if isinstance(user, dict) else None
        if not isinstance(user_id, str) or not is_valid_user_id(user_id):
            raise Refused(Reason.SIGNIN_DATA_INVALID)
        if claims is not None and claims.sub != user_id:
            raise Refused(Reason.SIGNIN_TOKEN_INVALID, "sub does not match user_data.id")
        if session.user_id is not None and session.user_id != user_id:
            raise Refused(Reason.SIGNIN_CONFLICT)
        raw_watchlist: Any
        if claims is not None:
            raw_watchlist, user_info = list(claims.watchlist), claims.user_info
        else:
            raw_watchlist, user_info = user.get("watchlist") or [], user.get("user_info")
        if not isinstance(raw_watchlist, list) or not all(
            isinstance(item, str) and is_valid_user_id(item) for item in raw_watchlist
        ):
            raise Refused(Reason.SIGNIN_DATA_INVALID)
        self._signed_in(app, session, user_id, user_info, raw_watchlist, request.user_data, claims)

    def signin_token(self, app: AppState, session: Session, token: str) -> None:
        """Sign the connection in with a bare token (the URL's ``?token=``).

        ``user_data`` is made from the claims (``id`` = ``sub``, ``user_info``) and
        echoed in ``pusher:signin_success`` as for a ``pusher:signin``.
        """
        verifier = app.jwt
        if verifier is None:
            raise Refused(Reason.SIGNIN_TOKEN_INVALID, "App does not accept tokens")
        claims = self._verify_signin_token(verifier, session, token)
        if not is_valid_user_id(claims.sub):
            raise Refused(Reason.SIGNIN_TOKEN_INVALID, "sub is not a valid user id")
        if session.user_id is not None and session.user_id != claims.sub:
            raise Refused(Reason.SIGNIN_CONFLICT)
        user: dict[str, Any] = {"id": claims.sub}
        if claims.user_info is not None:
            user["user_info"] = claims.user_info
        watchlist = list(claims.watchlist)
        if not all(is_valid_user_id(item) for item in watchlist):
            raise Refused(Reason.SIGNIN_DATA_INVALID)
        self._signed_in(
            app, session, claims.sub, claims.user_info, watchlist, msg.dumps(user), claims
        )

    def _verify_signin_token(self, verifier: JwtVerifier, session: Session, token: str) -> Claims:
        try:
            claims = verifier.verify(token, self._wall_clock())
        except TokenError as error:
            # The detail names the check, never the token.
            raise Refused(
                Reason.SIGNIN_TOKEN_INVALID, f"Sign-in token refused: {error.check}"
            ) from None
        if claims.socket_id is not None and claims.socket_id != session.socket_id:
            raise Refused(
                Reason.SIGNIN_TOKEN_INVALID, "Sign-in token is bound to another socket_id"
            )
        return claims

    def _signed_in(
        self,
        app: AppState,
        session: Session,
        user_id: str,
        user_info: Any,
        watchlist: list[str],
        user_data: str,
        claims: Claims | None,
    ) -> None:
        first_time = session.user_id is None
        if first_time:
            app.unsigned -= 1
        session.user_id = user_id
        session.user_info = user_info
        # A fresh sign-in replaces the previous one's token, expiry and grants (an
        # HMAC sign-in has none of them).
        session.token_warned = False
        if claims is None:
            session.token_expires_at = None
            session.grants = ()
        else:
            # exp is wall-clock; the session deadline is on the hub's monotonic clock.
            session.token_expires_at = self._clock() + (claims.exp - self._wall_clock())
            session.grants = claims.channels
        sockets = app.users.setdefault(user_id, {})
        came_online = not sockets
        sockets[session.socket_id] = session
        session.write(self._frame(msg.signin_success(user_data)))
        if came_online:
            self.state.user_on(app.id, user_id)
        if first_time and watchlist:
            self._watch(app, session, watchlist)

    def check_session(self, app: AppState, session: Session, now: float) -> None:
        """Enforce the sign-in deadline and the sign-in token's expiry (called each tick).

        ``now`` is the hub clock. Sends ``bastion:token_expiring`` once per token when
        it is within ``expiry_warning_seconds`` of ``exp``; refuses the connection
        (``TOKEN_EXPIRED``) once ``exp + expiry_grace_seconds`` has passed, and
        (``SIGNIN_DEADLINE``) when it has not signed in ``signin_deadline_seconds``
        after it opened.
        """
        if session.user_id is None:
            deadline = app.settings.signin_deadline_seconds
            if deadline is not None:
                if session.opened_at is None:
                    session.opened_at = now
                elif now - session.opened_at >= deadline:
                    session.refuse(Refused(Reason.SIGNIN_DEADLINE))
            return
        expires_at = session.token_expires_at
        jwt_settings = app.settings.jwt
        if expires_at is None or jwt_settings is None:
            return
        remaining = expires_at - now
        if remaining <= -jwt_settings.expiry_grace_seconds:
            session.refuse(Refused(Reason.TOKEN_EXPIRED))
        elif remaining <= jwt_settings.expiry_warning_seconds and not session.token_warned:
            session.token_warned = True
            session.write(self._frame(msg.token_expiring(max(0, math.ceil(remaining)))))

    def _watch(self, app: AppState, session: Session, watchlist: list[str]) -> None:
        limit = app.settings.max_watchlist_size
        accepted = tuple(dict.fromkeys(watchlist))[:limit]
        session.watchlist = accepted
        for watched in accepted:
            app.watchers.setdefault(watched, set()).add(session)

        def report(cluster_online: set[str] | None) -> None:
            pending, session.watch_pending = session.watch_pending, None
            if session.watchlist is not accepted:
                return  # closed meanwhile
            found = cluster_online or set()
            online = [user_id for user_id in accepted if user_id in app.users or user_id in found]
            offline = [user_id for user_id in accepted if user_id not in online]
            groups = [
                (name, ids) for name, ids in (("online", online), ("offline", offline)) if ids
            ]
            if groups:
                session.write(self._frame(msg.watchlist_events(groups)))
            for frame in pending or ():  # changes since the read, in order, after it
                session.write(frame)

        if accepted:
            # Online/offline changes that arrive before the report is written wait.
            session.watch_pending = []
            drive(self._online(app, list(accepted)), report)
        else:
            report(None)
        if len(dict.fromkeys(watchlist)) > limit:
            session.refuse(Refused(Reason.WATCHLIST_TOO_LONG))

    def _notify_watchers(self, app: AppState, user_id: str, status: str) -> None:
        watchers = app.watchers.get(user_id)
        if not watchers:
            return
        frame = self._frame(msg.watchlist_events([(status, [user_id])]))
        for session in watchers:
            if session.watch_pending is not None:
                session.watch_pending.append(frame)
            else:
                session.write(frame)
        self.deliveries += len(watchers)

    # --- server-side operations (REST) -----------------------------------------------

    def publish(
        self,
        app: AppState,
        channels: Iterable[str],
        event: str,
        data: str,
        exclude_socket_id: str | None = None,
    ) -> None:
        """Deliver an event to every local subscriber of each channel, then to the bus."""
        for name in channels:
            self._deliver_local(app, name, event, data, exclude_socket_id, None)
            self.bus.publish(app.id, name, event, data, exclude_socket_id)
            if classify_channel(name).cached:
                self.state.cache(app.id, name, event, data, app.settings.cache_ttl)

    def receive(self, message: cm.Message) -> None:
        """Deliver what the cluster decided or another node sent, to local connections only.

        The same frames as when this node decides or publishes; nothing is handed
        back to the bus, so nothing loops. An unknown app (another node's
        configuration differs) is ignored, and so is a server event whose data is
        not a string.
        """
        app = self.apps_by_id.get(message.app_id)
        if app is None:
            return
        match message:
            case cm.ChannelEvent():
                if message.client or isinstance(message.data, str):
                    self._deliver_local(
                        app,
                        message.channel,
                        message.event,
                        message.data,
                        message.exclude_socket_id,
                        message.user_id,
                    )
            case cm.MemberAdded():
                text = msg.member_added(message.channel, message.user_id, message.user_info)
                self._control(app, message.channel, text, message.exclude_socket_id)
            case cm.MemberRemoved():
                text = msg.member_removed(message.channel, message.user_id)
                self._control(app, message.channel, text, None)
            case cm.SubscriptionCount():
                if app.settings.enable_subscription_count:
                    text = msg.subscription_count(message.channel, message.count)
                    self._control(app, message.channel, text, None)
            case cm.UserOnline():
                self._notify_watchers(app, message.user_id, "online")
            case cm.UserOffline():
                self._notify_watchers(app, message.user_id, "offline")
            case cm.Terminate():
                self._terminate_local(app, message.user_id)

    def _deliver_local(
        self,
        app: AppState,
        name: str,
        event: str,
        data: Any,
        exclude_socket_id: str | None,
        user_id: str | None,
    ) -> None:
        if name.startswith(SERVER_TO_USER_PREFIX):
            sockets = app.users.get(name[len(SERVER_TO_USER_PREFIX) :])
            if sockets:
                frame = self._frame(msg.channel_event(event, name, data))
                for socket_id, session in sockets.items():
                    if socket_id != exclude_socket_id:
                        session.write(frame)
                        self.deliveries += 1
            return
        channel = app.channels.get(name)
        if channel is not None:
            text = msg.channel_event(event, name, data, user_id)
            self._fan_out(channel, text, exclude_socket_id)

    def _control(self, app: AppState, name: str, text: str, exclude: str | None) -> None:
        """A member event or a count to the channel's subscribers here.

        A subscriber not answered yet gets it after its ``subscription_succeeded``.
        """
        channel = app.channels.get(name)
        if channel is None:
            return
        frame = self._frame(text)
        for socket_id, session in channel.subscribers.items():
            if socket_id == exclude:
                continue
            waiting = channel.waiting.get(socket_id)
            if waiting is not None:
                waiting.append(frame)
            else:
                session.write(frame)
                self.deliveries += 1

    def terminate_user(self, app: AppState, user_id: str) -> int:
        """Close every connection signed in as ``user_id``, on every node.

        Returns how many were closed on this node.
        """
        self.bus.broadcast(cm.Terminate(app.id, user_id))
        return self._terminate_local(app, user_id)

    @staticmethod
    def _terminate_local(app: AppState, user_id: str) -> int:
        sessions = list(app.users.get(user_id, {}).values())
        for session in sessions:
            session.refuse(Refused(Reason.TERMINATED))
        return len(sessions)

    # --- cluster reads (answered in the same call on one node) ---------------------------

    async def _members(self, app: AppState, name: str) -> dict[str, Any] | None:
        """The cluster's members of ``name``; ``None`` (this node's only) when it cannot say."""
        try:
            return await self.state.members(app.id, name)
        except ClusterUnavailable:
            return None

    async def _cached(self, app: AppState, name: str) -> Cached | None:
        """A cache channel's last event; ``None`` (a miss) when the cluster cannot say."""
        try:
            return await self.state.cached(app.id, name)
        except ClusterUnavailable:
            return None

    async def _online(self, app: AppState, user_ids: list[str]) -> set[str] | None:
        """Those of ``user_ids`` signed in anywhere; ``None`` when the cluster cannot say."""
        try:
            return await self.state.online(app.id, user_ids)
        except ClusterUnavailable:
            return None

    # --- internals ---------------------------------------------------------------------

    def _active_secrets(self, app: AppState) -> tuple[bytes, ...]:
        return app.secret_set.active(self._wall_clock())

    def _fan_out(self, channel: Channel, text: str, exclude_socket_id: str | None) -> None:
        """Frame ``text`` once and write the same bytes to every subscriber."""
        frame = self._frame(text)
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

    def emit(self, event: ev.HubEvent) -> None:
        """Hand a hub event to every listener (webhooks, metrics); never blocks."""
        for listener in self.listeners:
            listener(event)

    def validate_event_name(self, app: AppState, name: str) -> bool:
        """REST event names: length rules, and never a reserved prefix."""
        return is_valid_event_name(name, app.settings.max_event_name_length) and not (
            name.startswith(("pusher:", "pusher_internal:"))
        )
