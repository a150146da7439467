"""The cluster-state scripts against the real Redis at 127.0.0.1:6379 (unique prefix each)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
import redis.asyncio as aioredis

from bastion.adapters.redis.scripts import (
    FORGED_CACHE,
    FORGED_MEMBER,
    SCAN_BATCH,
    Reaped,
    StateScripts,
    connection_tag,
    member_tag,
    open_value,
    seal,
    split_tag,
)
from bastion.adapters.wire import cluster_key

URL = "redis://127.0.0.1:6379/0"
TTL_MS = 60_000
KEY = cluster_key("c" * 32, [])


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


FORGED: list[str] = []


def node(client: aioredis.Redis, prefix: str, node_id: str) -> StateScripts:
    return StateScripts(client, prefix, node_id, TTL_MS, KEY, FORGED.append)


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
    assert await b.reap("a") == Reaped(["1:only-a", "2:also-a"], [], [])
    assert await c.reap("a") == Reaped([], [], [])  # the other survivor finds nothing left
    assert await client.hkeys(f"{prefix}:occ:1:shared") == [b"b"]
    assert await client.exists(f"{prefix}:occ:1:only-a", f"{prefix}:nodeocc:a") == 0
    assert await client.smembers(f"{prefix}:nodes") == {b"b", b"c"}
    assert await b.dead_nodes() == []


async def test_a_node_alive_again_is_not_reaped(client: aioredis.Redis, prefix: str) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    await a.beat()
    await a.on("1:news")
    assert await b.reap("a") == Reaped([], [], [])  # its key exists: nothing changes
    assert await a.held() == {"1:news"}
    assert await client.smembers(f"{prefix}:nodes") == {b"a"}


async def test_a_reaped_node_learns_it_from_its_next_beat(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    await a.beat()
    await a.on("1:news")
    await client.delete(f"{prefix}:node:a")
    assert (await b.reap("a")).vacated == ["1:news"]
    assert await a.beat() is True
    assert await a.held() == set()
    assert await a.on("1:news") is True  # re-asserted: occupied again, after the vacated


async def test_scripts_survive_a_script_flush(client: aioredis.Redis, prefix: str) -> None:
    a = node(client, prefix, "a")
    assert await a.on("1:news") is True
    await client.script_flush()
    assert await a.off("1:news") is True  # EVALSHA falls back to loading the script


async def test_the_channel_set_follows_occupancy(client: aioredis.Redis, prefix: str) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    await a.on("1:news")
    await b.on("1:news")
    await b.on("1:presence-room")
    await a.on("2:other-app")
    assert sorted(await a.occupied("1")) == ["news", "presence-room"]
    assert sorted(await a.occupied("2")) == ["other-app"]
    await a.off("1:news")
    assert sorted(await a.occupied("1")) == ["news", "presence-room"]  # b still holds it
    await b.off("1:news")
    assert sorted(await b.occupied("1")) == ["presence-room"]


async def test_occupied_lists_an_apps_channels_by_prefix_with_their_counts(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    await a.on("1:news")
    await b.on("1:news")
    await a.counts({"1:news": 2})
    await b.counts({"1:news": 3})
    await a.on("1:presence-room")
    await a.member_on(member_tag("1:presence-room", "alice"), "null")
    await a.on("2:news")
    assert await b.occupied("1") == {"news": (5, 0), "presence-room": (1, 1)}
    assert await b.occupied("1", "presence-") == {"presence-room": (1, 1)}
    assert await b.occupied("3") == {}


async def test_counts_add_up_over_nodes_and_never_resurrect(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    await a.on("1:news")
    await b.on("1:news")
    await a.counts({"1:news": 3})
    await b.counts({"1:news": 2})
    assert await a.channel_info(["1:news", "1:empty"]) == [(True, 5, 0), (False, 0, 0)]
    await a.off("1:news")
    await a.counts({"1:news": 7})  # late: a holds nothing, so nothing is written
    assert await a.channel_info(["1:news"]) == [(True, 2, 0)]
    assert await a.on("1:news") is False  # re-joining starts its count at 1
    assert await b.channel_info(["1:news"]) == [(True, 3, 0)]


async def test_a_member_is_added_and_removed_once_for_the_cluster(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    tag = member_tag("1:presence-room", "alice")
    assert split_tag(tag) == ("1", "presence-room", "alice")
    assert await a.member_on(tag, '{"name":"A"}') is True
    assert await a.member_on(tag, '{"name":"A"}') is False  # idempotent
    assert await b.member_on(tag, '{"name":"other"}') is False  # present already
    assert await a.members("1:presence-room") == {"alice": '{"name":"A"}'}
    assert await a.channel_info(["1:presence-room"]) == [(False, 0, 1)]
    assert await a.member_off(tag) is False  # still on b
    assert await a.member_off(tag) is False  # a holds nothing: decides nothing
    assert await b.member_off(tag) is True
    assert await a.members("1:presence-room") == {}
    assert await a.held_members() == set() and await b.held_members() == set()


async def test_users_come_online_and_go_offline_once(client: aioredis.Redis, prefix: str) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    assert await a.user_on("1\nalice") is True
    assert await b.user_on("1\nalice") is False
    assert await a.online("1", ["alice", "bob"]) == {"alice"}
    assert await a.online("2", ["alice"]) == set()  # per app
    assert await a.user_off("1\nalice") is False
    assert await b.user_off("1\nalice") is True
    assert await a.online("1", ["alice"]) == set()


async def test_a_users_connections_are_counted_once_each_oldest_replaced_first(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    first, second = connection_tag("1", "alice", "1.1"), connection_tag("1", "alice", "2.2")
    assert await a.claim_connection(first, 2, close_oldest=False) == []
    assert await a.claim_connection(first, 2, close_oldest=False) == []  # counted once
    assert await b.claim_connection(second, 2, close_oldest=False) == []
    third = connection_tag("1", "alice", "3.3")
    assert await b.claim_connection(third, 2, close_oldest=False) is None  # refused
    assert await a.connections("1", "alice") == ["a\n1.1", "b\n2.2"]
    # Another app's or user's count is its own.
    assert (
        await a.claim_connection(connection_tag("2", "alice", "4.4"), 1, close_oldest=False) == []
    )
    assert await a.claim_connection(connection_tag("1", "bob", "5.5"), 1, close_oldest=False) == []
    # Past the cap with close_oldest: the oldest goes, from its node's set too.
    assert await b.claim_connection(third, 2, close_oldest=True) == ["1.1"]
    assert await a.connections("1", "alice") == ["b\n2.2", "b\n3.3"]
    assert await a.held_connections() == {
        connection_tag("1", "bob", "5.5"),
        connection_tag("2", "alice", "4.4"),
    }
    # A lower cap (a reload) replaces as many as it takes.
    assert await a.claim_connection(connection_tag("1", "alice", "6.6"), 1, close_oldest=True) == [
        "2.2",
        "3.3",
    ]
    assert await b.held_connections() == set()
    await a.release_connection(connection_tag("1", "alice", "6.6"))
    assert await a.connections("1", "alice") == []
    await b.assert_connection(second)  # after an outage: recorded without a limit
    await b.assert_connection(second)
    assert await a.connections("1", "alice") == ["b\n2.2"]


async def test_reaping_uncounts_the_dead_nodes_connections(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b = node(client, prefix, "a"), node(client, prefix, "b")
    for each in (a, b):
        await each.beat()
    await a.claim_connection(connection_tag("1", "alice", "1.1"), 5, close_oldest=False)
    await b.claim_connection(connection_tag("1", "alice", "2.2"), 5, close_oldest=False)
    await client.delete(f"{prefix}:node:a")
    await b.reap("a")
    assert await b.connections("1", "alice") == ["b\n2.2"]
    assert await client.exists(f"{prefix}:nodeuconn:a") == 0


async def test_reaping_removes_the_members_and_users_only_the_dead_node_had(
    client: aioredis.Redis, prefix: str
) -> None:
    a, b, c = (node(client, prefix, name) for name in "abc")
    for each in (a, b, c):
        await each.beat()
    only_a = member_tag("1:presence-room", "alice")
    shared = member_tag("1:presence-room", "bob")
    await a.on("1:presence-room")
    await b.on("1:presence-room")
    await a.member_on(only_a, '"A"')
    await a.member_on(shared, '"B"')
    await b.member_on(shared, '"B"')
    await a.user_on("1\nalice")
    await a.user_on("1\nbob")
    await b.user_on("1\nbob")
    await client.delete(f"{prefix}:node:a")
    reaped = await c.reap("a")
    assert reaped == Reaped([], [only_a], ["1\nalice"])
    assert await b.reap("a") == Reaped([], [], [])  # exactly one survivor decides
    assert await b.members("1:presence-room") == {"bob": '"B"'}
    assert await b.online("1", ["alice", "bob"]) == {"bob"}
    assert await client.exists(f"{prefix}:nodepres:a", f"{prefix}:nodeusers:a") == 0


async def test_a_cache_event_is_read_with_its_ttl(client: aioredis.Redis, prefix: str) -> None:
    a = node(client, prefix, "a")
    assert await a.cached("1:cache-news") is None
    async with client.pipeline(transaction=False) as pipe:
        a.write_cache(pipe, "1:cache-news", "update", "{}", 30_000)
        await pipe.execute()
    found = await a.cached("1:cache-news")
    assert found is not None and found[:2] == ("update", "{}") and 0 < found[2] <= 30_000


# --- what a Redis writer without the cluster key can do -----------------------------------


def test_a_sealed_value_opens_only_where_it_was_sealed() -> None:
    sealed = seal(KEY, ("member", "1:presence-a", "alice"), '{"n":1}')
    assert open_value(KEY, ("member", "1:presence-a", "alice"), sealed) == '{"n":1}'
    assert open_value(KEY, ("member", "1:presence-b", "alice"), sealed) is None  # moved
    assert open_value(KEY, ("member", "1:presence-a", "bob"), sealed) is None  # renamed
    assert (
        open_value(cluster_key("x" * 32, []), ("member", "1:presence-a", "alice"), sealed) is None
    )
    assert open_value(KEY, ("member", "1:presence-a", "alice"), '{"n":1}') is None  # bare
    tampered = sealed[:-2] + "2}"
    assert open_value(KEY, ("member", "1:presence-a", "alice"), tampered) is None


async def test_a_member_written_without_the_key_is_never_shown(
    client: aioredis.Redis, prefix: str
) -> None:
    a = node(client, prefix, "a")
    await a.member_on(member_tag("1:presence-room", "alice"), '{"name":"A"}')
    members_key = f"{prefix}:pu:1:presence-room"
    # A fake member, a real member's value copied to another user, and one altered.
    await client.hset(members_key, "mallory", '{"name":"M"}')
    real: bytes = await client.hget(members_key, "alice")  # type: ignore[assignment]
    await client.hset(members_key, "eve", real)
    FORGED.clear()
    assert await a.members("1:presence-room") == {"alice": '{"name":"A"}'}
    assert FORGED == [FORGED_MEMBER, FORGED_MEMBER]


async def test_a_cache_event_written_without_the_key_is_a_miss(
    client: aioredis.Redis, prefix: str
) -> None:
    a = node(client, prefix, "a")
    FORGED.clear()
    await client.set(f"{prefix}:cache:1:cache-news", '["update", "{}"]', px=30_000)
    assert await a.cached("1:cache-news") is None
    async with client.pipeline(transaction=False) as pipe:
        a.write_cache(pipe, "1:cache-other", "update", "{}", 30_000)
        await pipe.execute()
    moved = await client.get(f"{prefix}:cache:1:cache-other")
    await client.set(f"{prefix}:cache:1:cache-news", moved, px=30_000)  # replayed elsewhere
    assert await a.cached("1:cache-news") is None
    assert FORGED == [FORGED_CACHE, FORGED_CACHE]


async def test_occupied_reads_incrementally_and_stops_past_the_limit(
    client: aioredis.Redis, prefix: str
) -> None:
    a = node(client, prefix, "a")
    names = [f"room-{index:04d}" for index in range(1_200)] + ["other-[x]*?"]
    for name in names:
        await a.on(f"1:{name}")
    assert len(await a.occupied("1")) == len(names)  # every SSCAN step, each name once
    limited = await a.occupied("1", "room-", limit=10)
    # Stops once more than the limit is found: at most one SSCAN step's worth over it.
    assert 10 < len(limited) <= 10 + 2 * SCAN_BATCH
    assert all(name.startswith("room-") for name in limited)
    # A prefix is a prefix, not a glob: its *, ? and [ ] are literal.
    assert await a.occupied("1", "other-[x]*") == {"other-[x]*?": (1, 0)}
    assert await a.occupied("1", "other-[") == {"other-[x]*?": (1, 0)}
    assert await a.occupied("1", "room-?") == {}
