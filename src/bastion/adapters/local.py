"""The single-node adapter: there is nobody else to tell."""

from __future__ import annotations

__all__ = ["LocalAdapter"]


class LocalAdapter:
    """Implements :class:`bastion.adapters.base.Adapter` for one node."""

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to disconnect."""

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: str,
        exclude_socket_id: str | None,
    ) -> None:
        """Local subscribers already have it."""

    def interest_on(self, app_id: str, channel: str) -> None:
        """No bus topic to join."""

    def interest_off(self, app_id: str, channel: str) -> None:
        """No bus topic to leave."""
