"""IP reputation on a real node: bad signatures get 127.0.0.1 blocked, then the block expires.

Loopback is on the default ``never_block`` list (which keeps the rest of the suite
safe from automatic blocks), so these nodes clear it. Each node has its own blocks
file and audit log under ``tmp_path``. The only time-based wait is the 1-second
block expiry, and it is polled with a bounded, scaled deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    http_request,
    open_client,
    served,
    signed_target,
)
from support.timeouts import until

from bastion.config import settings_from_mapping
from bastion.server.runtime import Node
from bastion.store.audit import query
from bastion.store.blocks import list_active

from .conftest import RunNode

EVENTS = f"/apps/{APP_ID}/events"
TRIGGER = json.dumps({"name": "e", "channels": ["c"], "data": "{}"}).encode()


def reputation_settings(tmp_path: Path, **reputation: Any) -> Any:
    return settings_from_mapping(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "audit": {"path": str(tmp_path / "audit.sqlite3")},
            "security": {
                "reputation": {
                    "never_block": [],
                    "store_path": str(tmp_path / "blocks.sqlite3"),
                    "sync_seconds": 0.1,
                    **reputation,
                }
            },
            "apps": [{"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET}],
        },
        environ={},
    )


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node(tmp_path: Path, run_node: RunNode) -> AsyncIterator[StartNode]:

    async def factory(**reputation: Any) -> Node:
        return await run_node(reputation_settings(tmp_path, **reputation))

    yield factory


async def bad_signature(port: int) -> int:
    target = signed_target("POST", EVENTS, body=TRIGGER, secret="not-the-secret")
    return (await http_request(port, "POST", target, TRIGGER)).status


async def test_bad_signatures_block_the_address(tmp_path: Path, start_node: StartNode) -> None:
    node = await start_node(threshold=30)  # three bad signatures of 10 points
    client = await open_client(node.port)
    assert [await bad_signature(node.port) for _ in range(3)] == [401, 401, 401]

    # The open WebSocket of that address is closed (4100: reconnect with back-off) ...
    closed = await client.closed()
    assert closed.code == 4100
    # ... and every new TCP connection is dropped at accept, with no HTTP answer.
    for _ in range(3):
        assert not await served(node.port)
    assert node.metrics.refusals[("ip_blocked", "")] == 3

    # Persisted (off the loop) for the CLI and for restarts.
    async def persisted() -> bool:
        return bool(
            await asyncio.to_thread(list_active, tmp_path / "blocks.sqlite3", now=time.time())
        )

    await until(persisted)
    [block] = list_active(tmp_path / "blocks.sqlite3", now=time.time())
    assert (block.ip, block.source) == ("127.0.0.1", "auto")
    assert 800 < block.until - time.time() <= 900

    await node.stop()  # flushes the audit writer
    audit = tmp_path / "audit.sqlite3"
    [event] = query(audit, type="ip_blocked_auto")
    assert (event.ip, event.severity) == ("127.0.0.1", "warning")
    assert event.metadata["score"] == pytest.approx(30, rel=1e-3)
    assert event.metadata["until"] == block.until
    # Knocking is counted every time; the audit log has the first knock at once and
    # the repeats as one aggregated row (written at the stop), with the exact count.
    first, *repeats = sorted(query(audit, type="ip_blocked"), key=lambda e: e.time)
    assert "count" not in first.metadata and len(repeats) == 1
    assert repeats[0].metadata["count"] == 2 and repeats[0].ip == "127.0.0.1"


async def test_block_expires_after_block_seconds(start_node: StartNode) -> None:
    node = await start_node(threshold=20, block_seconds=1)
    assert [await bad_signature(node.port) for _ in range(2)] == [401, 401]
    assert not await served(node.port)
    await until(lambda: served(node.port))  # the only time-based wait: one second
    client = await open_client(node.port)  # and WebSockets are served again
    await client.close()


async def test_a_restart_keeps_the_block(tmp_path: Path, start_node: StartNode) -> None:
    first = await start_node(threshold=10)
    assert await bad_signature(first.port) == 401
    await first.stop()  # waits for the pending write
    second = await start_node(threshold=10)
    assert second.blocklist is not None and len(second.blocklist.blocks) == 1
    assert not await served(second.port)


async def test_never_block_addresses_are_never_blocked(start_node: StartNode) -> None:
    node = await start_node(threshold=10, never_block=["127.0.0.0/8"])
    for _ in range(5):
        assert await bad_signature(node.port) == 401
    assert node.blocklist is not None
    assert len(node.blocklist.blocks) == 0 and len(node.blocklist.reputation) == 0
    assert await served(node.port)


async def test_reputation_disabled_scores_nothing(start_node: StartNode) -> None:
    node = await start_node(threshold=10, enabled=False)
    for _ in range(3):
        assert await bad_signature(node.port) == 401
    assert node.blocklist is not None
    assert node.blocklist.on_refusal not in node.refusals.listeners
    assert len(node.blocklist.blocks) == 0
    assert await served(node.port)


async def test_bad_blocks_path_fails_start_up(tmp_path: Path) -> None:
    from bastion.store.blocks import BlockStoreError

    settings = reputation_settings(tmp_path, store_path=str(tmp_path / "nope" / "b.sqlite3"))
    node = Node(settings, asyncio.get_running_loop())
    with pytest.raises(BlockStoreError, match="nope"):
        await node.start()
    assert node.audit is None and node.blocklist is None


async def test_a_stored_block_of_a_never_block_address_is_ignored(
    tmp_path: Path, start_node: StartNode
) -> None:
    from bastion.security.reputation import Block
    from bastion.store.blocks import BlockStore

    now = time.time()
    with BlockStore(tmp_path / "blocks.sqlite3") as store:  # e.g. a CLI run with another config
        store.block(Block("127.0.0.1", now + 600, "x", "manual", now), now=now)
    node = await start_node(never_block=["127.0.0.0/8"])
    assert node.blocklist is not None and len(node.blocklist.blocks) == 0
    with BlockStore(tmp_path / "blocks.sqlite3") as store:
        store.block(Block("127.0.0.2", now + 600, "x", "manual", now), now=now)
        store.block(Block("192.0.2.1", now + 600, "x", "manual", now), now=now)
    await node.blocklist.sync()
    assert [block.ip for block in node.blocklist.blocks.active(time.time())] == ["192.0.2.1"]
    assert await served(node.port)
