"""Blocked addresses in Redis: the blocks file's interface, shared by every node on any host.

With ``[adapter] driver = "redis"`` a node keeps its blocks here instead of the
SQLite file (:mod:`bastion.store.blocks`), so a block made on one node (by
reputation or by an operator through the admin API) reaches every node of the
cluster within ``sync_seconds``. The methods and their meaning are those of
:class:`~bastion.store.blocks.BlockStore`: synchronous (a node calls them through
:func:`asyncio.to_thread`), every failure raised as
:class:`~bastion.store.blocks.BlockStoreError` naming ``host:port/db`` only.

Keys (``prefix`` from ``[adapter]``):

* ``{prefix}:blocks`` — a hash, address → JSON row: ``{"active": 1, "until",
  "reason", "source", "created", "changed"}``, or ``{"active": 0, "changed"}``
  once unblocked (kept :data:`~bastion.store.blocks.KEEP_SECONDS` so every node
  reads the change);
* ``{prefix}:blocks:changes`` — a sorted set, address → the number of its last
  change, so "what changed since change N" is one range query;
* ``{prefix}:blocks:seq`` — the last change number issued.

A change number is the larger of the last one plus one and Redis' clock in
microseconds, so numbers keep growing even after Redis restarts empty (a node
would otherwise wait for the counter to catch up with what it last read). Every
write is one atomic script, so two nodes blocking the same address at once
follow the same rule as the file: an operator's block always replaces, an
automatic one only when it ends later.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bastion.adapters.redis import describe_url
from bastion.security.reputation import Block, BlockSource
from bastion.store.blocks import KEEP_SECONDS, BlockChange, BlockStoreError

__all__ = ["RedisBlockStore"]

T = TypeVar("T")

#: Seconds to connect, and for one command, before the call fails.
TIMEOUT = 2.0
#: Addresses read per HSCAN step while pruning.
SCAN_COUNT = 1_000

_NEXT_ID = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local id = math.max((tonumber(redis.call('GET', KEYS[3])) or 0) + 1, now_us)
redis.call('SET', KEYS[3], string.format('%.0f', id))
"""

#: KEYS: rows, changes, seq. ARGV: ip, new row, source, until, now.
#: Returns 1 when the row was written, 0 when an existing block wins.
_BLOCK = (
    """
local row = redis.call('HGET', KEYS[1], ARGV[1])
if row and ARGV[3] == 'auto' then
  local current = cjson.decode(row)
  if current.active == 1 and current['until'] > tonumber(ARGV[5])
     and current['until'] >= tonumber(ARGV[4]) then
    return 0
  end
end
"""
    + _NEXT_ID
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.0f', id), ARGV[1])
return 1
"""
)

#: KEYS: rows, changes, seq. ARGV: ip, the inactive row. Returns the row that was
#: active, or false (nothing written) when there was none.
_UNBLOCK = (
    """
local row = redis.call('HGET', KEYS[1], ARGV[1])
if not row or cjson.decode(row).active ~= 1 then return false end
"""
    + _NEXT_ID
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.0f', id), ARGV[1])
return row
"""
)

#: KEYS: rows, changes. ARGV: since (exclusive), limit. Returns ip, id, row, ...
_CHANGES = """
local out = {}
local found = redis.call('ZRANGE', KEYS[2], '(' .. ARGV[1], '+inf', 'BYSCORE',
                         'LIMIT', 0, tonumber(ARGV[2]), 'WITHSCORES')
for i = 1, #found, 2 do
  local row = redis.call('HGET', KEYS[1], found[i])
  if row then
    table.insert(out, found[i])
    table.insert(out, found[i + 1])
    table.insert(out, row)
  end
end
return out
"""

#: KEYS: rows, changes. ARGV: ip, the row read. Deletes it unless it changed since.
_PRUNE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _row(block: Block, now: float) -> str:
    return json.dumps(
        {
            "active": 1,
            "until": block.until,
            "reason": block.reason,
            "source": block.source,
            "created": block.created,
            "changed": now,
        },
        separators=(",", ":"),
    )


