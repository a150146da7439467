"""The adapter seam: how a node shares publishes and channel interest with others.

The hub always delivers to its own local subscribers first, then hands the
event to the adapter so that other nodes can deliver it to theirs. The ``local``
adapter (one node) does nothing more; the ``redis`` adapter (#5) publishes on
the bus and subscribes to a channel's bus topic only while the node has local
interest in it. Presence, counts and the REST queries move behind this seam in
#5 as cluster-wide operations with a deadline; until then the hub answers them
from its own state, which *is* the whole cluster for a single node.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Adapter"]


class Adapter(Protocol):
    """What the hub needs from the cluster bus. Methods must not block."""

    async def start(self) -> None:
        """Connect to the bus (if any)."""

    async def stop(self) -> None:
        """Disconnect, flushing nothing that was promised."""

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: str,
        exclude_socket_id: str | None,
    ) -> None:
        """Send an event already delivered locally to the other nodes."""

    def interest_on(self, app_id: str, channel: str) -> None:
        """This node gained its first local subscriber of ``channel``."""

    def interest_off(self, app_id: str, channel: str) -> None:
        """This node lost its last local subscriber of ``channel``."""
