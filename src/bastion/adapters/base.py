"""The adapter seam: how a node shares publishes and channel interest with others.

The hub always delivers to its own local subscribers first, then hands the
event to the adapter so that other nodes can deliver it to theirs. The ``local``
adapter (one node) does nothing more; the ``redis`` adapter (#5) publishes on
the bus and subscribes to a channel's bus topic only while the node has local
interest in it. Events from other nodes come back through the :data:`Deliver`
callback the node attaches (``Hub.deliver_remote``), for local delivery only.
An adapter may also *decide occupancy* (:attr:`Adapter.decides_occupancy`): then
``channel_occupied`` / ``channel_vacated`` are decided once for the whole cluster
by the adapter, which reports them through the :data:`Emit` callback the hub
attaches, and the hub does not emit them itself.
Presence, counts and the REST queries move behind this seam later in #5 as
cluster-wide operations with a deadline; until then the hub answers them from
its own state, which *is* the whole cluster for a single node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bastion.core.events import HubEvent

__all__ = ["Adapter", "Deliver", "Emit"]

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
    def decides_occupancy(self) -> bool:
        """Whether the adapter, not the hub, emits ``ChannelOccupied`` / ``ChannelVacated``."""

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
