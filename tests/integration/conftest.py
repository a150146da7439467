"""Fixtures for the integration tests: a real Bastion node in-process on 127.0.0.1.

* ``make_node(server=..., app=..., extra_apps=..., security=..., wall_clock=...)``
  starts a :class:`Node` on an OS-chosen port with the default app (id ``12345``, key
  ``app-key``, client events on) plus a second app (``67890``/``other-key``); every
  node is stopped at teardown. ``security`` overrides ``[security]`` keys over
  :data:`TEST_SECURITY` (every test connects from 127.0.0.1).
* ``node`` is a node with the defaults.
* ``connect(node, ...)`` opens a :class:`PusherClient` (closed at teardown).
* ``sdk`` is the official PyPI ``pusher`` SDK pointed at ``node`` (call it through
  :func:`asyncio.to_thread`: it blocks, and the server runs on this loop).
* ``logs`` captures every ``bastion`` record from INFO up and checks the hygiene
  rules: no record above WARNING, no stack trace.
* ``make_cluster(n, prefix=...)`` starts n nodes on the shared Redis with the redis
  adapter; ``prefix`` is a key prefix no other test uses, ``shared_redis`` a plain
  client of that Redis, ``clients(node)`` a connected client closed at teardown.
* ``still_serving`` asserts a fresh client can subscribe and receive a REST event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

import pusher
import pytest
import redis.asyncio as aioredis
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    DEFAULT_QUERY,
    OTHER_APP_ID,
    OTHER_APP_KEY,
    OTHER_APP_SECRET,
    PusherClient,
    RawWebSocket,
    make_sdk,
    open_client,
)
from support.server import config_toml

from bastion.config import settings_from_mapping
from bastion.server.runtime import Node

MakeNode = Callable[..., Awaitable[Node]]
Connect = Callable[..., Awaitable[PusherClient]]


#: ``[security]`` for test nodes. Every test connects from 127.0.0.1, so the suite as
#: a whole is one very busy address: the fuzz tests open far more connections than
#: the product's new-connection burst, and send bad signatures on purpose far past
#: its failed-authentication budget. Tests of the limits set their own small values.
TEST_SECURITY: Mapping[str, Any] = {
    "new_connections_per_ip": {"rate": 1000, "burst": 10000},
    "auth_failures_per_ip": {"rate": 1000, "burst": 10000},
}


def node_settings(
    server: Mapping[str, Any] | None = None,
    app: Mapping[str, Any] | None = None,
    extra_apps: list[Mapping[str, Any]] | tuple[Mapping[str, Any], ...] = (),
    security: Mapping[str, Any] | None = None,
    state_dir: Path | None = None,
) -> Any:
    """Settings for a test node: defaults, overridden by the given mappings.

    With ``state_dir``, the audit log and the blocks file live there (unless the
    overrides name their own paths) instead of the working directory.
    """
    server_settings = {"host": "127.0.0.1", "port": 0, "activity_timeout": 120, **(server or {})}
    main = {
        "id": APP_ID,
        "key": APP_KEY,
        "secret": APP_SECRET,
        "enable_client_messages": True,
        **(app or {}),
    }
    other = {"id": OTHER_APP_ID, "key": OTHER_APP_KEY, "secret": OTHER_APP_SECRET}
    security_table: dict[str, Any] = {**TEST_SECURITY, **(security or {})}
    document: dict[str, Any] = {
        "server": server_settings,
        "security": security_table,
        "apps": [main, other, *extra_apps],
    }
    if state_dir is not None:
        document["audit"] = {"path": str(state_dir / "audit.sqlite3")}
        security_table["reputation"] = {
            "store_path": str(state_dir / "blocks.sqlite3"),
            **security_table.get("reputation", {}),
        }
    return settings_from_mapping(document, environ={})


RunNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def run_node() -> AsyncIterator[RunNode]:
    """Factory: ``await run_node(settings)`` starts a node; all are stopped at teardown.

    ``wall_clock=`` gives the node a clock the test moves (see :class:`Node`).
    """
    nodes: list[Node] = []

    async def factory(settings: Any, *, wall_clock: Callable[[], float] = time.time) -> Node:
        node = Node(settings, asyncio.get_running_loop(), wall_clock=wall_clock)
        await node.start()
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        if not node.ctx.draining:  # a test may have drained it already
            await node.stop()


@pytest.fixture
async def make_node(
    tmp_path_factory: pytest.TempPathFactory, run_node: RunNode
) -> AsyncIterator[MakeNode]:
    """Factory: start a node with overrides; every node is stopped at teardown."""

    async def factory(
        *,
        server: Mapping[str, Any] | None = None,
        app: Mapping[str, Any] | None = None,
        extra_apps: tuple[Mapping[str, Any], ...] = (),
        security: Mapping[str, Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> Node:
        settings = node_settings(
            server, app, extra_apps, security, state_dir=tmp_path_factory.mktemp("node")
        )
        return await run_node(settings, wall_clock=wall_clock)

    yield factory


@pytest.fixture
async def node(make_node: MakeNode) -> Node:
    """A node with the default settings."""
    return await make_node()


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Factory: ``await connect(node, key=..., query=...)`` → a connected client."""
    opened: list[PusherClient] = []

    async def factory(node: Node, key: str = APP_KEY, query: str = DEFAULT_QUERY) -> PusherClient:
        client = await open_client(node.port, key, query)
        opened.append(client)
        return client

    yield factory
    for client in opened:
        with contextlib.suppress(OSError, TimeoutError):
            await client.close()