def _block(ip: str, raw: bytes | str) -> Block | None:
    """The block a row records, or ``None`` for an unblocked (or unreadable) row."""
    try:
        row = json.loads(_text(raw))
        if row.get("active") != 1:
            return None
        source = row["source"]
        if source not in ("auto", "manual"):
            return None
        return Block(
            ip=ip,
            until=float(row["until"]),
            reason=str(row["reason"]),
            source=cast(BlockSource, source),
            created=float(row["created"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class RedisBlockStore:
    """The cluster's blocks in Redis (see the module docstring).

    Args:
        url: the Redis URL (``[adapter] url``; never logged, only ``host:port/db``).
        prefix: the cluster's key prefix.

    Nothing is connected here: a Redis that is down fails the first call, with
    :class:`~bastion.store.blocks.BlockStoreError`.
    """

    def __init__(self, url: str, prefix: str) -> None:
        #: Where the blocks are, for log lines (never the password).
        self.path = describe_url(url)
        self._rows = f"{prefix}:blocks"
        self._changes = f"{prefix}:blocks:changes"
        self._seq = f"{prefix}:blocks:seq"
        self._client: redis.Redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=TIMEOUT,
            socket_timeout=TIMEOUT,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
        )
        self._block = self._client.register_script(_BLOCK)
        self._unblock = self._client.register_script(_UNBLOCK)
        self._changes_script = self._client.register_script(_CHANGES)
        self._prune = self._client.register_script(_PRUNE)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except (redis.RedisError, OSError) as exc:
            raise BlockStoreError(
                f"cannot {what} the blocks in redis {self.path}: {type(exc).__name__}"
            ) from None

    def close(self) -> None:
        """Close the connections."""
        self._client.close()

    def __enter__(self) -> RedisBlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def block(self, block: Block, *, now: float) -> bool:
        """Record ``block`` unless a block in force wins (see the file's rule)."""
        keys = [self._rows, self._changes, self._seq]
        args = [block.ip, _row(block, now), block.source, repr(block.until), repr(now)]
        result: Any = self._call("write", lambda: self._block(keys=keys, args=args))
        return int(result) == 1

    def unblock(self, ip: str, *, now: float) -> Block | None:
        """Lift the block of ``ip``; the block that was in force, or ``None``."""
        keys = [self._rows, self._changes, self._seq]
        inactive = json.dumps({"active": 0, "changed": now}, separators=(",", ":"))
        result: Any = self._call("write", lambda: self._unblock(keys=keys, args=[ip, inactive]))
        if not result:
            return None
        previous = _block(ip, result)
        return previous if previous is not None and previous.active(now) else None

    def get(self, ip: str, *, now: float) -> Block | None:
        """The block in force for ``ip`` at ``now``, if any."""
        raw: Any = self._call("read", lambda: self._client.hget(self._rows, ip))
        block = None if raw is None else _block(ip, raw)
        return block if block is not None and block.active(now) else None

    def active(self, *, now: float) -> list[Block]:
        """Every block in force at ``now``, soonest to end first."""
        rows: Any = self._call("read", lambda: self._client.hgetall(self._rows))
        blocks = [_block(_text(ip), raw) for ip, raw in rows.items()]
        found = [block for block in blocks if block is not None and block.active(now)]
        return sorted(found, key=lambda block: (block.until, block.ip))

    def last_change_id(self) -> int:
        """The number of the latest change (0 when nothing was ever written)."""
        raw: Any = self._call("read", lambda: self._client.get(self._seq))
        return 0 if raw is None else int(_text(raw))

    def changes(self, since: int, *, limit: int = 10_000) -> list[BlockChange]:
        """The current state of every address changed after change ``since``, in order."""
        keys = [self._rows, self._changes]
        flat: Any = self._call("read", lambda: self._changes_script(keys=keys, args=[since, limit]))
        out = []
        for index in range(0, len(flat), 3):
            ip = _text(flat[index])
            change_id = int(float(_text(flat[index + 1])))
            out.append(BlockChange(change_id, ip, _block(ip, flat[index + 2])))
        return out

    def prune(self, *, now: float, keep_seconds: float = KEEP_SECONDS) -> int:
        """Delete rows unblocked or expired more than ``keep_seconds`` ago."""
        cutoff = now - keep_seconds
        old: list[tuple[str, bytes]] = []
        for ip, raw in self._call(
            "read", lambda: list(self._client.hscan_iter(self._rows, count=SCAN_COUNT))
        ):
            try:
                row = json.loads(_text(raw))
                expired = float(row.get("until", now)) < cutoff
                stale = row.get("active") != 1 and float(row.get("changed", now)) < cutoff
            except (ValueError, TypeError, AttributeError):
                continue  # unreadable: left for an operator to look at
            if expired or stale:
                old.append((_text(ip), raw))
        return sum(self._prune_one(ip, raw) for ip, raw in old)

    def _prune_one(self, ip: str, raw: bytes) -> int:
        keys = [self._rows, self._changes]
        result: Any = self._call("write", lambda: self._prune(keys=keys, args=[ip, raw]))
        return int(result)
