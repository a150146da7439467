"""N nodes in one process sharing one bus and one state: the in-memory cluster.

:class:`MemoryCluster` is the cluster seam (:mod:`bastion.adapters.base`) without
a network. Each :meth:`MemoryCluster.join` gives a node its own :class:`MemoryBus`
and :class:`MemoryState` over the shared tables, with the same decisions the Redis
scripts take (a channel is occupied when its first holder joins and vacated when
its last one leaves; a member is added when its first node has it and removed when
its last one lets it go; a user is online while any node has it signed in; a
user's connections are counted one by one, oldest first, whichever node holds
them), taken at once, in the caller's stack. Decisions reach the deciding node's hub directly;
the other nodes' copies (and channel events) wait in the bus queue until
:meth:`MemoryCluster.pump`, so a test decides how deliveries interleave, much as
h11's ``ConnectionPair`` lets a test drive both ends of a connection.

A node alone in its cluster is the production ``local`` cluster
(:mod:`bastion.adapters.local`): nothing is ever queued, every read answers
without suspending, and the hub's answers go out in the same call.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from bastion.adapters.base import (
    Cached,
    ChannelState,
    Cluster,
    Deliver,
    Emit,
    Receive,
    ignore_delivery,
)
from bastion.adapters.messages import (
    ChannelEvent,
    MemberAdded,
    MemberRemoved,
    Message,
    Replaced,
    SubscriptionCount,
    Suspend,
    Terminate,
    UserOffline,
    UserOnline,
)
from bastion.adapters.replay import LocalReplayClaims
from bastion.core import events as ev
from bastion.core.history import AppHistory, HistoryLimits, Recovery
from bastion.protocol.counts import CountThrottle
from bastion.protocol.names import SERVER_TO_USER_PREFIX
from bastion.protocol.positions import Position

__all__ = ["MemoryBus", "MemoryCluster", "MemoryHistory", "MemoryState", "new_epoch"]

#: Messages the bus queue holds at most (a test that never pumps must not grow forever).
MAX_QUEUED = 100_000
#: Seconds between two sweeps of expired cache events (reads expire them as they go).
CACHE_SWEEP_SECONDS = 30.0

_node_ids = itertools.count(1)


def new_epoch() -> str:
    """A fresh history epoch: 8 URL-safe characters from 48 random bits."""
    return secrets.token_urlsafe(6)


def _ignore_message(message: Message) -> None:
    """The receiver before a hub attaches: nothing to deliver to."""


def _ignore_event(event: ev.HubEvent) -> None:
    """The emitter before a hub attaches: nobody listens."""


class MemoryCluster:
    """The shared bus queue and state tables of the nodes that joined.

    Args:
        clock: monotonic seconds (subscription count throttle, cache TTLs, history ages).
        epochs: makes a history epoch (random; tests pass their own).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        epochs: Callable[[], str] = new_epoch,
    ) -> None:
        self.clock = clock
        self.epochs = epochs
        self.nodes: dict[str, MemoryNode] = {}
        self._queue: deque[tuple[str, Message]] = deque()
        #: app → channel → node id → that node's subscriber count.
        self.channels: dict[str, dict[str, dict[str, int]]] = {}
        #: app → presence channel → user id → user_info (the first node's).
        self.members: dict[str, dict[str, dict[str, Any]]] = {}
        #: (app, channel, user id) → the nodes that have the user present.
        self.member_nodes: dict[tuple[str, str, str], set[str]] = {}
        #: app → user id → the nodes where it is signed in.
        self.users: dict[str, dict[str, set[str]]] = {}
        #: (app, user id) → its counted connections, oldest first: socket id → node id.
        self.connections: dict[tuple[str, str], dict[str, str]] = {}
        #: app → cache channel → (event, data, expires at on ``clock``).
        self.cache: dict[str, dict[str, tuple[str, str, float]]] = {}
        #: One memory of signatures for the whole cluster.
        self.replay = LocalReplayClaims()
        #: app → its channels' histories, and the bounds they were last used with.
        self.histories: dict[str, AppHistory] = {}
        self.history_limits: dict[str, HistoryLimits] = {}

    def join(self, node_id: str | None = None) -> Cluster:
        """A new node's bus, state, replay claims and history."""
        node = MemoryNode(self, node_id or f"memory-{next(_node_ids)}")
        self.nodes[node.node_id] = node
        return Cluster(node.bus, node.state, self.replay, node.history)

    # --- the bus queue ---------------------------------------------------------------

    def queued(self) -> int:
        """Messages waiting for :meth:`pump`."""
        return len(self._queue)

    def enqueue(self, node_id: str, message: Message) -> None:
        """Queue ``message`` for ``node_id``'s hub (dropped past :data:`MAX_QUEUED`)."""
        if len(self._queue) < MAX_QUEUED:
            self._queue.append((node_id, message))

    def pump(self) -> int:
        """Deliver queued messages in order, including those delivering queues; how many."""
        delivered = 0
        while self._queue:
            node_id, message = self._queue.popleft()
            node = self.nodes.get(node_id)
            if node is not None:
                node.bus.deliver(message)
                delivered += 1
        return delivered

    def route(self, sender: str, message: Message) -> None:
        """Queue ``message`` for every other node that should get it."""
        if isinstance(message, UserOnline | UserOffline | Terminate | Replaced | Suspend):
            targets = [n for n in self.nodes if n != sender]
        else:
            channel = message.channel
            if channel.startswith(SERVER_TO_USER_PREFIX):
                targets = [n for n in self.nodes if n != sender]
            else:
                key = (message.app_id, channel)
                targets = [
                    node_id
                    for node_id, node in self.nodes.items()
                    if node_id != sender and key in node.bus.interest
                ]
        for node_id in targets:
            self.enqueue(node_id, message)

    # --- a node leaving ----------------------------------------------------------------

    def leave(self, node_id: str) -> None:
        """Remove a node's share of the state (a clean stop, or a test's dead node)."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        state = node.state
        for app_id, users in list(self.users.items()):
            for user_id in [u for u, nodes in users.items() if node_id in nodes]:
                state.user_off(app_id, user_id)
        for app_id, channel, user_id in [k for k, v in self.member_nodes.items() if node_id in v]:
            state.member_off(app_id, channel, user_id)
        for app_id, channels in list(self.channels.items()):
            for channel in [c for c, holders in channels.items() if node_id in holders]:
                state.channel_off(app_id, channel)
        for (app_id, user_id), counted in list(self.connections.items()):
            for socket_id in [s for s, holder in counted.items() if holder == node_id]:
                state.release_connection(app_id, user_id, socket_id)
        del self.nodes[node_id]


class MemoryNode:
    """One node of a :class:`MemoryCluster`."""

    __slots__ = ("bus", "history", "node_id", "state")

    def __init__(self, cluster: MemoryCluster, node_id: str) -> None:
        self.node_id = node_id
        self.bus = MemoryBus(cluster, node_id)
        self.state = MemoryState(cluster, node_id, self.bus)
        self.history = MemoryHistory(cluster, node_id)


class MemoryBus:
    """Implements :class:`~bastion.adapters.base.Bus` over the cluster's queue."""

    __slots__ = ("_cluster", "_node_id", "_receive", "interest")

    def __init__(self, cluster: MemoryCluster, node_id: str) -> None:
        self._cluster = cluster
        self._node_id = node_id
        self._receive: Receive = _ignore_message
        #: (app, channel) this node has local subscribers of.
        self.interest: set[tuple[str, str]] = set()

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self._node_id

    @property
    def healthy(self) -> bool:
        """An in-process queue is never down."""
        return True

    def attach(self, receive: Receive) -> None:
        """Where messages from the other nodes go."""
        self._receive = receive

    def deliver(self, message: Message) -> None:
        """Hand a queued message to this node's hub (:meth:`MemoryCluster.pump`)."""
        self._receive(message)

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Leave the cluster: what only this node held is vacated, its members removed."""
        self._cluster.leave(self._node_id)

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: Any,
        exclude_socket_id: str | None = None,
        user_id: str | None = None,
        *,
        client: bool = False,
    ) -> None:
        """Queue a channel event for the other nodes with interest in it."""
        if len(self._cluster.nodes) > 1:
            message = ChannelEvent(app_id, channel, event, data, exclude_socket_id, user_id, client)
            self._cluster.route(self._node_id, message)

    def broadcast(self, message: Message) -> None:
        """Queue a control message for the other nodes that should get it."""
        self._cluster.route(self._node_id, message)

    def interest_on(self, app_id: str, channel: str) -> None:
        """Route the channel's messages to this node from now on."""
        self.interest.add((app_id, channel))

    def interest_off(self, app_id: str, channel: str) -> None:
        """Stop routing the channel's messages to this node."""
        self.interest.discard((app_id, channel))

    def when_ready(self, app_id: str, channel: str, callback: Callable[[], None]) -> None:
        """Interest takes effect at once in one process."""
        callback()


