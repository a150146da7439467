"""The connection state machine: the only transitions allowed are in one table."""

from __future__ import annotations

import pytest

from bastion.server.state import ConnectionState, check_transition

OPEN, CLOSING, CLOSED = ConnectionState.OPEN, ConnectionState.CLOSING, ConnectionState.CLOSED
ALLOWED = {(OPEN, CLOSING), (OPEN, CLOSED), (CLOSING, CLOSED)}


@pytest.mark.parametrize("current", list(ConnectionState))
@pytest.mark.parametrize("new", list(ConnectionState))
def test_transitions(current: ConnectionState, new: ConnectionState) -> None:
    if (current, new) in ALLOWED:
        assert check_transition(current, new) is new
    else:
        with pytest.raises(RuntimeError, match=f"{current.name} -> {new.name}"):
            check_transition(current, new)
