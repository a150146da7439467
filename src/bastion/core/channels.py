"""Channels: subscribe (with authorization), unsubscribe, presence, counts, cache answers.

A subscribe is answered only once other nodes' events on the channel can reach
this node (:meth:`~bastion.adapters.base.Bus.when_ready`: at once on one node). A
presence subscribe is answered with the cluster's member list; member and count
frames that reach the new subscriber before its answer wait and follow it, so a
browser never misses a join, a leave or a count. A cache channel's subscriber
then gets the last event, or ``pusher:cache_miss`` (and the app its webhook).

The transitions go to the cluster state (first and last local subscriber, the
node's count, a user's first and last local socket in a presence channel), which
decides occupied/vacated, member events and counts for the cluster and hands them
back to :meth:`Channels.control` (frames) and the hub's listeners (webhooks).

A subscribe that carries ``bastion_resume`` is answered, once it succeeded, with
what the client missed (:mod:`bastion.core.recovery`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bastion.adapters.base import Bus, Cached, ClusterState, ClusterUnavailable
from bastion.core import events as ev
from bastion.core.fanout import FanOut
from bastion.core.history import Unrecovered
from bastion.core.recovery import Recoveries, wants_hold
from bastion.core.state import AppState, Channel, Member, Session
from bastion.eager import drive
from bastion.errors import Refused
from bastion.protocol import messages as msg
from bastion.protocol.names import (
    SERVER_TO_USER_PREFIX,
    ChannelKind,
    classify_channel,
    is_valid_channel_name,
)
from bastion.protocol.refusals import Reason
from bastion.security.channel_auth import SignedInUser, authorize_subscribe
from bastion.security.ratelimit import settle_folded, take_folded

__all__ = ["Channels"]

#: Channel names echoed back in a subscription error are at most this long.
_ECHO_LIMIT = 200


class Channels:
    """Subscriptions of the node's sessions.

    Args:
        fanout: the node's fan-out.
        bus: the node's bus.
        state: the node's cluster state.
        emit: hands a hub event to the listeners.
        clock: monotonic seconds (subscribe buckets, token validity).
        wall_clock: Unix seconds (token expiry).
        max_channels: channels with a subscriber on this node, all apps (``None``: no cap).
    """

    def __init__(
        self,
        fanout: FanOut,
        bus: Bus,
        state: ClusterState,
        emit: Callable[[ev.HubEvent], None],
        clock: Callable[[], float],
        wall_clock: Callable[[], float] = time.time,
        max_channels: int | None = None,
    ) -> None:
        #: Channels with a subscriber on this node, all apps together.
        self.count = 0
        #: ``[server] max_channels`` (a live reload updates it).
        self.max_channels = max_channels
        self._fanout = fanout
        self._bus = bus
        self._state = state
        self._emit = emit
        self._clock = clock
        self._wall_clock = wall_clock
        self._recoveries = Recoveries(fanout)

    def subscribe(self, app: AppState, session: Session, request: msg.Subscribe) -> None:
        """Join a channel, answering success (or raising a channel-level refusal)."""
        name = request.channel
        echo = name if len(name) <= _ECHO_LIMIT and name.isprintable() else None
        # First, before any work: bounds channel enumeration and auth-endpoint amplification.
        now = self._clock()
        limits = app.tiers[session.tier]
        rate, burst = limits.subscribe_rate, limits.subscribe_burst
        full_at = take_folded(session.subscribes_full_at, now, rate, burst)
        if full_at is None:
            session.subscribes_full_at = settle_folded(session.subscribes_full_at, now, rate, burst)
            raise Refused(Reason.SUBSCRIBE_RATE, channel=echo)
        session.subscribes_full_at = full_at
        if not is_valid_channel_name(name, app.settings.max_channel_name_length):
            raise Refused(Reason.SUBSCRIBE_INVALID_CHANNEL, channel=echo)
        channel_type = classify_channel(name)
        if channel_type.kind is ChannelKind.SERVER_TO_USER:
            if session.user_id is None or name != SERVER_TO_USER_PREFIX + session.user_id:
                raise Refused(Reason.SUBSCRIBE_NOT_SIGNED_IN, channel=name)
            # Deliveries go by the user index, not channel membership.
            session.write(self._fanout.frame(msg.subscription_succeeded(name)))
            if request.resume is not None:
                self._unrecovered(session, name, Unrecovered.HISTORY_OFF)
            return
        existing = app.channels.get(name)
        if name in session.channels and existing is not None:
            self._again(app, session, existing)
            if request.resume is not None:
                self._unrecovered(session, name, Unrecovered.ALREADY_SUBSCRIBED)
            return
        self._check_capacity(app, session, name, existing)
        user_id: str | None = None
        user_info: Any = None
        if channel_type.needs_auth:
            grant = authorize_subscribe(
                request,
                channel_type,
                socket_id=session.socket_id,
                signed_in=self._signed_in(session, now),
                app_key=app.settings.key,
                secrets=app.secrets,
                verifier=app.jwt,
                now=self._wall_clock(),
            )
            user_id, user_info = grant.user_id, grant.user_info
            if user_id is not None:
                size = msg.utf8_size(user_info)
                if size > limits.max_presence_member_bytes:
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
            self.count += 1
            self._bus.interest_on(app.id, name)
            self._state.channel_on(app.id, name)
        channel.subscribers[session.socket_id] = session
        session.channels[name] = user_id
        # Member and count frames that reach this socket before its answer wait.
        channel.waiting[session.socket_id] = []
        if wants_hold(app, name, request.resume):
            # And recorded events, until its missed ones have been written.
            channel.held[session.socket_id] = []
        if user_id is not None:
            member = channel.members.get(user_id)
            if member is None:
                member = channel.members[user_id] = Member(user_info)
                # The cluster state decides whether the user is new to the cluster.
                self._state.member_on(app.id, name, user_id, user_info, session.socket_id)
            member.sockets.add(session.socket_id)
        self._answer_when_ready(app, session, channel, user_id, request)
        self._count_changed(app, channel)

    def _check_capacity(
        self, app: AppState, session: Session, name: str, existing: Channel | None
    ) -> None:
        """The channel caps: per connection, and for a new channel per app and per node.

        Checked before any authorization work: a flood of subscribes to fresh names
        costs a few comparisons each, and memory stays bounded (~5 KB a channel).
        """
        settings = app.settings
        if len(session.channels) >= app.tiers[session.tier].max_channels_per_connection:
            raise Refused(Reason.SUBSCRIBE_TOO_MANY_CHANNELS, channel=name)
        if existing is not None:
            return
        if settings.max_channels is not None and len(app.channels) >= settings.max_channels:
            raise Refused(Reason.SUBSCRIBE_APP_CHANNELS_FULL, channel=name)
        if self.max_channels is not None and self.count >= self.max_channels:
            raise Refused(Reason.SUBSCRIBE_NODE_CHANNELS_FULL, channel=name)

    @staticmethod
    def _signed_in(session: Session, now: float) -> SignedInUser | None:
        if session.user_id is None:
            return None
        expires = session.token_expires_at
        return SignedInUser(
            session.user_id,
            session.user_info,
            session.grants,
            token_valid=expires is not None and now < expires,
        )

    def _again(self, app: AppState, session: Session, channel: Channel) -> None:
        """A repeated subscribe: answered again, without duplicating anything."""
        name = channel.name
        if channel.type.kind is not ChannelKind.PRESENCE:
            session.write(self._fanout.frame(msg.subscription_succeeded(name)))
            return

        def again(found: dict[str, Any] | None) -> None:
            data = channel.presence_data(found)
            session.write(self._fanout.frame(msg.subscription_succeeded(name, data)))

        drive(self._members(app, name), again)

    def _unrecovered(self, session: Session, name: str, reason: str) -> None:
        text = msg.recovery(name, recovered=False, position=None, reason=reason)
        session.write(self._fanout.frame(text))

    def _answer_when_ready(
        self,
        app: AppState,
        session: Session,
        channel: Channel,
        user_id: str | None,
        request: msg.Subscribe,
    ) -> None:
        name = channel.name
        frame = self._fanout.frame

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
                session.write(frame(msg.subscription_succeeded(name, data)))
            else:
                session.write(frame(msg.subscription_succeeded(name)))
            for waited in channel.waiting.pop(session.socket_id, ()):
                session.write(waited)
            if channel.type.cached:
                drive(self._cached(app, name), send_cache)
            if request.resume is not None:
                self._recoveries.answer(app, session, channel, request.resume, still_subscribed)

        def send_cache(found: Cached | None) -> None:
            if not still_subscribed():
                return
            if found is not None:
                session.write(frame(msg.channel_event(found.event, name, found.data)))
            else:
                # Nothing cached, or the cluster could not say: the app's back end
                # learns of the miss and may publish again.
                session.write(frame(msg.cache_miss(name)))
                self._emit(ev.CacheMiss(app.id, name))

        self._bus.when_ready(app.id, name, answer)

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
        channel.held.pop(session.socket_id, None)
        if user_id is not None:
            member = channel.members.get(user_id)
            if member is not None:
                member.sockets.discard(session.socket_id)
                if not member.sockets:
                    del channel.members[user_id]
                    self._state.member_off(app.id, name, user_id)
        if not channel.subscribers:
            del app.channels[name]
            self.count -= 1
            self._bus.interest_off(app.id, name)
            self._state.channel_off(app.id, name)
        else:
            self._count_changed(app, channel)
        return True

    def _count_changed(self, app: AppState, channel: Channel) -> None:
        """Tell the cluster state this node's new count (it announces the total)."""
        self._state.count(
            app.id,
            channel.name,
            len(channel.subscribers),
            announce=app.settings.enable_subscription_count,
        )

    def control(self, app: AppState, name: str, text: bytes, exclude: str | None) -> None:
        """A member event or a count to the channel's subscribers here.

        A subscriber not answered yet gets it after its ``subscription_succeeded``.
        """
        channel = app.channels.get(name)
        if channel is None:
            return
        waiting = channel.waiting
        if not waiting:
            self._fanout.to_channel(channel, text, exclude)
            return
        frame = self._fanout.frame(text)
        ready = []
        for socket_id, session in channel.subscribers.items():
            if socket_id == exclude:
                continue
            held = waiting.get(socket_id)
            if held is not None:
                held.append(frame)
            else:
                ready.append(session)
        for session in ready:
            session.write(frame)
        self._fanout.deliveries += len(ready)

    # --- cluster reads (answered in the same call on one node) -------------------------

    async def _members(self, app: AppState, name: str) -> dict[str, Any] | None:
        """The cluster's members of ``name``; ``None`` (this node's only) when it cannot say."""
        try:
            return await self._state.members(app.id, name)
        except ClusterUnavailable:
            return None

    async def _cached(self, app: AppState, name: str) -> Cached | None:
        """A cache channel's last event; ``None`` (a miss) when the cluster cannot say."""
        try:
            return await self._state.cached(app.id, name)
        except ClusterUnavailable:
            return None
