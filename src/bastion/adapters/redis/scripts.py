"""Cluster-wide channel state in Redis: the Lua scripts and their wrappers.

Values that Redis hands back to clients (a presence member's ``user_info``, a
cache channel's last event) are *sealed*: stored as ``<mac>.<json>`` with a MAC
under the cluster key over the value and where it belongs (the channel, the user
id), and opened on every read. Someone who can write to Redis but does not hold
the cluster key cannot make a node show a member or replay an event that no node
recorded there: what fails to open is dropped, counted and reported (the reads
take an ``on_forged`` callback). Counts, occupancy and sign-in tallies are
integers and sets, not sealed: such a writer can make them wrong (see
docs/scaling.md, "What a Redis writer can do").

Keys (``prefix`` from ``[adapter]``; an entry is ``{app_id}:{channel}``; a member
tag is ``{entry}\n{user_id}``, and neither part can hold a newline):

* ``{prefix}:occ:{entry}`` — a hash whose fields are the ids of the nodes with
  local subscribers of the channel, each valued with that node's subscriber count;
* ``{prefix}:chans:{app_id}`` — the set of the app's channels occupied anywhere
  (the REST ``/channels`` query reads it instead of scanning the key space);
* ``{prefix}:nodeocc:{node_id}`` — a set of the entries that node holds, so the
  node's share can be removed when it dies;
* ``{prefix}:pu:{entry}`` — a presence channel's members: user id → sealed
  ``user_info`` JSON (the first node to add the user sets it);
* ``{prefix}:pn:{entry}`` — user id → how many nodes have the user present;
* ``{prefix}:nodepres:{node_id}`` — the member tags that node holds;
* ``{prefix}:uo:{app_id}`` — signed-in user id → how many nodes have it signed in
  (watchlists' online / offline), and ``{prefix}:nodeusers:{node_id}`` the
  ``{app_id}\n{user_id}`` tags that node holds;
* ``{prefix}:uconn:{app_id}:{user_id}`` — a sorted set of the user's counted
  connections (``max_connections_per_user``): ``{node_id}\n{socket_id}`` scored
  by the Redis time of the sign-in (microseconds), oldest first; and
  ``{prefix}:nodeuconn:{node_id}`` the ``{app_id}\n{user_id}\n{socket_id}`` tags
  of the connections that node counts (user ids cannot hold ``:`` or a newline);
* ``{prefix}:node:{node_id}`` — the node's liveness key, refreshed every
  heartbeat with a TTL of three heartbeats;
* ``{prefix}:nodes`` — the set of node ids that registered liveness.

Each change runs as one script, so "was this node the first / the last holder" is
decided atomically across the cluster: a channel is occupied exactly when its hash
goes from 0 to 1 field, and vacated exactly when it goes from 1 to 0; a member is
added exactly when its node count goes from 0 to 1, and removed when it goes back
to 0. The reap script removes a dead node's channel fields and member tags and
deletes its sets in the same atomic step, so when several survivors reap the same
node, exactly one gets the vacated channels and the removed members.

The scripts compute keys from set members, so they need a single Redis (or a
primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from bastion.protocol.signing import hmac_sha256_hex

__all__ = [
    "Reaped",
    "StateScripts",
    "connection_tag",
    "member_tag",
    "open_value",
    "seal",
    "split_connection_tag",
    "split_tag",
]

#: Hex digits of a sealed value's MAC (128 bits of HMAC-SHA256).
SEAL_HEX_LENGTH = 32
#: What a forged value is reported as (``on_forged``).
FORGED_MEMBER = "forged_member"
FORGED_CACHE = "forged_cache"


def seal(key: bytes, where: tuple[str, ...], value: str) -> str:
    """``value`` with a MAC over it and ``where`` it is stored (``<mac>.<value>``)."""
    return f"{_mac(key, where, value)}.{value}"


def open_value(key: bytes, where: tuple[str, ...], sealed: str) -> str | None:
    """The value inside ``sealed``; ``None`` when its MAC is not ours for ``where``."""
    mac, dot, value = sealed.partition(".")
    if not dot or len(mac) != SEAL_HEX_LENGTH:
        return None
    if not hmac.compare_digest(mac, _mac(key, where, value)):
        return None
    return value


def _mac(key: bytes, where: tuple[str, ...], value: str) -> str:
    message = "\0".join((*where, value)).encode("utf-8", "surrogatepass")
    return hmac_sha256_hex(key, message)[:SEAL_HEX_LENGTH]


#: KEYS: occ hash, node's set, app's channel set. ARGV: node id, entry, channel.
#: Returns 1 when the hash went 0 → 1.
_ON = """
local before = redis.call('HLEN', KEYS[1])
redis.call('HSETNX', KEYS[1], ARGV[1], '1')
redis.call('SADD', KEYS[2], ARGV[2])
if before == 0 then
  redis.call('SADD', KEYS[3], ARGV[3])
  return 1
