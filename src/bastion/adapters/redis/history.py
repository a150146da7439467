"""Channel history with the redis adapter (not recorded yet: every resume answers false).

Until the cluster records history in Redis, a node of a cluster delivers the
events of history channels like any other event (this node's subscribers, then
the bus) and answers every resume ``recovered: false`` (``unavailable``): never a
replay that could miss what another node published.
"""

from __future__ import annotations

from bastion.adapters.base import Bus, ClusterUnavailable, Deliver
from bastion.core.history import HistoryLimits, Recovery
from bastion.protocol.positions import Position

__all__ = ["UnrecordedHistory"]


def _ignore(
    app_id: str,
    channel: str,
    event: str,
    data: str,
    exclude_socket_id: str | None,
    position: str | None,
) -> None:
    """The delivery before the hub attaches."""


class UnrecordedHistory:
    """Implements :class:`~bastion.adapters.base.History` without recording anything.

    Args:
        bus: the node's bus (the other nodes' subscribers).
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._deliver: Deliver = _ignore

    def attach(self, deliver: Deliver) -> None:
        """Where events go on this node."""
        self._deliver = deliver

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: str,
        exclude_socket_id: str | None,
        limits: HistoryLimits,
    ) -> None:
        """Deliver without a position: here, then to the other nodes."""
        self._deliver(app_id, channel, event, data, exclude_socket_id, None)
        self._bus.publish(app_id, channel, event, data, exclude_socket_id)

    async def since(
        self,
        app_id: str,
        channel: str,
        asked: Position | None,
        socket_id: str | None,
        limits: HistoryLimits,
    ) -> Recovery:
        """Nothing is recorded: the history cannot answer."""
        raise ClusterUnavailable("channel history is not recorded with the redis adapter")

    def restart(self, app_id: str) -> None:
        """Nothing is recorded: nothing to forget."""

    def tick(self) -> None:
        """Nothing to sweep."""