class MemoryState:
    """Implements :class:`~bastion.adapters.base.ClusterState` over the shared tables."""

    __slots__ = (
        "_announcing",
        "_bus",
        "_cluster",
        "_emit",
        "_next_sweep",
        "_node_id",
        "_receive",
        "_throttle",
    )

    def __init__(self, cluster: MemoryCluster, node_id: str, bus: MemoryBus) -> None:
        self._cluster = cluster
        self._node_id = node_id
        self._bus = bus
        self._receive: Receive = _ignore_message
        self._emit: Emit = _ignore_event
        #: This node's announcements of subscription counts, throttled.
        self._throttle = CountThrottle()
        #: Apps that send subscription_count events to their clients.
        self._announcing: set[str] = set()
        self._next_sweep = cluster.clock() + CACHE_SWEEP_SECONDS

    def attach(self, receive: Receive, emit: Emit) -> None:
        """Where decisions go."""
        self._receive = receive
        self._emit = emit

    def _decide(self, message: Message) -> None:
        """A decision for every node: this one's hub now, the others' through the bus."""
        self._receive(message)
        self._bus.broadcast(message)

    def tick(self) -> None:
        """Send the held subscription counts that are due; forget expired cache events."""
        now = self._cluster.clock()
        for app_id, channel, count in self._throttle.due(now):
            self._announce(app_id, channel, count)
        if now >= self._next_sweep:
            self._next_sweep = now + CACHE_SWEEP_SECONDS
            for channels in self._cluster.cache.values():
                for name in [n for n, (_, _, expires) in channels.items() if expires <= now]:
                    del channels[name]

    # --- channels and counts ----------------------------------------------------------

    def channel_on(self, app_id: str, channel: str) -> None:
        """Hold the channel; occupied when this node is its first holder."""
        holders = self._cluster.channels.setdefault(app_id, {}).setdefault(channel, {})
        if self._node_id in holders:
            return
        holders[self._node_id] = 0
        if len(holders) == 1:
            self._emit(ev.ChannelOccupied(app_id, channel))

    def channel_off(self, app_id: str, channel: str) -> None:
        """Let the channel go; vacated when this node was its last holder."""
        self._throttle.forget(app_id, channel)
        channels = self._cluster.channels.get(app_id, {})
        holders = channels.get(channel)
        if holders is None or holders.pop(self._node_id, None) is None:
            return
        if not holders:
            del channels[channel]
            if not channels:
                del self._cluster.channels[app_id]
            self._emit(ev.ChannelVacated(app_id, channel))
        elif not _is_presence(channel):
            # The other nodes' subscribers learn the smaller total.
            self._count_changed(app_id, channel, sum(holders.values()))

    def count(self, app_id: str, channel: str, subscribers: int, *, announce: bool) -> None:
        """Record this node's count; announce the cluster's total (throttled)."""
        holders = self._cluster.channels.get(app_id, {}).get(channel)
        if holders is None or self._node_id not in holders:
            return  # a late count never resurrects a channel
        holders[self._node_id] = subscribers
        if _is_presence(channel):
            return  # presence channels count members, not subscriptions
        if announce:
            self._announcing.add(app_id)
        else:
            self._announcing.discard(app_id)
        self._count_changed(app_id, channel, sum(holders.values()))

    def _count_changed(self, app_id: str, channel: str, total: int) -> None:
        if self._throttle.push(app_id, channel, total, self._cluster.clock()):
            self._announce(app_id, channel, total)

    def _announce(self, app_id: str, channel: str, total: int) -> None:
        self._emit(ev.SubscriptionCountChanged(app_id, channel, total))
        if app_id in self._announcing:
            self._decide(SubscriptionCount(app_id, channel, total))

    # --- presence members -------------------------------------------------------------

    def member_on(
        self, app_id: str, channel: str, user_id: str, user_info: Any, socket_id: str
    ) -> None:
        """Add a member; member_added goes out when it is new to the cluster."""
        nodes = self._cluster.member_nodes.setdefault((app_id, channel, user_id), set())
        if self._node_id in nodes:
            return
        nodes.add(self._node_id)
        if len(nodes) > 1:
            return
        members = self._cluster.members.setdefault(app_id, {}).setdefault(channel, {})
        members[user_id] = user_info
        self._emit(ev.MemberAdded(app_id, channel, user_id))
        self._decide(MemberAdded(app_id, channel, user_id, user_info, socket_id))

    def member_off(self, app_id: str, channel: str, user_id: str) -> None:
        """Remove a member of this node; member_removed when it left the cluster."""
        key = (app_id, channel, user_id)
        nodes = self._cluster.member_nodes.get(key)
        if nodes is None or self._node_id not in nodes:
            return
        nodes.discard(self._node_id)
        if nodes:
            return
        del self._cluster.member_nodes[key]
        channels = self._cluster.members.get(app_id, {})
        members = channels.get(channel, {})
        members.pop(user_id, None)
        if not members:
            channels.pop(channel, None)
        self._emit(ev.MemberRemoved(app_id, channel, user_id))
        self._decide(MemberRemoved(app_id, channel, user_id))

    # --- signed-in users --------------------------------------------------------------

    def user_on(self, app_id: str, user_id: str) -> None:
        """A user signed in here; online when it was nowhere before."""
        nodes = self._cluster.users.setdefault(app_id, {}).setdefault(user_id, set())
        if self._node_id in nodes:
            return
        nodes.add(self._node_id)
        if len(nodes) == 1:
            self._decide(UserOnline(app_id, user_id))

    def user_off(self, app_id: str, user_id: str) -> None:
        """A user's last connection here closed; offline when it was its last anywhere."""
        users = self._cluster.users.get(app_id, {})
        nodes = users.get(user_id)
        if nodes is None or self._node_id not in nodes:
            return
        nodes.discard(self._node_id)
        if not nodes:
            del users[user_id]
            self._decide(UserOffline(app_id, user_id))

    # --- users' connections -----------------------------------------------------------

    async def claim_connection(
        self, app_id: str, user_id: str, socket_id: str, limit: int, *, close_oldest: bool
    ) -> bool:
        """Count the connection; at ``limit``, refuse it or replace the oldest ones."""
        counted = self._cluster.connections.setdefault((app_id, user_id), {})
        if socket_id in counted:
            return True
        excess = len(counted) - limit + 1
        if excess > 0:
            if not close_oldest:
                if not counted:
                    del self._cluster.connections[(app_id, user_id)]
                return False
            oldest = tuple(itertools.islice(counted, excess))
            for victim in oldest:
                del counted[victim]
            self._decide(Replaced(app_id, user_id, oldest))
        counted[socket_id] = self._node_id
        return True

    def release_connection(self, app_id: str, user_id: str, socket_id: str) -> None:
        """Stop counting the connection."""
        key = (app_id, user_id)
        counted = self._cluster.connections.get(key)
        if counted is None or counted.get(socket_id) != self._node_id:
            return
        del counted[socket_id]
        if not counted:
            del self._cluster.connections[key]

    # --- cache channels ---------------------------------------------------------------

    def cache(self, app_id: str, channel: str, event: str, data: str, ttl_seconds: int) -> None:
        """Remember a cache channel's last server event for ``ttl_seconds``."""
        expires = self._cluster.clock() + ttl_seconds
        self._cluster.cache.setdefault(app_id, {})[channel] = (event, data, expires)

    # --- reads ------------------------------------------------------------------------

    async def members(self, app_id: str, channel: str) -> dict[str, Any]:
        """The channel's members."""
        return dict(self._cluster.members.get(app_id, {}).get(channel, {}))

    async def cached(self, app_id: str, channel: str) -> Cached | None:
        """The channel's last event, while it is cached."""
        found = self._cluster.cache.get(app_id, {}).get(channel)
        if found is None:
            return None
        event, data, expires = found
        left = expires - self._cluster.clock()
        if left <= 0:
            del self._cluster.cache[app_id][channel]
            return None
        return Cached(event, data, int(left * 1000))

    async def online(self, app_id: str, user_ids: list[str]) -> set[str]:
        """Those of ``user_ids`` signed in on some node."""
        users = self._cluster.users.get(app_id, {})
        return {user_id for user_id in user_ids if user_id in users}

    async def channel_states(
        self, app_id: str, names: list[str] | None, prefix: str = "", limit: int | None = None
    ) -> dict[str, ChannelState]:
        """The channels' states from the shared tables."""
        channels = self._cluster.channels.get(app_id, {})
        members = self._cluster.members.get(app_id, {})
        if names is None:
            wanted = (name for name in channels if name.startswith(prefix))
            stop = None if limit is None else limit + 1
            names = list(itertools.islice(wanted, stop))
        states: dict[str, ChannelState] = {}
        for name in names:
            holders = channels.get(name)
            if holders is None:
                states[name] = ChannelState(False, 0, 0)
            else:
                states[name] = ChannelState(True, sum(holders.values()), len(members.get(name, ())))
        return states


