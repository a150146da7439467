"""The single-node adapter: there is nobody else to tell."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from bastion.adapters.base import ChannelState, Deliver, Emit

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
    def clustered(self) -> bool:
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

    # --- cluster state: the hub's own state is the whole cluster ---------------------------

    def count(self, app_id: str, channel: str, subscribers: int, *, announce: bool) -> None:
        """The hub counts."""

    def member_on(
        self, app_id: str, channel: str, user_id: str, user_info: Any, socket_id: str
    ) -> None:
        """The hub decides member_added itself (never called: not clustered)."""

    def member_off(self, app_id: str, channel: str, user_id: str) -> None:
        """The hub decides member_removed itself (never called: not clustered)."""

    def members(
        self, app_id: str, channel: str, callback: Callable[[dict[str, Any] | None], None]
    ) -> None:
        """Unknown here: the hub's members are all there is."""
        callback(None)

    def cache(self, app_id: str, channel: str, event: str, data: str, ttl_seconds: int) -> None:
        """The hub's cache is the only one."""

    def cached_event(
        self, app_id: str, channel: str, callback: Callable[[tuple[str, str] | None, bool], None]
    ) -> None:
        """Unknown here: the hub's cache is the only one."""
        callback(None, False)

    def terminate_user(self, app_id: str, user_id: str) -> None:
        """No other node."""

    def user_presence(self, app_id: str, user_id: str, online: bool) -> None:
        """No other node to tell."""

    def online_users(
        self, app_id: str, user_ids: list[str], callback: Callable[[set[str] | None], None]
    ) -> None:
        """Unknown here: the hub's sign-ins are all there is."""
        callback(None)

    async def channel_states(
        self, app_id: str, names: list[str] | None, prefix: str = ""
    ) -> dict[str, ChannelState]:
        """Never asked: the REST API reads the hub when the adapter is not clustered."""
        raise NotImplementedError("a single node answers from the hub")

    async def user_ids(self, app_id: str, channel: str) -> list[str]:
        """Never asked (see :meth:`channel_states`)."""
        raise NotImplementedError("a single node answers from the hub")

    async def cached(self, app_id: str, channel: str) -> tuple[str, str, int] | None:
        """Never asked (see :meth:`channel_states`)."""
        raise NotImplementedError("a single node answers from the hub")

    async def claim_signature(
        self, app_id: str, signature: str, grace_seconds: float, ttl_seconds: float
    ) -> bool | None:
        """Never asked: the node's own replay guard is the cluster's."""
        return None