@pytest.fixture
async def raw_sockets() -> AsyncIterator[list[RawWebSocket]]:
    """A list the test appends its raw sockets to; all are closed at teardown."""
    sockets: list[RawWebSocket] = []
    yield sockets
    for raw in sockets:
        await raw.close()


@pytest.fixture
def sdk(node: Node) -> pusher.Pusher:
    """The official Python SDK for the default app on ``node``."""
    return make_sdk(node.port)


class LogCheck:
    """What the server logged during the test, and the hygiene rules for it."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def assert_clean(self) -> None:
        """No record above WARNING and no stack trace, from any logger."""
        bad = [
            record
            for record in self.caplog.records
            if record.levelno > logging.WARNING or record.exc_info or record.exc_text
        ]
        assert not bad, [(r.name, r.levelname, r.getMessage()) for r in bad]

    def refusals(self, slug: str) -> list[logging.LogRecord]:
        """The refusal records logged for ``slug``."""
        return [
            record
            for record in self.caplog.records
            if record.name == "bastion.refusals" and f"reason={slug} " in record.getMessage()
        ]

    def assert_refusal_logged(self, slug: str) -> None:
        """The refusal was logged, at most at WARNING, without a stack trace."""
        records = self.refusals(slug)
        assert records, f"no refusal log record for {slug}"
        for record in records:
            assert record.levelno <= logging.WARNING
            assert not record.exc_info


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> LogCheck:
    """Capture the server's records from INFO up (every logger from WARNING up)."""
    caplog.set_level(logging.INFO, logger="bastion")
    return LogCheck(caplog)


@pytest.fixture
def still_serving(
    node: Node, connect: Connect, sdk: pusher.Pusher
) -> Callable[[], Awaitable[None]]:
    """Assert that ``node`` still serves: a fresh client subscribes and gets a REST event."""

    async def check() -> None:
        client = await connect(node)
        await client.subscribed("healthy-channel")
        await asyncio.to_thread(sdk.trigger, "healthy-channel", "still-alive", {"ok": True})
        event = await client.expect("still-alive", "healthy-channel")
        assert event["data"] == '{"ok": true}'

    return check


# --- clusters over the shared Redis (test_redis_cluster.py, test_cluster_occupancy.py) ---

SHARED_REDIS = "redis://127.0.0.1:6379/0"

MakeCluster = Callable[..., Awaitable[list[Node]]]


def cluster_server_toml(prefix: str, state: Path, heartbeat_seconds: float) -> str:
    """The TOML of a ``bastion serve`` process joining a test cluster (to SIGKILL it).

    The same apps as the in-process nodes: their secrets derive the cluster key,
    which authenticates bus messages and the values shown to clients.
    """
    return config_toml(
        apps=[
            {"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET},
            {"id": OTHER_APP_ID, "key": OTHER_APP_KEY, "secret": OTHER_APP_SECRET},
        ],
        adapter={
            "driver": "redis",
            "url": SHARED_REDIS,
            "prefix": prefix,
            "heartbeat_seconds": heartbeat_seconds,
        },
        audit={"path": str(state / "audit.sqlite3")},
        security={**TEST_SECURITY, "reputation": {"store_path": str(state / "b.sqlite3")}},
    )


@pytest.fixture
async def make_cluster(tmp_path: Path, run_node: RunNode) -> AsyncIterator[MakeCluster]:
    """Factory: ``await make_cluster(n, url=..., prefix=...)`` → n started nodes."""
    nodes: list[Node] = []

    async def factory(
        count: int,
        *,
        url: str = SHARED_REDIS,
        prefix: str,
        app: Mapping[str, Any] | None = None,
        **adapter: Any,
    ) -> list[Node]:
        started = []
        for _ in range(count):
            state = tmp_path / f"node-{len(nodes)}"
            state.mkdir()
            document: dict[str, Any] = {
                "server": {"host": "127.0.0.1", "port": 0, "activity_timeout": 120},
                "adapter": {"driver": "redis", "url": url, "prefix": prefix, **adapter},
                "audit": {"path": str(state / "audit.sqlite3")},
                "security": {
                    **TEST_SECURITY,
                    "reputation": {"store_path": str(state / "blocks.sqlite3")},
                },
                "apps": [
                    {
                        "id": APP_ID,
                        "key": APP_KEY,
                        "secret": APP_SECRET,
                        "enable_client_messages": True,
                        **(app or {}),
                    },
                    {"id": OTHER_APP_ID, "key": OTHER_APP_KEY, "secret": OTHER_APP_SECRET},
                ],
            }
            node = await run_node(settings_from_mapping(document, environ={}))
            nodes.append(node)
            started.append(node)
        return started

    yield factory


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[Node], Awaitable[PusherClient]]]:
    """Factory: a connected client on a node (closed at teardown)."""
    opened: list[PusherClient] = []

    async def factory(node: Node) -> PusherClient:
        client = await open_client(node.port)
        opened.append(client)
        return client

    yield factory
    for client in opened:
        with contextlib.suppress(OSError, TimeoutError):
            await client.close()


@pytest.fixture
async def shared_redis() -> AsyncIterator[aioredis.Redis]:
    """A plain client of the shared Redis (for NUMSUB and forged publishes)."""
    client = aioredis.from_url(SHARED_REDIS)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses."""
    return f"test-{uuid4().hex}"
