"""The hub: a node's apps and connections, and the one door to channels, users and fan-out.

It knows nothing of sockets, HTTP or files. The server gives it a
:class:`~bastion.core.state.Session` per connection (with a ``write`` that takes
pre-framed bytes and never blocks, and a ``refuse`` that runs the one refusal
path), a ``frame`` function, the apps' runtime states (JWT key files are read by
the caller) and the node's cluster seam (:mod:`bastion.adapters.base`). The work
is done by one module per concept:

* :mod:`bastion.core.channels` — subscribe (authorization is the pure policy of
  :mod:`bastion.security.channel_auth`), unsubscribe, presence, counts, cache;
* :mod:`bastion.core.users` — sign-in (:mod:`bastion.security.signin`), the
  session's life cycle (:mod:`bastion.core.session`), watchlists, terminations;
* :mod:`bastion.core.fanout` — publishes, client events (after the gate of
  :mod:`bastion.security.client_event_gate`), delivery of what other nodes send.

The hub tells the cluster state its transitions and receives the decisions back
through :meth:`Hub.receive` (control messages, exactly as other nodes' messages
arrive over the bus) and :meth:`Hub.emit` (hub events for the webhooks).

Input errors are raised as :class:`~bastion.errors.Refused`; effects on other
connections (terminate, notices) go through their ``refuse``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from bastion.adapters import messages as cm
from bastion.adapters.base import Cluster
from bastion.config import EventLimit, Settings
from bastion.core import events as ev
from bastion.core.channels import Channels
from bastion.core.fanout import FanOut, Frame
from bastion.core.state import AppState, Channel, Session
from bastion.core.users import Users
from bastion.protocol import messages as msg
from bastion.protocol.names import is_valid_event_name
from bastion.protocol.refusals import Reason
from bastion.security.client_event_gate import check_client_event
from bastion.security.limits import DEFAULT_MAX_KEYS, LimiterFactory, memory_limiters
from bastion.security.ratelimit import settle_folded, take_folded

__all__ = ["AppState", "Channel", "Hub", "Session"]


class Hub:
    """Routes subscribes, client events and publishes for every app of a node.

    Args:
        settings: the loaded configuration (``[server]`` caps).
        frame: turns a text message into WebSocket frame bytes (server-side, unmasked).
        clock: monotonic seconds (rate limits, token deadlines).
        cluster: the node's bus and cluster state (the hub attaches itself to both).
        apps: the apps' runtime states.
        wall_clock: Unix seconds (token expiry, retiring secrets).
        limiters: builds the app-wide limiters (cluster-wide ones with Redis).
    """

    def __init__(
        self,
        settings: Settings,
        frame: Frame,
        clock: Callable[[], float],
        cluster: Cluster,
        apps: Iterable[AppState],
        *,
        wall_clock: Callable[[], float] = time.time,
        limiters: LimiterFactory | None = None,
    ) -> None:
        self._clock = clock
        self.limiters: LimiterFactory = limiters or memory_limiters
        self.bus = cluster.bus
        self.state = cluster.state
        self.apps_by_key: dict[str, AppState] = {}
        self.apps_by_id: dict[str, AppState] = {}
        for app in apps:
            self.apps_by_key[app.settings.key] = app
            self.apps_by_id[app.id] = app
        self.listeners: list[Callable[[ev.HubEvent], None]] = []
        #: Called with each security notice (the audit log); must not block.
        self.notices: list[Callable[[ev.Notice], None]] = []
        self.history = cluster.history
        self.fanout = FanOut(frame, self.bus, self.state, self.history)
        self.channels = Channels(
            self.fanout,
            self.bus,
            self.state,
            self.emit,
            clock,
            wall_clock,
            settings.server.max_channels,
        )
        self.users = Users(self.fanout, self.state, clock, wall_clock, self.notify)
        self.connections = 0
        self.max_connections = settings.server.max_connections
        self.bus.attach(self.receive)
        self.state.attach(self.receive, self.emit)
        self.history.attach(self.deliver)

    @property
    def deliveries(self) -> int:
        """Frames written to sessions so far."""
        return self.fanout.deliveries

    # --- connections -------------------------------------------------------------------

    def admit(self, app: AppState) -> Reason | None:
        """Whether a new connection to ``app`` may open; counts it when it may."""
        if not app.settings.enabled:
            return Reason.APP_DISABLED
        if self.max_connections is not None and self.connections >= self.max_connections:
            return Reason.OVER_CAPACITY
        limit = app.settings.max_connections
        if limit is not None and app.connections >= limit:
            return Reason.APP_OVER_QUOTA
        unsigned = app.settings.unsigned_cap
        if unsigned is not None and app.unsigned >= unsigned:
            return Reason.UNSIGNED_OVER_QUOTA
        app.connections += 1
        app.unsigned += 1  # every connection opens unsigned
        self.connections += 1
        return None

    def disconnect(self, app: AppState, session: Session) -> None:
        """Forget a closed connection: leave its channels, sign it out, uncount it."""
        for channel in list(session.channels):
            self.channels.unsubscribe(app, session, channel)
        self.users.signed_out(app, session)
        app.connections -= 1
        self.connections -= 1

    # --- what a client sends -------------------------------------------------------------

    def subscribe(self, app: AppState, session: Session, request: msg.Subscribe) -> None:
        """Join a channel, answering success (or raising a channel-level refusal)."""
        self.channels.subscribe(app, session, request)

    def unsubscribe(self, app: AppState, session: Session, name: str) -> bool:
        """Leave a channel; ``False`` when the session was not subscribed (a no-op)."""
        return self.channels.unsubscribe(app, session, name)

    def client_event(self, app: AppState, session: Session, event: msg.ClientEvent) -> None:
        """Relay a client event to the channel's other subscribers, on every node."""
        settings = app.settings
        channel = app.channels.get(event.channel)
        now = self._clock()
        app_rate = settings.client_events_per_app
        if app_rate is not None and app.client_event_bucket is None:
            app.client_event_bucket = self.limiters(
                "client_events_app", app_rate.rate, app_rate.burst, 1, self._clock
            )
        rate = app.tiers[session.tier].client_events_per_second

        def take_token() -> bool:
            # The connection's bucket (burst = rate), one float on the session.
            full_at = take_folded(session.events_full_at, now, rate, rate)
            if full_at is None:
                return False
            session.events_full_at = full_at
            return True

        rule = app.event_limits.match(event.event) if app.event_limits.active else None

        # Encoded once: its size is what the limit measures, its bytes what is relayed.
        data = msg.encoded_data(event.data)
        check_client_event(
            event,
            settings,
            subscribed=channel is not None and event.channel in session.channels,
            data_size=len(data),
            take_token=take_token,
            app_bucket=app.client_event_bucket if app_rate is not None else None,
            policy=app.client_events,
            now=now,
            # A closure only for a name with a rule: none on the common path.
            take_type_token=(
                (lambda: self._take_type_token(app, session, rule, now))
                if rule is not None
                else None
            ),
        )
        assert channel is not None  # the gate refuses an event on a channel not joined here
        self.fanout.relay(app, channel, session, event, data)
        if self.listeners:
            user_id = session.channels[event.channel]
            self.emit(
                ev.ClientEventSent(
                    app.id, event.channel, event.event, event.data, session.socket_id, user_id
                )
            )

    def _take_type_token(
        self, app: AppState, session: Session, rule: tuple[str, EventLimit], now: float
    ) -> bool:
        """A token of the event name's bucket on the connection, then the user's.

        The user's is cluster-wide (the limiter factory); the connection's token is
        kept only when both had one.
        """
        name, limit = rule
        buckets = session.event_buckets
        if buckets is None:
            buckets = session.event_buckets = {}
        held = buckets.get(name, 0.0)
        full_at = take_folded(held, now, limit.rate, limit.burst)
        if full_at is None:
            # At worst empty at the current settings (a reload may have raised them).
            buckets[name] = settle_folded(held, now, limit.rate, limit.burst)
            return False
        user_id = session.user_id
        if limit.per_user and user_id is not None:
            bucket = app.user_event_buckets.get(name)
            if bucket is None:
                bucket = app.user_event_buckets[name] = self.limiters(
                    "client_event_user", limit.rate, limit.burst, DEFAULT_MAX_KEYS, self._clock
                )
            if bucket.take(f"{app.id}\n{name}\n{user_id}", now) > 0:
                return False
        buckets[name] = full_at
        return True

    def signin(self, app: AppState, session: Session, request: msg.Signin) -> None:
        """Sign the connection in (HMAC or token)."""
        self.users.signin(app, session, request)

    def signin_token(self, app: AppState, session: Session, token: str) -> None:
        """Sign the connection in with a bare token (the URL's ``?token=``)."""
        self.users.signin_token(app, session, token)

    def check_session(self, app: AppState, session: Session, now: float) -> None:
        """Apply the session's deadlines (called each heartbeat tick)."""
        self.users.check_session(app, session, now)

    # --- the server side -----------------------------------------------------------------

    def publish(
        self,
        app: AppState,
        channels: Iterable[str],
        event: str,
        data: str,
        exclude_socket_id: str | None = None,
    ) -> None:
        """Deliver an event to every local subscriber of each channel, then to the bus."""
        self.fanout.publish(app, channels, event, data, exclude_socket_id)

    def deliver(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: str,
        exclude_socket_id: str | None,
        position: str | None,
    ) -> None:
        """A server event the history hands over, to local subscribers only."""
        app = self.apps_by_id.get(app_id)
        if app is not None:
            self.fanout.deliver(app, channel, event, data, exclude_socket_id, None, position)

    def terminate_user(self, app: AppState, user_id: str) -> int:
        """Close every connection signed in as ``user_id``, on every node.

        Returns how many were closed on this node.
        """
        self.bus.broadcast(cm.Terminate(app.id, user_id))
        return self.users.terminate_local(app, user_id)

    def suspend_user(self, app: AppState, user_id: str, cooldown: float) -> int:
        """Sign ``user_id`` out everywhere and refuse its sign-ins for ``cooldown`` seconds.

        The user spent its ``user_error_budget``; reported once (a notice for the
        audit log) by this node. Returns how many connections were closed here.
        """
        self.bus.broadcast(cm.Suspend(app.id, user_id, max(1, round(cooldown * 1000))))
        closed = self.users.suspend_local(app, user_id, cooldown)
        self.notify(ev.UserSuspended(app.id, user_id, cooldown, closed))
        return closed

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
                    self.fanout.deliver(
                        app,
                        message.channel,
                        message.event,
                        message.data,
                        message.exclude_socket_id,
                        message.user_id,
                        message.position,
                    )
            case cm.MemberAdded():
                text = msg.member_added(message.channel, message.user_id, message.user_info)
                self.channels.control(app, message.channel, text, message.exclude_socket_id)
            case cm.MemberRemoved():
                text = msg.member_removed(message.channel, message.user_id)
                self.channels.control(app, message.channel, text, None)
            case cm.SubscriptionCount():
                if app.settings.enable_subscription_count:
                    text = msg.subscription_count(message.channel, message.count)
                    self.channels.control(app, message.channel, text, None)
            case cm.UserOnline():
                self.users.notify_watchers(app, message.user_id, "online")
            case cm.UserOffline():
                self.users.notify_watchers(app, message.user_id, "offline")
            case cm.Terminate():
                self.users.terminate_local(app, message.user_id)
            case cm.Replaced():
                self.users.replace_local(app, message.user_id, message.socket_ids)
            case cm.Suspend():
                self.users.suspend_local(app, message.user_id, message.cooldown_ms / 1000)

    def notify(self, notice: ev.Notice) -> None:
        """Hand a security notice to every notice listener (the audit log)."""
        for listener in self.notices:
            listener(notice)

    def emit(self, event: ev.HubEvent) -> None:
        """Hand a hub event to every listener (webhooks, metrics); never blocks."""
        for listener in self.listeners:
            listener(event)

    def tick(self) -> None:
        """Periodic housekeeping (called on the node's heartbeat)."""
        self.state.tick()
        self.history.tick()

    # --- configuration -------------------------------------------------------------------

    def apply_settings(self, settings: Settings, apps: dict[str, AppState]) -> list[AppState]:
        """A live reload: take the new ``[server]`` caps and apps; return the removed apps.

        ``apps`` maps the id of every added or changed app to a state built from its
        new settings (its JWT key files already read). A changed app keeps its
        runtime state (channels, members, users, counts) and applies the new
        settings; an added one is served at once; a removed one is no longer found
        by id or key (its open connections are the caller's to close).
        """
        wanted = {app.id for app in settings.apps}
        removed = [app for app_id, app in self.apps_by_id.items() if app_id not in wanted]
        # Removals first: a remaining app may take over a removed app's key.
        for gone in removed:
            del self.apps_by_id[gone.id]
            self._unmap_key(gone.settings.key, gone)
        for app_id, template in apps.items():
            state = self.apps_by_id.get(app_id)
            if state is None:  # added
                self.apps_by_id[app_id] = template
                self.apps_by_key[template.settings.key] = template
                continue
            if state.settings.key != template.settings.key:
                self._unmap_key(state.settings.key, state)
                self.apps_by_key[template.settings.key] = state
            if _stops_recording(state, template):
                # Events the new settings do not record would be holes in old positions.
                self.history.restart(app_id)
            state.apply(template.settings, template.jwt)
        self.max_connections = settings.server.max_connections
        self.channels.max_channels = settings.server.max_channels
        return removed

    def _unmap_key(self, key: str, state: AppState) -> None:
        """Forget ``key`` unless another app took it over in this same reload."""
        if self.apps_by_key.get(key) is state:
            del self.apps_by_key[key]

    @staticmethod
    def validate_event_name(app: AppState, name: str) -> bool:
        """REST event names: length rules, and never a reserved prefix."""
        return is_valid_event_name(name, app.settings.max_event_name_length) and not (
            name.startswith(("pusher:", "pusher_internal:"))
        )


def _stops_recording(current: AppState, new: AppState) -> bool:
    """Whether ``new`` settings record fewer channels than ``current`` (history restarts)."""
    before, after = current.history, new.history
    if before is None:
        return False
    return after is None or not set(before.prefixes) <= set(after.prefixes)
