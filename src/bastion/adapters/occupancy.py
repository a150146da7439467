"""Cluster-wide channel occupancy in Redis: the Lua scripts and their wrappers.

Keys (``prefix`` from ``[adapter]``; an entry is ``{app_id}:{channel}``):

* ``{prefix}:occ:{app_id}:{channel}`` — a hash whose fields are the ids of the
  nodes with local interest in the channel (the value is unused);
* ``{prefix}:nodeocc:{node_id}`` — a set of the entries that node holds, so the
  node's share can be removed when it dies;
* ``{prefix}:node:{node_id}`` — the node's liveness key, refreshed every
  heartbeat with a TTL of three heartbeats;
* ``{prefix}:nodes`` — the set of node ids that registered liveness.

Each change runs as one script, so "was this node the first / the last holder" is
decided atomically across the cluster: a channel is occupied exactly when its hash
goes from 0 to 1 field, and vacated exactly when it goes from 1 to 0. The reap
script removes a dead node's fields and deletes its set in the same atomic step,
so when several survivors reap the same node, exactly one gets the vacated channels.

The scripts compute keys from set members, so they need a single Redis (or a
primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

__all__ = ["Occupancy"]

#: KEYS: occ hash, node's set. ARGV: node id, entry. Returns 1 when the hash went 0 → 1.
_ON = """
local before = redis.call('HLEN', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], '1')
redis.call('SADD', KEYS[2], ARGV[2])
if before == 0 then return 1 end
return 0
"""

#: KEYS: occ hash, node's set. ARGV: node id, entry. Returns 1 when the hash went 1 → 0.
_OFF = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
if removed == 1 and redis.call('HLEN', KEYS[1]) == 0 then return 1 end
return 0
"""

#: KEYS: dead node's set, nodes set, dead node's liveness key. ARGV: dead id, occ key
#: prefix. Returns the entries that the dead node was the last holder of; nothing
#: (and no change) when the node is alive again.
_REAP = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local vacated = {}
for _, entry in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. entry
  if redis.call('HDEL', key, ARGV[1]) == 1 and redis.call('HLEN', key) == 0 then
    table.insert(vacated, entry)
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return vacated
"""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class Occupancy:
    """The occupancy and liveness operations of one node on one Redis connection.

    Args:
        client: the Redis client of the current bus session.
        prefix: the cluster's key prefix.
        node_id: this node's id.
        ttl_ms: the liveness key's time to live, milliseconds.
    """

    def __init__(self, client: aioredis.Redis, prefix: str, node_id: str, ttl_ms: int) -> None:
        self._client = client
        self._prefix = prefix
        self._node_id = node_id
        self._ttl_ms = ttl_ms
        self._on = client.register_script(_ON)
        self._off = client.register_script(_OFF)
        self._reap = client.register_script(_REAP)

    # --- keys ----------------------------------------------------------------------------

    def occ_key(self, entry: str) -> str:
        """The hash of the nodes holding ``entry`` (``{app_id}:{channel}``)."""
        return f"{self._prefix}:occ:{entry}"

    def node_set_key(self, node_id: str) -> str:
        """The set of entries ``node_id`` holds."""
        return f"{self._prefix}:nodeocc:{node_id}"

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

    async def on(self, entry: str) -> bool:
        """Record this node's interest in ``entry``; ``True`` when it became occupied."""
        keys = [self.occ_key(entry), self.node_set_key(self._node_id)]
        result: Any = await self._on(keys=keys, args=[self._node_id, entry])
        return int(result) == 1

    async def off(self, entry: str) -> bool:
        """Remove this node's interest in ``entry``; ``True`` when it became vacated."""
        keys = [self.occ_key(entry), self.node_set_key(self._node_id)]
        result: Any = await self._off(keys=keys, args=[self._node_id, entry])
        return int(result) == 1

    # --- liveness ------------------------------------------------------------------------

    async def beat(self) -> bool:
        """Refresh this node's liveness; ``True`` when it was not registered (or reaped)."""
        pipe = self._client.pipeline(transaction=True)
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
        pipe = self._client.pipeline(transaction=False)
        for other in others:
            pipe.exists(self.liveness_key(other))
        alive = await pipe.execute()
        return [other for other, exists in zip(others, alive, strict=True) if not exists]

    async def reap(self, dead: str) -> list[str]:
        """Remove a dead node's share; the entries it was the last holder of."""
        keys = [self.node_set_key(dead), self.nodes_key, self.liveness_key(dead)]
        result: Any = await self._reap(keys=keys, args=[dead, f"{self._prefix}:occ:"])
        return sorted(_text(entry) for entry in result)

    async def leave(self) -> None:
        """Unregister this node (a clean stop, after its entries are removed)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self.liveness_key(self._node_id))
        pipe.srem(self.nodes_key, self._node_id)
        await pipe.execute()
