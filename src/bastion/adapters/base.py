"""The cluster seam: a Bus, a ClusterState, ReplayClaims and a History.

A node's hub delivers to its own connections and talks to the rest of the cluster
through three small interfaces, each implemented in full by ``local`` (one node:
:mod:`bastion.adapters.local`), ``memory`` (N hubs in one process, for tests:
:mod:`bastion.adapters.memory`) and ``redis`` (:mod:`bastion.adapters.redis`).
Nothing above this seam knows which one it has.

* The **bus** carries channel events and control messages to the other nodes and
  routes them only to nodes with local interest in the channel. What other nodes
  send comes back through the :data:`Receive` callback the hub attaches.
* The **cluster state** is where a node records its *transitions* (first and last
  local subscriber of a channel, its subscriber count, a user's first and last
  local socket in a presence channel, a user's first and last signed-in
  connection, a cache channel's last event). It decides once for the whole cluster
  what those transitions mean, and hands the decisions back: hub events for the
  webhooks (``channel_occupied``, ``member_added``, … through :data:`Emit`, on the
  deciding node only) and control messages for every node's connections (through
  :data:`Receive`, this node's hub directly and the others over the bus). It also
  answers the cluster-wide reads: members, cached events, online users, channel
  states.
  It also counts each user's signed-in connections for ``max_connections_per_user``
  (:meth:`ClusterState.claim_connection`): a decision, answered to the caller, with
  the connections it replaces closed on every node (a
  :class:`~bastion.adapters.messages.Replaced`).
* The **replay claims** say whether a signed REST request's signature is new to
  the cluster.
* The **history** records the server events of history channels with their
  positions, delivers them to every node (this one included) in position order,
  and answers what a client at a position missed
  (docs/decisions/0020-history-and-recovery.md).

Reads are coroutines everywhere (one style): a read that cannot be answered
raises :class:`ClusterUnavailable`, never a partial answer. The local and memory
implementations answer without suspending, so a caller that drives a read
eagerly (:func:`bastion.eager.drive`) gets its answer in the same call.

Transitions never block and never fail: an implementation that writes to a
remote store does so in the background, in order, and re-asserts after an outage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bastion.adapters.messages import Message

if TYPE_CHECKING:
    from bastion.core.events import HubEvent
    from bastion.core.history import HistoryLimits, Recovery
    from bastion.protocol.positions import Position
    from bastion.security.replay import Verdict

__all__ = [
    "Bus",
    "Cached",
    "ChannelState",
    "Cluster",
    "ClusterState",
    "ClusterUnavailable",
    "Deliver",
    "Emit",
    "History",
    "Receive",
    "ReplayClaims",
    "ignore_delivery",
]


class ClusterUnavailable(Exception):
    """A cluster-wide read could not be answered (the store is down or too slow)."""


@dataclass(frozen=True, slots=True)
class ChannelState:
    """A channel as the whole cluster sees it."""

    occupied: bool
    subscription_count: int
    user_count: int


@dataclass(frozen=True, slots=True)
class Cached:
    """A cache channel's last server event and how long it stays cached."""

    event: str
    data: str
    ttl_ms: int


#: Hands a message (a channel event or a control message) to this node's hub.
Receive = Callable[[Message], None]
#: Reports a hub event decided for the cluster (``Hub.emit``); never blocks.
Emit = Callable[["HubEvent"], None]
#: Delivers a server event to this node's subscribers (``Hub.deliver``): app id,
#: channel, event, data, the excluded socket id, its position (``None``: unrecorded).
Deliver = Callable[[str, str, str, str, "str | None", "str | None"], None]


def ignore_delivery(
    app_id: str,
    channel: str,
    event: str,
    data: str,
    exclude_socket_id: str | None,
    position: str | None,
) -> None:
    """A history's :data:`Deliver` until a hub attaches: nobody to deliver to."""