end
return 0
"""

#: KEYS: occ hash, node's set, app's channel set. ARGV: node id, entry, channel.
#: Returns 1 when the hash went 1 → 0.
_OFF = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
if removed == 1 and redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[3])
  return 1
end
return 0
"""

#: KEYS: occ hash. ARGV: node id, count. Sets this node's subscriber count, only
#: while the node holds the channel (a late count never resurrects a field), and
#: returns the cluster's total.
_COUNT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local total = 0
for _, count in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(count) end
return total
"""

#: KEYS: members hash, node counts hash, node's tag set. ARGV: tag, user id, info
#: JSON. Returns 1 when the user became present in the cluster.
_MEMBER_ON = """
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3])
if redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 then return 1 end
return 0
"""

#: KEYS: members hash, node counts hash, node's tag set. ARGV: tag, user id.
#: Returns 1 when the user left the cluster.
_MEMBER_OFF = """
if redis.call('SREM', KEYS[3], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

#: KEYS: users hash, node's user tag set. ARGV: tag, user id. Returns 1 when the
#: user signed in for the first time in the cluster.
_USER_ON = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], ARGV[2], 1) == 1 then return 1 end
return 0
"""

#: KEYS: users hash, node's user tag set. ARGV: tag, user id. Returns 1 when the
#: user's last connection in the cluster closed.
_USER_OFF = """
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], ARGV[2], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

#: KEYS: the user's connections (sorted set), this node's connection tags. ARGV:
#: member (``{node}\n{socket}``), tag, limit, 1 to close the oldest (else refuse),
#: the node tag sets' key prefix (``{prefix}:nodeuconn:``), the tag prefix of the
#: user (``{app}\n{user}\n``). Returns ``{0}`` when refused; else ``{1}`` followed by
#: the members it removed to make room (oldest first), their nodes' tags removed too.
_CLAIM_CONNECTION = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1} end
local count = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[3])
local out = {1}
if count >= limit then
  if ARGV[4] ~= '1' then return {0} end
  local last = count - limit
  for _, victim in ipairs(redis.call('ZRANGE', KEYS[1], 0, last)) do
    local cut = string.find(victim, '\\n', 1, true)
    redis.call('SREM', ARGV[5] .. string.sub(victim, 1, cut - 1),
               ARGV[6] .. string.sub(victim, cut + 1))
    table.insert(out, victim)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, last)
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000000 + tonumber(t[2]), ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return out
"""

#: KEYS: the user's connections, this node's connection tags. ARGV: member, tag.
#: Records a connection without a limit (re-asserted after an outage); its sign-in
#: time is now. Returns nothing.
_ASSERT_CONNECTION = """
if redis.call('SADD', KEYS[2], ARGV[2]) == 1 then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[1], 'NX', tonumber(t[1]) * 1000000 + tonumber(t[2]), ARGV[1])
end
return 0
"""

#: KEYS: the user's connections, this node's connection tags. ARGV: member, tag.
_RELEASE_CONNECTION = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 0
"""

