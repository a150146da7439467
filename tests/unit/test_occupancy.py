"""The occupancy scripts against the real Redis at 127.0.0.1:6379 (unique prefix each)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
import redis.asyncio as aioredis

from bastion.adapters.occupancy import Occupancy

URL = "redis://127.0.0.1:6379/0"
TTL_MS = 60_000


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    """A client of the shared Redis; the test's keys are deleted afterwards."""
    redis = aioredis.from_url(URL)
    yield redis
    await redis.aclose()


@pytest.fixture
async def prefix(client: aioredis.Redis) -> AsyncIterator[str]:
    """A key prefix no other test uses (its keys are deleted at teardown)."""
    name = f"test-occ-{uuid4().hex}"
    yield name
    keys = [key async for key in client.scan_iter(match=f"{name}:*")]
    if keys:
        await client.delete(*keys)


def node(client: aioredis.Redis, prefix: str, node_id: str) -> Occupancy:
    return Occupancy(client, prefix, node_id, TTL_MS)


async def test_first_holder_occupies_and_last_holder_vacates(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    assert await a.on("1:news") is True
    assert await b.on("1:news") is False
    assert await a.on("1:news") is False  # idempotent: re-asserting is no change
    assert await a.off("1:news") is False
    assert await a.off("1:news") is False  # not a holder any more: decides nothing
    assert await b.off("1:news") is True
    assert await client.exists(f"{prefix}:occ:1:news") == 0
    assert await a.held() == set() and await b.held() == set()


async def test_held_lists_the_entries_of_one_node(client: aioredis.Redis, prefix: str) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    await a.on("1:news")
    await a.on("2:private-x:y")
    await b.on("1:other")
    assert await a.held() == {"1:news", "2:private-x:y"}
    assert await b.held() == {"1:other"}
    assert await client.hkeys(f"{prefix}:occ:1:news") == [b"a"]


async def test_beat_registers_and_says_when_the_node_was_not_registered(
    client: aioredis.Redis, prefix: str
) -> None:
    a = node(client, prefix, "a")
    assert await a.beat() is True
    assert await a.beat() is False
    assert 0 < await client.pttl(f"{prefix}:node:a") <= TTL_MS
    assert await client.smembers(f"{prefix}:nodes") == {b"a"}
    await a.leave()
    assert await client.exists(f"{prefix}:node:a") == 0
    assert await client.smembers(f"{prefix}:nodes") == set()


async def test_a_dead_node_is_reaped_once_reporting_only_its_own_channels(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b, c = (node(client, prefix, name) for name in "abc")
    for each in (a, b, c):
        await each.beat()
    await a.on("1:only-a")
    await a.on("1:shared")
    await b.on("1:shared")
    await a.on("2:also-a")
    assert await b.dead_nodes() == []
    await client.delete(f"{prefix}:node:a")  # its liveness key expired
    assert await b.dead_nodes() == ["a"] and await c.dead_nodes() == ["a"]
    assert await b.reap("a") == ["1:only-a", "2:also-a"]
    assert await c.reap("a") == []  # the other survivor finds nothing left
    assert await client.hkeys(f"{prefix}:occ:1:shared") == [b"b"]
    assert await client.exists(f"{prefix}:occ:1:only-a", f"{prefix}:nodeocc:a") == 0
    assert await client.smembers(f"{prefix}:nodes") == {b"b", b"c"}
    assert await b.dead_nodes() == []


async def test_a_node_alive_again_is_not_reaped(client: aioredis.Redis, prefix: str) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    await a.beat()
    await a.on("1:news")
    assert await b.reap("a") == []  # its key exists: the script changes nothing
    assert await a.held() == {"1:news"}
    assert await client.smembers(f"{prefix}:nodes") == {b"a"}


async def test_a_reaped_node_learns_it_from_its_next_beat(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    await a.beat()
    await a.on("1:news")
    await client.delete(f"{prefix}:node:a")
    assert await b.reap("a") == ["1:news"]
    assert await a.beat() is True
    assert await a.held() == set()
    assert await a.on("1:news") is True  # re-asserted: occupied again, after the vacated


async def test_scripts_survive_a_script_flush(client: aioredis.Redis, prefix: str) -> None:
    a = node(client, prefix, "a")
    assert await a.on("1:news") is True
    await client.script_flush()
    assert await a.off("1:news") is True  # EVALSHA falls back to loading the script
