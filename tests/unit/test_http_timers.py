"""The listener's one deadline per connection: moved lazily, never early, at most a tick late.

A kept-alive request only moves the connection's deadline; its slot in the node's
deadlines (:mod:`bastion.server.deadlines`), joined for an earlier deadline, is
joined again for what is left when it comes. These tests
drive the listener (:class:`~bastion.server.http.HttpConnection`) on a clock they
move by hand, so every deadline is checked exactly, without waiting for one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bastion.config import settings_from_mapping
from bastion.server.deadlines import TICK
from bastion.server.http import KEEPALIVE_SECONDS, HttpConnection
from bastion.server.runtime import Node

HANDSHAKE_TIMEOUT = 10.0
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


class Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """The part of the loop the listener's timer uses, on a time moved by hand."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.now, self.timers = loop, 1000.0, list[Timer]()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> Timer:
        timer = Timer(when, lambda: callback(*args))
        self.timers.append(timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Timer:
        return self.call_at(self.now + delay, callback, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)

    def advance(self, seconds: float) -> None:
        """Move the time, firing every timer that falls due, in order."""
        until = self.now + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= until]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = timer.when
            timer.callback()
        self.now = until


class Transport:
    def __init__(self) -> None:
        self.written, self.closed = b"", False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("198.51.100.4", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


@pytest.fixture
def clock() -> Iterator[Clock]:
    loop = asyncio.new_event_loop()
    try:
        yield Clock(loop)
    finally:
        loop.close()


def _connection(clock: Clock) -> tuple[HttpConnection, Transport]:
    settings = settings_from_mapping(
        {
            "server": {"host": "127.0.0.1", "port": 0, "handshake_timeout": HANDSHAKE_TIMEOUT},
            "audit": {"enabled": False},
            "apps": [{"id": "1", "key": "app-key", "secret": "app-secret-0123456789"}],
        },
        environ={},
    )
    node = Node(settings, clock.loop)
    node.ctx.loop = node.ctx.deadlines.loop = clock  # type: ignore[assignment]
    connection = HttpConnection(node.ctx)
    transport = Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    return connection, transport


def test_a_request_head_not_complete_in_time_is_cut_at_the_handshake_timeout(
    clock: Clock,
) -> None:
    connection, transport = _connection(clock)
    connection.data_received(HEALTHZ[:10])
    clock.advance(HANDSHAKE_TIMEOUT - 0.01)
    assert not transport.closed
    clock.advance(0.01 + TICK)
    assert transport.closed


def test_a_kept_alive_connection_outlives_the_handshake_timeout(clock: Clock) -> None:
    connection, transport = _connection(clock)
    clock.advance(HANDSHAKE_TIMEOUT / 2)
    connection.data_received(HEALTHZ)
    assert transport.written.startswith(b"HTTP/1.1 200 ")
    # The handshake deadline's slot comes now: it must only be joined again for the rest.
    clock.advance(HANDSHAKE_TIMEOUT)
    assert not transport.closed
    clock.advance(KEEPALIVE_SECONDS - HANDSHAKE_TIMEOUT - 0.01)
    assert not transport.closed
    # Idle for the keep-alive time after the answer: closed, and never counted.
    clock.advance(0.01 + TICK)
    assert transport.closed


def test_every_request_moves_the_idle_deadline(clock: Clock) -> None:
    connection, transport = _connection(clock)
    for _ in range(5):
        connection.data_received(HEALTHZ)
        clock.advance(KEEPALIVE_SECONDS - 1)
    assert not transport.closed
    assert transport.written.count(b"HTTP/1.1 200 ") == 5
    # One deadline at a time, however many requests moved it.
    assert len(connection.ctx.deadlines) == 1
    clock.advance(1 + TICK)
    assert transport.closed


def test_a_closed_connection_leaves_no_deadline(clock: Clock) -> None:
    connection, _ = _connection(clock)
    connection.data_received(HEALTHZ)
    assert len(connection.ctx.deadlines) == 1
    connection.connection_lost(None)
    assert len(connection.ctx.deadlines) == 0
