"""A WebSocket connection's states and the only transitions allowed between them.

::

    OPEN ──close()──▶ CLOSING ──transport lost──▶ CLOSED
      └──────────────transport lost──────────────────┘

OPEN is entered once the 101 response and ``pusher:connection_established``
are written; only an OPEN connection is subscribed anywhere or written to by a
broadcast. CLOSING means our close frame is written and the connection has
already left every channel; CLOSED means the transport is gone.
"""

from __future__ import annotations

import enum

__all__ = ["ConnectionState", "check_transition"]


class ConnectionState(enum.Enum):
    """Where a WebSocket connection is in its life."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_ALLOWED: dict[ConnectionState, frozenset[ConnectionState]] = {
    ConnectionState.OPEN: frozenset({ConnectionState.CLOSING, ConnectionState.CLOSED}),
    ConnectionState.CLOSING: frozenset({ConnectionState.CLOSED}),
    ConnectionState.CLOSED: frozenset(),
}


def check_transition(current: ConnectionState, new: ConnectionState) -> ConnectionState:
    """Return ``new`` if the transition is allowed, else raise ``RuntimeError``."""
    if new not in _ALLOWED[current]:
        raise RuntimeError(f"invalid connection transition {current.name} -> {new.name}")
    return new