#: KEYS: dead node's entry set, nodes set, dead node's liveness key, dead node's
#: tag set, dead node's user tag set, dead node's connection tag set. ARGV: dead
#: id, key prefix (``{prefix}:``). Returns the entries the dead node was the last
#: holder of, the tags of the members only it had and the user tags only it had
#: signed in (its counted connections are uncounted); nothing (and no change) when
#: the node is alive again.
_REAP = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {{}, {}, {}} end
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  local a = string.find(tag, '\\n', 1, true)
  local b = string.find(tag, '\\n', a + 1, true)
  local user = string.sub(tag, 1, a - 1) .. ':' .. string.sub(tag, a + 1, b - 1)
  local key = ARGV[2] .. 'uconn:' .. user
  redis.call('ZREM', key, ARGV[1] .. '\\n' .. string.sub(tag, b + 1))
end
local offline = {}
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  local cut = string.find(tag, '\\n', 1, true)
  local users = ARGV[2] .. 'uo:' .. string.sub(tag, 1, cut - 1)
  local user = string.sub(tag, cut + 1)
  if redis.call('HINCRBY', users, user, -1) <= 0 then
    redis.call('HDEL', users, user)
    table.insert(offline, tag)
  end
end
local removed = {}
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local cut = string.find(tag, '\\n', 1, true)
  local entry = string.sub(tag, 1, cut - 1)
  local user = string.sub(tag, cut + 1)
  local counts = ARGV[2] .. 'pn:' .. entry
  if redis.call('HINCRBY', counts, user, -1) <= 0 then
    redis.call('HDEL', counts, user)
    redis.call('HDEL', ARGV[2] .. 'pu:' .. entry, user)
    table.insert(removed, tag)
  end
end
local vacated = {}
for _, entry in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. 'occ:' .. entry
  if redis.call('HDEL', key, ARGV[1]) == 1 and redis.call('HLEN', key) == 0 then
    local cut = string.find(entry, ':', 1, true)
    local app = string.sub(entry, 1, cut - 1)
    redis.call('SREM', ARGV[2] .. 'chans:' .. app, string.sub(entry, cut + 1))
    table.insert(vacated, entry)
  end
end
redis.call('DEL', KEYS[1], KEYS[4], KEYS[5], KEYS[6])
redis.call('SREM', KEYS[2], ARGV[1])
return {vacated, removed, offline}
"""


#: KEYS: the signature's key. ARGV: repeat grace (ms), time to live (ms). Returns 1
#: when the signed request may proceed: first seen, or repeated within the grace
#: (the SDKs' same-second identical requests); 0 for a replay. Redis's clock.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('GET', KEYS[1])
if not first then
  redis.call('SET', KEYS[1], now, 'PX', ARGV[2])
  return 1
end
if now - tonumber(first) <= tonumber(ARGV[1]) then return 1 end
return 0
"""


#: ARGV: key prefix (``{prefix}:``), then entries. Returns, per entry, the number
#: of nodes holding it, its subscriber total and its presence member count: one
#: round trip and one small reply however many channels a query covers.
_CHANNEL_INFO = """
local out = {}
for i = 2, #ARGV do
  local counts = redis.call('HVALS', ARGV[1] .. 'occ:' .. ARGV[i])
  local total = 0
  for _, count in ipairs(counts) do total = total + tonumber(count) end
  table.insert(out, #counts)
  table.insert(out, total)
  table.insert(out, redis.call('HLEN', ARGV[1] .. 'pu:' .. ARGV[i]))
end
return out
"""

#: Channel names read from an app's channel set per SSCAN step: each step's
#: ``_CHANNEL_INFO`` call blocks Redis for about this many channels' work, never
#: for the whole app's.
SCAN_BATCH = 500

_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def member_tag(entry: str, user_id: str) -> str:
    """The tag of ``user_id`` present in ``entry`` (``{app_id}:{channel}``)."""
    return f"{entry}\n{user_id}"


def connection_tag(app_id: str, user_id: str, socket_id: str) -> str:
    """The tag of a counted connection: ``{app_id}\\n{user_id}\\n{socket_id}``."""
    return f"{app_id}\n{user_id}\n{socket_id}"


