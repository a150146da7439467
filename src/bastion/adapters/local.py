"""The single-node adapter: there is nobody else to tell."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from bastion.adapters.base import Deliver, Emit

__all__ = ["LocalAdapter"]


class LocalAdapter:
    """Implements :class:`bastion.adapters.base.Adapter` for one node."""

    def __init__(self) -> None:
        self._node_id = uuid.uuid4().hex

    @property
    def node_id(self) -> str:
        """A random id (nobody else ever sees it)."""
        return self._node_id

    @property
    def healthy(self) -> bool:
        """There is no bus to lose."""
        return True

    @property
    def decides_occupancy(self) -> bool:
        """The hub decides: its own subscribers are the whole cluster."""
        return False

    def attach(self, deliver: Deliver) -> None:
        """Nothing ever arrives from elsewhere."""

    def attach_events(self, emit: Emit) -> None:
        """Nothing is decided here."""

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to disconnect."""

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
        """Local subscribers already have it."""

    def interest_on(self, app_id: str, channel: str) -> None:
        """No bus topic to join."""

    def interest_off(self, app_id: str, channel: str) -> None:
        """No bus topic to leave."""

    def when_ready(self, app_id: str, channel: str, callback: Callable[[], None]) -> None:
        """Nothing to wait for: every subscriber is local."""
        callback()
