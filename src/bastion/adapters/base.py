"""The adapter seam: how a node shares publishes and channel interest with others.

The hub always delivers to its own local subscribers first, then hands the
event to the adapter so that other nodes can deliver it to theirs. The ``local``
adapter (one node) does nothing more; the ``redis`` adapter (#5) publishes on
the bus and subscribes to a channel's bus topic only while the node has local
interest in it. Events from other nodes come back through the :data:`Deliver`
callback the node attaches (``Hub.deliver_remote``), for local delivery only.
A *clustered* adapter (:attr:`Adapter.clustered`) also owns the state that spans
nodes: ``channel_occupied`` / ``channel_vacated`` and presence ``member_added`` /
``member_removed`` are decided once for the whole cluster by the adapter, which
reports the hub events through the :data:`Emit` callback the hub attaches and
delivers the member frames through :data:`Deliver` (the hub then does neither);
subscriber counts, presence members and cache channels' last events are recorded
where every node can read them, and the REST queries ask the adapter
(:meth:`Adapter.channel_states`, :meth:`Adapter.user_ids`,
:meth:`Adapter.cached`) within a deadline. Otherwise (one node) the hub decides
and answers from its own state, which *is* the whole cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bastion.core.events import HubEvent

__all__ = ["Adapter", "ChannelState", "ClusterUnavailable", "Deliver", "Emit"]

#: Internal events a clustered adapter delivers through :data:`Deliver`: never
#: publishable by REST (reserved prefix) nor by clients (``client-`` only), and
#: bus messages are authenticated, so only a node can send them.
MEMBER_ADDED = "pusher_internal:member_added"
MEMBER_REMOVED = "pusher_internal:member_removed"
TERMINATE = "pusher_internal:terminate_connections"
WATCH_ONLINE = "pusher_internal:user_online"
WATCH_OFFLINE = "pusher_internal:user_offline"
SUBSCRIPTION_COUNT = "pusher_internal:subscription_count"


class ClusterUnavailable(Exception):
    """A cluster-wide query could not be answered (bus down or past its deadline)."""


@dataclass(frozen=True, slots=True)
class ChannelState:
    """A channel as the whole cluster sees it."""

    occupied: bool
    subscription_count: int
    user_count: int


#: Reports a hub event decided by the adapter (``Hub._emit``); never blocks.
Emit = Callable[["HubEvent"], None]


class Deliver(Protocol):
    """Hands an event received from another node to this node's subscribers."""

    def __call__(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: Any,
        exclude_socket_id: str | None,
        user_id: str | None,
        *,
        client: bool = False,
    ) -> None:
        """Deliver locally; never publish again."""


class Adapter(Protocol):
    """What the hub needs from the cluster bus. Methods must not block."""

    @property
    def node_id(self) -> str:
        """This node's id on the bus (unique per process start)."""

    @property
    def healthy(self) -> bool:
        """Whether the bus is connected (always ``True`` for one node)."""

    @property
    def clustered(self) -> bool:
        """Whether the adapter, not the hub, decides occupancy and presence events."""

    def attach(self, deliver: Deliver) -> None:
        """Where events received from other nodes go (set once, before :meth:`start`)."""

    def attach_events(self, emit: Emit) -> None:
        """Where events the adapter decides go (the hub sets it when it is built)."""

    async def start(self) -> None:
        """Connect to the bus (if any)."""

    async def stop(self) -> None:
        """Disconnect, flushing nothing that was promised."""

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: Any,
        exclude_socket_id: str | None,
        user_id: str | None = None,
        *,
        client: bool = False,
    ) -> None:
        """Send an event already delivered locally to the other nodes.

        ``user_id`` is the sender's presence user id (client events on presence
        channels); ``client`` marks a client event (it never updates a cache).
        """

    def interest_on(self, app_id: str, channel: str) -> None:
        """This node gained its first local subscriber of ``channel``."""

    def interest_off(self, app_id: str, channel: str) -> None:
        """This node lost its last local subscriber of ``channel``."""

    def when_ready(self, app_id: str, channel: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` once other nodes' events on ``channel`` reach this node.

        The hub answers a subscribe from it, so a client is never told it is
        subscribed while events published elsewhere could still miss it. Called at
        once when there is no bus, when the bus is down, or when the topic is
        already confirmed; never later than a short bound otherwise.
        """

    # --- cluster state (a clustered adapter; no-ops for one node) ------------------------

    def count(self, app_id: str, channel: str, subscribers: int, *, announce: bool) -> None:
        """This node's subscriber count of ``channel`` changed (it still has some).

        ``announce``: the app sends ``subscription_count`` events to its clients
        (``enable_subscription_count``), so the cluster's total is broadcast.
        """

    def member_on(
        self, app_id: str, channel: str, user_id: str, user_info: Any, socket_id: str
    ) -> None:
        """``user_id`` became present on this node (its first local socket, ``socket_id``)."""

    def member_off(self, app_id: str, channel: str, user_id: str) -> None:
        """``user_id``'s last local socket left ``channel``."""

    def members(
        self, app_id: str, channel: str, callback: Callable[[dict[str, Any] | None], None]
    ) -> None:
        """Call back with the cluster's members (user id → info), ``None`` when unknown."""

    def cache(self, app_id: str, channel: str, event: str, data: str, ttl_seconds: int) -> None:
        """Record a cache channel's last event for every node."""

    def cached_event(
        self, app_id: str, channel: str, callback: Callable[[tuple[str, str] | None, bool], None]
    ) -> None:
        """Call back with a cache channel's last event and whether the cluster answered."""

    def terminate_user(self, app_id: str, user_id: str) -> None:
        """Close ``user_id``'s connections on the other nodes."""

    def user_presence(self, app_id: str, user_id: str, online: bool) -> None:
        """``user_id``'s first local connection signed in / last one closed."""

    def online_users(
        self, app_id: str, user_ids: list[str], callback: Callable[[set[str] | None], None]
    ) -> None:
        """Call back with those of ``user_ids`` signed in anywhere, ``None`` when unknown."""

    async def channel_states(
        self, app_id: str, names: list[str] | None, prefix: str = ""
    ) -> dict[str, ChannelState]:
        """The cluster's view of ``names`` (or of every occupied channel with ``prefix``).

        Raises:
            ClusterUnavailable: the bus is down or did not answer in time.
        """
        ...

    async def user_ids(self, app_id: str, channel: str) -> list[str]:
        """The users present in a presence channel anywhere in the cluster."""
        ...

    async def cached(self, app_id: str, channel: str) -> tuple[str, str, int] | None:
        """A cache channel's last event ``(event, data, ttl_ms)`` in the cluster."""
        ...

    async def claim_signature(
        self, app_id: str, signature: str, grace_seconds: float, ttl_seconds: float
    ) -> bool | None:
        """Whether a signed REST request is new to the cluster (or a repeat within
        ``grace_seconds``); ``None`` when the cluster cannot say (bus down)."""
        ...