class MemoryHistory:
    """Implements :class:`~bastion.adapters.base.History` over the cluster's tables.

    The pure :class:`~bastion.core.history.AppHistory` per app, shared by the
    nodes. A recorded event goes at once to this node's hub when the node is
    alone (the production ``local`` cluster: the REST answer follows the local
    deliveries); in a cluster of several it is queued for every node with
    interest in the channel, *this one included*, as Redis delivers it: the one
    queue is the channel's position order on every node.
    """

    __slots__ = ("_cluster", "_deliver", "_node_id")

    def __init__(self, cluster: MemoryCluster, node_id: str) -> None:
        self._cluster = cluster
        self._node_id = node_id
        self._deliver: Deliver = ignore_delivery

    def attach(self, deliver: Deliver) -> None:
        """Where recorded events go on this node."""
        self._deliver = deliver

    def _app(self, app_id: str, limits: HistoryLimits) -> AppHistory:
        cluster = self._cluster
        history = cluster.histories.get(app_id)
        if history is None:
            history = cluster.histories[app_id] = AppHistory()
        if cluster.history_limits.get(app_id) is not limits:
            cluster.history_limits[app_id] = limits
        return history

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: str,
        exclude_socket_id: str | None,
        limits: HistoryLimits,
    ) -> None:
        """Record the event, then deliver it with its position."""
        cluster = self._cluster
        position = self._app(app_id, limits).append(
            channel, event, data, exclude_socket_id, cluster.clock(), limits, cluster.epochs
        )
        if len(cluster.nodes) == 1:
            self._deliver(app_id, channel, event, data, exclude_socket_id, str(position))
            return
        message = ChannelEvent(
            app_id, channel, event, data, exclude_socket_id, position=str(position)
        )
        key = (app_id, channel)
        for node_id, node in cluster.nodes.items():
            if key in node.bus.interest:
                cluster.enqueue(node_id, message)

    async def since(
        self,
        app_id: str,
        channel: str,
        asked: Position | None,
        socket_id: str | None,
        limits: HistoryLimits,
    ) -> Recovery:
        """What ``asked`` missed, from the shared table (never suspends)."""
        cluster = self._cluster
        return self._app(app_id, limits).since(
            channel, asked, socket_id, cluster.clock(), limits, cluster.epochs
        )

    def restart(self, app_id: str) -> None:
        """Forget the app's histories (their next ones have new epochs)."""
        self._cluster.histories.pop(app_id, None)

    def tick(self) -> None:
        """Forget the quiet channels of every app."""
        now = self._cluster.clock()
        for app_id, history in self._cluster.histories.items():
            limits = self._cluster.history_limits.get(app_id)
            if limits is not None:
                history.sweep(now, limits)


def _is_presence(channel: str) -> bool:
    return channel.startswith("presence-")
