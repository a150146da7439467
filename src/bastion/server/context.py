"""What every connection of a node shares: settings, hub, refusal path, registry."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from websockets.frames import Frame, Opcode

from bastion.config import Settings
from bastion.core.hub import Hub
from bastion.metrics import Metrics
from bastion.server.refusals import RefusalPath

if TYPE_CHECKING:
    from bastion.api.rest import RestApi
    from bastion.server.websocket import WebSocketConnection

__all__ = ["ServerContext", "frame_text"]


def frame_text(text: str) -> bytes:
    """One unmasked, unfragmented WebSocket text frame carrying ``text``."""
    return Frame(Opcode.TEXT, text.encode("utf-8")).serialize(mask=False, extensions=[])


@dataclass(eq=False)
class ServerContext:
    """Shared state of one node's listener."""

    settings: Settings
    hub: Hub
    refusals: RefusalPath
    metrics: Metrics
    loop: asyncio.AbstractEventLoop
    rest: RestApi
    connections: set[WebSocketConnection] = field(default_factory=set)
    socket_ids: set[str] = field(default_factory=set)
    draining: bool = False