class Bus(Protocol):
    """Carries events and control messages between nodes. Methods never block."""

    @property
    def node_id(self) -> str:
        """This node's id in the cluster (unique per process start)."""
        ...

    @property
    def healthy(self) -> bool:
        """Whether messages reach the other nodes right now."""
        ...

    def attach(self, receive: Receive) -> None:
        """Where messages from other nodes go (set once, before :meth:`start`)."""

    async def start(self) -> None:
        """Connect (a store that is down does not fail the start)."""

    async def stop(self) -> None:
        """Leave the cluster, flushing nothing that was promised."""

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
        """Send a channel event, already delivered locally, to the other nodes.

        The hot path of every publish and client event, so it takes the fields of
        a :class:`~bastion.adapters.messages.ChannelEvent`, not the object.
        """

    def broadcast(self, message: Message) -> None:
        """Send a control message to the other nodes (not to this one)."""

    def interest_on(self, app_id: str, channel: str) -> None:
        """This node gained its first local subscriber of ``channel``."""

    def interest_off(self, app_id: str, channel: str) -> None:
        """This node lost its last local subscriber of ``channel``."""

    def when_ready(self, app_id: str, channel: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` once other nodes' events on ``channel`` reach this node.

        The hub answers a subscribe from it, so a client is never told it is
        subscribed while events published elsewhere could still miss it. At once
        when nothing needs waiting for; never later than a short bound.
        """


class ClusterState(Protocol):
    """What spans nodes: channels, counts, members, sign-ins, cache. Never blocks."""

    def attach(self, receive: Receive, emit: Emit) -> None:
        """Where decisions go: control messages for this node, hub events (webhooks)."""

    def tick(self) -> None:
        """Periodic housekeeping (held subscription counts due, expired cache events)."""

    # --- transitions of this node ---------------------------------------------------

    def channel_on(self, app_id: str, channel: str) -> None:
        """This node's first local subscriber of ``channel`` (occupied if first anywhere)."""

    def channel_off(self, app_id: str, channel: str) -> None:
        """This node's last local subscriber left (vacated if last anywhere)."""

    def count(self, app_id: str, channel: str, subscribers: int, *, announce: bool) -> None:
        """This node's subscriber count of ``channel`` changed (it still has some).

        The cluster's total is reported (``SubscriptionCountChanged``) and, with
        ``announce`` (the app's ``enable_subscription_count``), sent to every node's
        subscribers; both are throttled as Pusher does. Not for presence channels.
        """

    def member_on(
        self, app_id: str, channel: str, user_id: str, user_info: Any, socket_id: str
    ) -> None:
        """``user_id`` became present on this node (its first local socket, ``socket_id``)."""

    def member_off(self, app_id: str, channel: str, user_id: str) -> None:
        """``user_id``'s last local socket left ``channel``."""

    def user_on(self, app_id: str, user_id: str) -> None:
        """``user_id``'s first local connection signed in."""

    def user_off(self, app_id: str, user_id: str) -> None:
        """``user_id``'s last local signed-in connection closed."""

    def cache(self, app_id: str, channel: str, event: str, data: str, ttl_seconds: int) -> None:
        """A server event was published on a cache channel: it is the last one now."""

    # --- users' connections (max_connections_per_user) -------------------------------

    async def claim_connection(
        self, app_id: str, user_id: str, socket_id: str, limit: int, *, close_oldest: bool
    ) -> bool:
        """Count ``socket_id`` among ``user_id``'s signed-in connections, within ``limit``.

        Returns whether the connection may sign in as ``user_id``. With ``limit``
        connections counted already it may not, unless ``close_oldest``: the user's
        oldest connections anywhere in the cluster then make room, and every node
        closes those it holds (a :class:`~bastion.adapters.messages.Replaced`, this
        node's through :data:`Receive` before the answer). Each connection counts
        once, on whichever node it is.

        Never raises: a cluster that cannot decide right now decides for this node
        alone (the user's connections here, within the same ``limit``) and records
        the connection once it can.
        """
        ...

    def release_connection(self, app_id: str, user_id: str, socket_id: str) -> None:
        """A connection counted by :meth:`claim_connection` closed (a no-op for others)."""

    # --- reads (any node) -----------------------------------------------------------

    async def members(self, app_id: str, channel: str) -> dict[str, Any]:
        """A presence channel's members in the cluster: user id → user_info.

        Raises:
            ClusterUnavailable: the cluster cannot answer right now.
        """
        ...

    async def cached(self, app_id: str, channel: str) -> Cached | None:
        """A cache channel's last event, if it is still cached.

        Raises:
            ClusterUnavailable: the cluster cannot answer right now.
        """
        ...

    async def online(self, app_id: str, user_ids: list[str]) -> set[str]:
        """Those of ``user_ids`` signed in anywhere in the cluster.

        Raises:
            ClusterUnavailable: the cluster cannot answer right now.
        """
        ...

    async def channel_states(
        self, app_id: str, names: list[str] | None, prefix: str = "", limit: int | None = None
    ) -> dict[str, ChannelState]:
        """The cluster's view of ``names``, or of the occupied channels with ``prefix``.

        With ``names`` unset and a ``limit``, at most ``limit + 1`` channels are
        returned (so the caller can tell that there were more), and the work done
        is bounded by about that many channels, never by the app's whole count.

        Raises:
            ClusterUnavailable: the cluster cannot answer right now.
        """
        ...


class ReplayClaims(Protocol):
    """Whether a signed REST request was seen before anywhere in the cluster."""

    async def claim(
        self, app_id: str, signature: str, timestamp: int, now: float, *, max_entries: int
    ) -> Verdict:
        """Claim a verified signature (``timestamp``: its ``auth_timestamp``).

        ``now`` is the Unix time of the signature check; ``max_entries`` the app's
        ``replay_guard_max_entries``. Never raises: a cluster that cannot say falls
        back to this node's own memory of signatures.
        """
        ...


class History(Protocol):
    """Channel history: events recorded with positions, and what a position missed."""

    def attach(self, deliver: Deliver) -> None:
        """Where events go for delivery on this node (``Hub.deliver``)."""

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: str,
        exclude_socket_id: str | None,
        limits: HistoryLimits,
    ) -> None:
        """Record a server event of a history channel and deliver it everywhere.

        Every node delivers it with its position, this one included, in the
        channel's position order (this node through ``deliver``, or through the
        bus like the others). When the history cannot record it (its
        store is down) it is delivered on this node without a position, and the
        channel's history restarts (a new epoch) once the store is back, so no
        resume across the gap is ever answered complete. Never blocks.
        """

    async def since(
        self,
        app_id: str,
        channel: str,
        asked: Position | None,
        socket_id: str | None,
        limits: HistoryLimits,
    ) -> Recovery:
        """What a client at ``asked`` missed on ``channel``: all of it, or ``false``.

        ``asked`` ``None`` is a client without a position: it is told the channel's
        current one (a channel without history starts one).

        Raises:
            ClusterUnavailable: the history cannot answer right now.
        """
        ...

    def restart(self, app_id: str) -> None:
        """Forget the app's histories: a live reload stopped recording some channels.

        Every position handed out before is then answered ``epoch_changed``, never
        compared with offsets that miss the events published unrecorded.
        """

    def tick(self) -> None:
        """Periodic housekeeping (forget quiet channels)."""


@dataclass(frozen=True, slots=True)
class Cluster:
    """One node's four views of the cluster, as the composition root builds them."""

    bus: Bus
    state: ClusterState
    replay: ReplayClaims
    history: History