def split_connection_tag(tag: str) -> tuple[str, str, str]:
    """``(app_id, user_id, socket_id)`` of a connection tag."""
    app_id, _, rest = tag.partition("\n")
    user_id, _, socket_id = rest.partition("\n")
    return app_id, user_id, socket_id


def split_tag(tag: str) -> tuple[str, str, str]:
    """``(app_id, channel, user_id)`` of a member tag."""
    entry, _, user_id = tag.partition("\n")
    app_id, _, channel = entry.partition(":")
    return app_id, channel, user_id


@dataclass(frozen=True, slots=True)
class Reaped:
    """What reaping a dead node decided: entries vacated, member and user tags gone."""

    vacated: list[str]
    removed: list[str]
    offline: list[str]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class StateScripts:
    """The cluster-state operations of one node on one Redis connection.

    Args:
        client: the Redis client of the current bus session.
        prefix: the cluster's key prefix.
        node_id: this node's id.
        ttl_ms: the liveness key's time to live, milliseconds.
        key: the cluster key (seals what clients are shown).
        on_forged: told the kind of each value that failed to open (never the value).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        node_id: str,
        ttl_ms: int,
        key: bytes,
        on_forged: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._node_id = node_id
        self._ttl_ms = ttl_ms
        self._key = key
        self._on_forged = on_forged
        self._on = client.register_script(_ON)
        self._off = client.register_script(_OFF)
        self._count = client.register_script(_COUNT)
        self._member_on = client.register_script(_MEMBER_ON)
        self._member_off = client.register_script(_MEMBER_OFF)
        self._user_on = client.register_script(_USER_ON)
        self._user_off = client.register_script(_USER_OFF)
        self._claim_connection = client.register_script(_CLAIM_CONNECTION)
        self._assert_connection = client.register_script(_ASSERT_CONNECTION)
        self._release_connection = client.register_script(_RELEASE_CONNECTION)
        self._reap = client.register_script(_REAP)
        self._claim = client.register_script(_CLAIM)
        self._channel_info = client.register_script(_CHANNEL_INFO)

    # --- keys ----------------------------------------------------------------------------

    def occ_key(self, entry: str) -> str:
        """The hash of the nodes holding ``entry`` (``{app_id}:{channel}``)."""
        return f"{self._prefix}:occ:{entry}"

    def channels_key(self, app_id: str) -> str:
        """The set of the app's channels occupied anywhere in the cluster."""
        return f"{self._prefix}:chans:{app_id}"

    def node_set_key(self, node_id: str) -> str:
        """The set of entries ``node_id`` holds."""
        return f"{self._prefix}:nodeocc:{node_id}"

    def members_key(self, entry: str) -> str:
        """A presence channel's members: user id → user_info JSON."""
        return f"{self._prefix}:pu:{entry}"

    def member_counts_key(self, entry: str) -> str:
        """A presence channel's user id → number of nodes where the user is present."""
        return f"{self._prefix}:pn:{entry}"

    def node_members_key(self, node_id: str) -> str:
        """The member tags ``node_id`` holds."""
        return f"{self._prefix}:nodepres:{node_id}"

    def users_key(self, app_id: str) -> str:
        """The app's signed-in users: user id → number of nodes."""
        return f"{self._prefix}:uo:{app_id}"

    def node_users_key(self, node_id: str) -> str:
        """The ``{app_id}\\n{user_id}`` tags ``node_id`` has signed in."""
        return f"{self._prefix}:nodeusers:{node_id}"

    def connections_key(self, app_id: str, user_id: str) -> str:
        """A user's counted connections: ``{node}\\n{socket}`` by sign-in time."""
        return f"{self._prefix}:uconn:{app_id}:{user_id}"

    def node_connections_key(self, node_id: str) -> str:
        """The ``{app_id}\\n{user_id}\\n{socket_id}`` tags of the connections ``node_id`` counts."""
        return f"{self._prefix}:nodeuconn:{node_id}"

    def cache_key(self, entry: str) -> str:
        """A cache channel's last event (JSON ``[event, data]``, expiring with its TTL)."""
        return f"{self._prefix}:cache:{entry}"

    def liveness_key(self, node_id: str) -> str:
        """The key ``node_id`` keeps alive while it runs."""
        return f"{self._prefix}:node:{node_id}"

    @property
    def nodes_key(self) -> str:
        """The set of registered node ids."""
        return f"{self._prefix}:nodes"

    # --- this node's interest ------------------------------------------------------------

    async def held(self) -> set[str]:
        """The entries Redis records for this node (what an earlier session left)."""
        members: Any = await self._client.smembers(self.node_set_key(self._node_id))
        return {_text(member) for member in members}

    def _entry_keys(self, entry: str) -> tuple[list[str], list[str]]:
        app_id, _, channel = entry.partition(":")
        keys = [self.occ_key(entry), self.node_set_key(self._node_id), self.channels_key(app_id)]
        return keys, [self._node_id, entry, channel]

    async def on(self, entry: str) -> bool:
        """Record this node's interest in ``entry``; ``True`` when it became occupied."""
        keys, args = self._entry_keys(entry)
        result: Any = await self._on(keys=keys, args=args)
        return int(result) == 1

    async def off(self, entry: str) -> bool:
        """Remove this node's interest in ``entry``; ``True`` when it became vacated."""
        keys, args = self._entry_keys(entry)
        result: Any = await self._off(keys=keys, args=args)
        return int(result) == 1

    async def counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Record this node's subscriber count of each held entry (one round trip).

        Returns each entry's subscriber count over the whole cluster afterwards.
        """
        entries = list(counts)
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in entries:
                await self._count(
                    keys=[self.occ_key(entry)], args=[self._node_id, counts[entry]], client=pipe
                )
            totals: Any = await pipe.execute()
        return {entry: int(total) for entry, total in zip(entries, totals, strict=True)}

    # --- this node's presence members ------------------------------------------------------

    async def held_members(self) -> set[str]:
        """The member tags Redis records for this node."""
        members: Any = await self._client.smembers(self.node_members_key(self._node_id))
        return {_text(member) for member in members}

    def _member_keys(self, tag: str) -> tuple[list[str], str]:
        entry, _, user_id = tag.partition("\n")
        keys = [
            self.members_key(entry),
            self.member_counts_key(entry),
            self.node_members_key(self._node_id),
        ]
        return keys, user_id

    async def member_on(self, tag: str, user_info_json: str) -> bool:
        """Record a member present on this node; ``True`` when new to the cluster."""
        keys, user_id = self._member_keys(tag)
        entry = tag.partition("\n")[0]
        sealed = seal(self._key, ("member", entry, user_id), user_info_json)
        result: Any = await self._member_on(keys=keys, args=[tag, user_id, sealed])
        return int(result) == 1

    async def member_off(self, tag: str) -> bool:
        """Remove a member of this node; ``True`` when it left the cluster."""
        keys, user_id = self._member_keys(tag)
        result: Any = await self._member_off(keys=keys, args=[tag, user_id])
        return int(result) == 1

    # --- this node's signed-in users -------------------------------------------------------

    async def held_users(self) -> set[str]:
        """The user tags Redis records for this node."""
        members: Any = await self._client.smembers(self.node_users_key(self._node_id))
        return {_text(member) for member in members}

    async def user_on(self, tag: str) -> bool:
        """Record a user signed in on this node; ``True`` when new to the cluster."""
        app_id, _, user_id = tag.partition("\n")
        keys = [self.users_key(app_id), self.node_users_key(self._node_id)]
        result: Any = await self._user_on(keys=keys, args=[tag, user_id])
        return int(result) == 1

    async def user_off(self, tag: str) -> bool:
        """Remove a user of this node; ``True`` when its last connection closed."""
        app_id, _, user_id = tag.partition("\n")
        keys = [self.users_key(app_id), self.node_users_key(self._node_id)]
        result: Any = await self._user_off(keys=keys, args=[tag, user_id])
        return int(result) == 1

    async def online(self, app_id: str, user_ids: list[str]) -> set[str]:
        """Those of ``user_ids`` signed in anywhere in the cluster."""
        if not user_ids:
            return set()
        counts: Any = await self._client.hmget(self.users_key(app_id), user_ids)
        return {user for user, count in zip(user_ids, counts, strict=True) if count}

    # --- this node's counted connections (max_connections_per_user) -------------------------

    async def held_connections(self) -> set[str]:
        """The connection tags Redis records for this node."""
        members: Any = await self._client.smembers(self.node_connections_key(self._node_id))
        return {_text(member) for member in members}

    def _connection_keys(self, tag: str) -> tuple[list[str], list[str]]:
        app_id, user_id, socket_id = split_connection_tag(tag)
        keys = [
            self.connections_key(app_id, user_id),
            self.node_connections_key(self._node_id),
        ]
        return keys, [f"{self._node_id}\n{socket_id}", tag]

    async def claim_connection(
        self, tag: str, limit: int, *, close_oldest: bool
    ) -> list[str] | None:
        """Count a connection of the user within ``limit``.

        Returns ``None`` when refused, else the socket ids of the user's oldest
        connections it replaced (empty when there was room).
        """
        keys, args = self._connection_keys(tag)
        app_id, user_id, _ = split_connection_tag(tag)
        result: Any = await self._claim_connection(
            keys=keys,
            args=[
                *args,
                limit,
                1 if close_oldest else 0,
                f"{self._prefix}:nodeuconn:",
                f"{app_id}\n{user_id}\n",
            ],
        )
        if int(result[0]) != 1:
            return None
        return [_text(member).partition("\n")[2] for member in result[1:]]

    async def assert_connection(self, tag: str) -> None:
        """Record a connection this node counts, without a limit (after an outage)."""
        keys, args = self._connection_keys(tag)
        await self._assert_connection(keys=keys, args=args)

    async def release_connection(self, tag: str) -> None:
        """Stop counting a connection of this node."""
        keys, args = self._connection_keys(tag)
        await self._release_connection(keys=keys, args=args)

    async def connections(self, app_id: str, user_id: str) -> list[str]:
        """The user's counted connections, oldest first: ``{node}\\n{socket}``."""
        members: Any = await self._client.zrange(self.connections_key(app_id, user_id), 0, -1)
        return [_text(member) for member in members]

    # --- queries (any node) ------------------------------------------------------------------

    async def members(self, entry: str) -> dict[str, str]:
        """A presence channel's members in the cluster: user id → user_info JSON.

        A member whose value does not open under the cluster key is left out.
        """
        raw: Any = await self._client.hgetall(self.members_key(entry))
        members: dict[str, str] = {}
        for user_bytes, sealed in raw.items():
            user_id = _text(user_bytes)
            info = open_value(self._key, ("member", entry, user_id), _text(sealed))
            if info is None:
                self._on_forged(FORGED_MEMBER)
            else:
                members[user_id] = info
        return members

    async def channel_info(self, entries: list[str]) -> list[tuple[bool, int, int]]:
        """``(occupied, subscription_count, user_count)`` of each entry (one script)."""
        if not entries:
            return []
        flat: Any = await self._channel_info(keys=[], args=[f"{self._prefix}:", *entries])
        values = [int(value) for value in flat]
        return [(values[i] > 0, values[i + 1], values[i + 2]) for i in range(0, len(values), 3)]

    async def occupied(
        self, app_id: str, prefix: str = "", limit: int | None = None
    ) -> dict[str, tuple[int, int]]:
        """The app's occupied channels starting with ``prefix``: name → (subscribers, users).

        Read incrementally: SSCAN steps of :data:`SCAN_BATCH` names, each followed by
        one ``_CHANNEL_INFO`` call over those names, until the set is exhausted or
        more than ``limit`` channels were found.
        """
        key = self.channels_key(app_id)
        match = prefix.translate(_GLOB_SPECIAL) + "*"
        found: dict[str, tuple[int, int]] = {}
        cursor: Any = 0
        while True:
            cursor, raw = await self._client.sscan(key, cursor, match=match, count=SCAN_BATCH)
            names = [
                name for name in dict.fromkeys(_text(item) for item in raw) if name not in found
            ]
            if names:
                infos = await self.channel_info([f"{app_id}:{name}" for name in names])
                for name, (occupied, subscriptions, users) in zip(names, infos, strict=True):
                    if occupied:
                        found[name] = (subscriptions, users)
            if int(cursor) == 0 or (limit is not None and len(found) > limit):
                return found

    def write_cache(self, pipe: Any, entry: str, event: str, data: str, ttl_ms: int) -> None:
        """Queue the write of a cache channel's last event, sealed, on ``pipe``."""
        value = seal(self._key, ("cache", entry), json.dumps([event, data]))
        pipe.set(self.cache_key(entry), value, px=ttl_ms)

    async def cached(self, entry: str) -> tuple[str, str, int] | None:
        """A cache channel's last event and its remaining TTL (ms), if any.

        A value that does not open under the cluster key counts as nothing cached.
        """
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(self.cache_key(entry))
            pipe.pttl(self.cache_key(entry))
            value, ttl = await pipe.execute()
        if value is None:
            return None
        opened = open_value(self._key, ("cache", entry), _text(value))
        try:
            event, data = json.loads(opened) if opened is not None else (None, None)
        except ValueError:
            event = data = None
        if not isinstance(event, str) or not isinstance(data, str):
            self._on_forged(FORGED_CACHE)
            return None
        return event, data, max(0, int(ttl))

    # --- the replay guard -------------------------------------------------------------------

    def replay_key(self, app_id: str, signature: str) -> str:
        """The key remembering a signed REST request's signature."""
        return f"{self._prefix}:replay:{app_id}:{signature}"

    async def claim(self, app_id: str, signature: str, grace_ms: int, ttl_ms: int) -> bool:
        """``True`` when this signature may proceed anywhere in the cluster."""
        keys = [self.replay_key(app_id, signature)]
        result: Any = await self._claim(keys=keys, args=[grace_ms, max(1, ttl_ms)])
        return int(result) == 1

    # --- liveness ------------------------------------------------------------------------

    async def beat(self) -> bool:
        """Refresh this node's liveness; ``True`` when it was not registered (or reaped)."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self.liveness_key(self._node_id), b"1", px=self._ttl_ms)
            pipe.sadd(self.nodes_key, self._node_id)
            _, added = await pipe.execute()
        return int(added) == 1

    async def dead_nodes(self) -> list[str]:
        """Registered nodes (other than this one) whose liveness key is gone."""
        members: Any = await self._client.smembers(self.nodes_key)
        others = sorted(_text(m) for m in members if _text(m) != self._node_id)
        if not others:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for other in others:
                pipe.exists(self.liveness_key(other))
            alive = await pipe.execute()
        return [other for other, exists in zip(others, alive, strict=True) if not exists]

    async def reap(self, dead: str) -> Reaped:
        """Remove a dead node's share: the entries and members only it held."""
        keys = [
            self.node_set_key(dead),
            self.nodes_key,
            self.liveness_key(dead),
            self.node_members_key(dead),
            self.node_users_key(dead),
            self.node_connections_key(dead),
        ]
        result: Any = await self._reap(keys=keys, args=[dead, f"{self._prefix}:"])
        vacated, removed, offline = result
        return Reaped(
            sorted(_text(entry) for entry in vacated),
            sorted(_text(tag) for tag in removed),
            sorted(_text(tag) for tag in offline),
        )

    async def leave(self) -> None:
        """Unregister this node (a clean stop, after its entries are removed)."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self.liveness_key(self._node_id))
            pipe.srem(self.nodes_key, self._node_id)
            await pipe.execute()
