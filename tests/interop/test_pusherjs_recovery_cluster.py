"""Recovery with the real pusher-js and the add-on across two nodes over the real Redis.

Two ``bastion serve`` processes share the Redis at 127.0.0.1:6379 (a key prefix of
their own). pusher-js connects to node A through a proxy; when A drains (4200)
or the connection is reset, the proxy sends its reconnect to node B, which
recovers what was published meanwhile (on either node) from Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import uuid4

import pytest
from support.proxy import TcpProxy
from support.server import DEFAULT_APP, BastionProcess

from .node_driver import NodeDriver
from .test_pusherjs_recovery import (
    connect_through,
    numbers,
    publish,
    wait_left,
    wait_number,
    wait_recovery,
)

HISTORY_APP: dict[str, Any] = {**DEFAULT_APP, "history": {"channel_prefixes": ["chat-"]}}


@pytest.fixture
def nodes(make_bastion: Callable[..., BastionProcess]) -> tuple[BastionProcess, BastionProcess]:
    adapter = {
        "driver": "redis",
        "url": "redis://127.0.0.1:6379/0",
        "prefix": f"interop-{uuid4().hex}",
    }
    first: BastionProcess = make_bastion(apps=[HISTORY_APP], adapter=adapter)
    second: BastionProcess = make_bastion(apps=[HISTORY_APP], adapter=adapter)
    return first, second


def test_a_drain_then_a_reconnect_to_another_node_loses_nothing(
    make_driver: Callable[..., NodeDriver], nodes: tuple[BastionProcess, BastionProcess]
) -> None:
    a, b = nodes
    with TcpProxy(a.port) as proxy:
        driver = make_driver(a)
        connect_through(driver, proxy)
        publish(driver, 1, port=b.port)  # recorded by B, delivered by A
        wait_number(driver, "a", 1)
        proxy.pause()
        proxy.retarget(b.port)
        a.stop()  # SIGTERM: the drain closes pusher-js with 4200
        closed = driver.wait_event(kind="conn_error", client="a")
        assert closed["error"]["data"]["code"] == 4200
        publish(driver, 2, 3, port=b.port)
        proxy.resume()
        answer = wait_recovery(driver, "a")
        assert answer["recovered"] is True
        assert answer["replayed"] == 2
        publish(driver, 4, port=b.port)
        wait_number(driver, "a", 4)
        assert numbers(driver, "a") == [1, 2, 3, 4]


def test_a_reset_then_a_reconnect_to_another_node_loses_nothing(
    make_driver: Callable[..., NodeDriver], nodes: tuple[BastionProcess, BastionProcess]
) -> None:
    a, b = nodes
    with TcpProxy(a.port) as proxy:
        driver = make_driver(a)
        connect_through(driver, proxy)
        publish(driver, 1)
        wait_number(driver, "a", 1)
        proxy.pause()
        proxy.retarget(b.port)
        assert proxy.reset() == 1
        wait_left(driver, "a")
        publish(driver, 2)  # on A
        publish(driver, 3, port=b.port)  # on B
        proxy.resume()
        answer = wait_recovery(driver, "a")
        assert answer["recovered"] is True and answer["replayed"] == 2
        publish(driver, 4)  # on A, delivered by B
        wait_number(driver, "a", 4)
        assert numbers(driver, "a") == [1, 2, 3, 4]
