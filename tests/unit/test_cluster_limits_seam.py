"""The LimiterFactory seam: every shared limit is asked of the node's factory, by name.

A recording factory stands in for the cluster (it builds memory limiters and notes
what it was asked), so these tests need neither Redis nor sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bastion.adapters.replay import LocalReplayClaims
from bastion.api.rest import RestApi
from bastion.config import settings_from_mapping
from bastion.metrics import Metrics
from bastion.protocol.refusals import Reason
from bastion.security.limits import DEFAULT_MAX_KEYS, RateLimiter, memory_limiters
from bastion.server.context import Outbox, ServerContext
from bastion.server.refusals import RefusalPath

from .test_hub import World


class Recording:
    """A LimiterFactory that records each request and builds a memory limiter."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, float, float, int, Callable[[], float]]] = []
        self.built: dict[str, RateLimiter] = {}

    def __call__(
        self, name: str, rate: float, burst: float, max_keys: int, clock: Callable[[], float]
    ) -> RateLimiter:
        self.asked.append((name, rate, burst, max_keys, clock))
        limiter = self.built[name] = memory_limiters(name, rate, burst, max_keys, clock)
        return limiter


def test_the_app_client_event_bucket_comes_from_the_factory_keyed_by_app() -> None:
    world = World(enable_client_messages=True, client_events_per_app={"rate": 1, "burst": 2})
    factory = Recording()
    world.hub.limiters = factory
    a, b = world.client(), world.client()
    for client in (a, b):
        world.subscribe(client, "private-room")
    world.client_event(a, "private-room")
    world.client_event(b, "private-room")
    assert world.refused_client_event(a, "private-room") is Reason.CLIENT_EVENT_APP_RATE
    [(name, rate, burst, max_keys, clock)] = factory.asked  # built once, on first use
    assert (name, rate, burst, max_keys) == ("client_events_app", 1, 2, 1)
    assert clock is world.clock  # the hub's clock is what it passes as ``now``
    assert factory.built[name].available(world.app.id, world.clock()) < 1


def test_the_rest_app_bucket_comes_from_the_factory_keyed_by_app() -> None:
    world = World(rest_requests={"rate": 0.5, "burst": 1})
    factory = Recording()
    metrics = Metrics()
    rest = RestApi(world.hub, RefusalPath(metrics), metrics, LocalReplayClaims(), limiters=factory)
    now = time.time()
    assert rest._app_rate(world.app, now) == 0.0
    assert rest._app_rate(world.app, now) > 0
    [(name, rate, burst, max_keys, clock)] = factory.asked
    assert (name, rate, burst, max_keys, clock) == ("rest_app", 0.5, 1, 1, time.time)


def test_the_per_address_limits_come_from_the_factory() -> None:
    settings = settings_from_mapping(
        {
            "security": {"rest_requests_per_ip": {"rate": 3, "burst": 4}},
            "apps": [{"id": "1", "key": "k", "secret": "s"}],
        },
        environ={},
    )
    world = World()
    factory = Recording()
    metrics = Metrics()
    refusals = RefusalPath(metrics)
    loop = asyncio.new_event_loop()
    try:
        ctx = ServerContext(
            settings,
            world.hub,
            refusals,
            metrics,
            loop,
            RestApi(world.hub, refusals, metrics, LocalReplayClaims()),
            Outbox(loop),
            limiters=factory,
        )
    finally:
        loop.close()
    asked = {
        name: (rate, burst, max_keys, clock) for name, rate, burst, max_keys, clock in factory.asked
    }
    assert set(asked) == {"auth_fail_ip", "rest_ip", "new_conn_ip"}
    assert asked["rest_ip"] == (3, 4, DEFAULT_MAX_KEYS, time.time)
    assert ctx.rest_requests is factory.built["rest_ip"]
    assert ctx.auth_failures is factory.built["auth_fail_ip"]
    assert ctx.admission.new_connections is factory.built["new_conn_ip"]
