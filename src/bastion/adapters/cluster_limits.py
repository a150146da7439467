"""Cluster-wide rate limits over Redis: the sync task behind every :class:`SharedLimiter`.

:class:`ClusterLimits` is a :class:`~bastion.security.limits.LimiterFactory`: every
limiter it builds is a :class:`~bastion.security.shared_limits.SharedLimiter` that
answers from this node's view at once. Every ``limits_sync_ms`` a background task
sends, in one pipelined round trip:

* ``TIME`` (to age the notices below);
* ``XREAD`` of the notice stream ``{prefix}:rl:hot`` since the last entry read;
* one atomic script per due key, which refills the shared bucket
  ``{prefix}:rl:{name}:{key}`` (a hash: tokens, Redis ``TIME`` of the update, time
  of the last notice) to now, subtracts what this node granted, stores it with a
  time to live of its refill time (a full bucket carries no state), and returns
  the remainder. When the remainder is low it appends a notice (name, key,
  remainder) to the stream, once as it gets low, once as it gets empty, and at
  most once a second per key while it stays so, so nodes that hold the key but
  are far from the limit cap their view too.

Then each remainder settles its limiter's view and each notice caps the views
that hold its key.

Outage: a failed round trip (Redis down, hung, restarted without the script)
marks the limits unhealthy, logs once (``describe_url``: never a password),
counts it, and the views keep limiting on this node alone; the task retries with
exponential back-off up to ``reconnect_max_seconds``, loads the script again and
resumes. Grants made during the outage are not charged to the cluster later.

The script computes no key from data, but the notice stream and the buckets of
one key must live on one Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import weakref
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from bastion.adapters.redis import describe_url
from bastion.config import AdapterSettings
from bastion.security.limits import RateLimiter
from bastion.security.shared_limits import HOT_MIN_SECONDS, SharedLimiter

__all__ = ["TAKE_SCRIPT", "ClusterLimits"]

log = logging.getLogger("bastion.limits")

#: Seconds to open a connection, and for one round trip, before it counts as failed.
TIMEOUT = 2.0
#: First back-off after a failure, seconds (doubles up to ``reconnect_max_seconds``).
INITIAL_BACKOFF = 0.1
#: Seconds between repeated cancellations of the sync task while stopping.
STOP_RETRY_SECONDS = 0.5
#: Notices kept in the stream (approximately; older ones are trimmed by Redis).
STREAM_MAXLEN = 10_000
#: Notices read in one round trip (the rest on the next).
READ_COUNT = 1_000
#: On (re)connection, notices younger than this are read (keys hot right now).
CATCH_UP_MS = int(HOT_MIN_SECONDS * 1000)

#: KEYS: bucket hash, notice stream. ARGV: rate, burst, granted, floor, near mark,
#: limiter name, key, stream maxlen, seconds between notices. Returns the tokens left
#: (a string: Lua numbers would be truncated to integers).
#:
#: A notice is written when a grant leaves the bucket low (below the near mark) or
#: empty (below one token): at once when it gets lower than the last notice said,
#: else at most once per period while it stays there. The hash holds the tokens
#: (``t``), the Redis time they are counted at (``u``), the time (``a``) and level
#: (``l``: 0 normal, 1 low, 2 empty) of the last notice.
TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local granted = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 't', 'u', 'a', 'l')
local tokens = tonumber(state[1]) or burst
local updated = tonumber(state[2]) or now
local announced = tonumber(state[3]) or 0
local announced_level = tonumber(state[4]) or 0
if now > updated then
  tokens = math.min(burst, tokens + (now - updated) * rate)
end
tokens = math.max(tonumber(ARGV[4]), tokens - granted)
local level = 0
if tokens < 1 then level = 2 elseif tokens < tonumber(ARGV[5]) then level = 1 end
if level == 0 then
  announced_level = 0
elseif granted > 0 and (level > announced_level or now - announced >= tonumber(ARGV[9])) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*',
             'n', ARGV[6], 'k', ARGV[7], 'r', tostring(tokens))
  announced = now
  announced_level = level
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'u', tostring(now),
           'a', tostring(announced), 'l', tostring(announced_level))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return tostring(tokens)
"""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class ClusterLimits:
    """Builds cluster-wide limiters and keeps them in step with Redis.

    Args:
        settings: ``[adapter]`` (``url``, ``prefix``, ``limits_sync_ms``,
            ``reconnect_max_seconds``).
    """

    def __init__(self, settings: AdapterSettings) -> None:
        if settings.url is None:
            raise ValueError("adapter.url is required for cluster-wide limits")
        self._url = settings.url
        self._where = describe_url(settings.url)
        self._prefix = f"{settings.prefix}:rl:"
        self._stream = f"{settings.prefix}:rl:hot"
        self._interval = settings.limits_sync_ms / 1000
        self._reconnect_max = settings.reconnect_max_seconds
        self._limiters: weakref.WeakSet[SharedLimiter] = weakref.WeakSet()
        self._client: aioredis.Redis | None = None
        self._sha: str | None = None
        self._last_id = "0-0"
        self._task: asyncio.Task[None] | None = None
        #: Whether the last round trip succeeded.
        self.healthy = False
        #: Round trips that succeeded / failed.
        self.syncs = 0
        self.failures = 0
        #: Commands sent (TIME, XREAD and one script call per key sent).
        self.commands = 0
        #: Keys sent, and notices read from other nodes (or this one).
        self.keys_sent = 0
        self.notices = 0

    # --- the LimiterFactory ----------------------------------------------------------

    def __call__(
        self, name: str, rate: float, burst: float, max_keys: int, clock: Callable[[], float]
    ) -> RateLimiter:
        """A :class:`SharedLimiter` for the named limit, synced by this object."""
        limiter = SharedLimiter(name, rate, burst, max_keys, clock)
        self._limiters.add(limiter)
        return limiter

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the sync task; one first round trip is tried before returning.

        A Redis that is down does not fail the start: the limits apply per node
        until it is back.
        """
        if self._task is not None:
            return
        self._client = aioredis.from_url(
            self._url,
            socket_connect_timeout=TIMEOUT,
            socket_timeout=TIMEOUT,
            socket_keepalive=True,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            await self._round_trip()
        except Exception as error:
            self._fail(error)
        self._task = asyncio.create_task(self._run(), name="bastion-limits-sync")

    async def stop(self) -> None:
        """Stop the sync task and close the connection (unsent grants are dropped)."""
        task, self._task = self._task, None
        while task is not None and not task.done():
            # Again if need be: a cancellation that lands as a command completes can
            # be swallowed inside redis-py or wait_for (Python 3.11), and the loop
            # would sleep on.
            task.cancel()
            await asyncio.wait([task], timeout=STOP_RETRY_SECONDS)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" noise
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), TIMEOUT)
        self.healthy = False

    async def sync(self) -> None:
        """One round trip now (the task does this every interval; tests and benches too).

        Raises:
            Exception: whatever Redis raised (the task catches and backs off).
        """
        await self._round_trip()

    async def _run(self) -> None:
        delay = INITIAL_BACKOFF
        while self._task is not None:
            if self.healthy:
                await asyncio.sleep(self._interval)
                delay = INITIAL_BACKOFF
            else:
                # Jitter so that a cluster does not retry in lock-step after an outage.
                await asyncio.sleep(delay * (1 + random.random() / 2))
                delay = min(delay * 2, self._reconnect_max)
            try:
                await self._round_trip()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure: local limits only, retry later
                self._fail(error)

    def _fail(self, error: BaseException) -> None:
        for limiter in list(self._limiters):
            limiter.failed()
        self.failures += 1
        self._sha = None  # load it again: Redis may have restarted empty
        if self.healthy:
            self.healthy = False
            log.warning(
                "cluster rate limits: redis %s lost (%s); limiting per node until it is back",
                self._where,
                type(error).__name__,
            )
        elif self.failures == 1 or self.failures % 50 == 0:
            log.warning(
                "cluster rate limits: redis %s unreachable (%s, %d failures); limiting per node",
                self._where,
                type(error).__name__,
                self.failures,
            )

    # --- one round trip ------------------------------------------------------------------

    async def _round_trip(self) -> None:
        client = self._client
        if client is None:
            return
        sha = self._sha
        if sha is None:
            sha = await self._connect(client)
        limiters = [limiter for limiter in list(self._limiters) if len(limiter)]
        if not limiters:
            # Nothing to send or to cap: only make sure "healthy" is still true.
            if not self.healthy:
                await asyncio.wait_for(client.ping(), TIMEOUT)
                self.commands += 1
                self._ok()
            return
        batch: list[tuple[SharedLimiter, str, float]] = []
        for limiter in limiters:
            if limiter.has_due:
                batch.extend((limiter, key, granted) for key, granted in limiter.due())
        # As a context manager: the connection goes back to the pool however it ends.
        async with client.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.xread({self._stream: self._last_id}, count=READ_COUNT)
            for limiter, key, granted in batch:
                pipe.evalsha(
                    sha,
                    2,
                    f"{self._prefix}{limiter.name}:{key}",
                    self._stream,
                    repr(limiter.rate),
                    repr(limiter.burst),
                    repr(granted),
                    repr(limiter.floor),
                    repr(limiter.near),
                    limiter.name,
                    key,
                    STREAM_MAXLEN,
                    repr(HOT_MIN_SECONDS),
                )
            self.commands += 2 + len(batch)
            try:
                results: list[Any] = await asyncio.wait_for(pipe.execute(), TIMEOUT)
            except BaseException:
                for limiter in {limiter for limiter, _, _ in batch}:
                    limiter.failed()
                raise
        seconds, micros = results[0]
        redis_now = int(seconds) + int(micros) / 1_000_000
        self.keys_sent += len(batch)
        for (limiter, key, _), remainder in zip(batch, results[2:], strict=True):
            limiter.settle(key, float(_text(remainder)), limiter.clock())
        self._read_notices(results[1], redis_now, limiters)
        self._ok()

    def _ok(self) -> None:
        self.syncs += 1
        if not self.healthy:
            if self.failures:
                log.info("cluster rate limits: redis %s reachable again", self._where)
            self.healthy = True

    async def _connect(self, client: aioredis.Redis) -> str:
        sha: Any = await asyncio.wait_for(client.script_load(TAKE_SCRIPT), TIMEOUT)
        seconds, _ = await asyncio.wait_for(client.time(), TIMEOUT)
        self.commands += 2
        # Notices of keys hot right now are read; older ones no longer matter.
        self._last_id = f"{max(0, int(seconds) * 1000 - CATCH_UP_MS)}-0"
        self._sha = _text(sha)
        return self._sha

    def _read_notices(self, reply: Any, redis_now: float, limiters: list[SharedLimiter]) -> None:
        if not reply:
            return
        by_name: dict[str, list[SharedLimiter]] = {}
        for limiter in limiters:
            by_name.setdefault(limiter.name, []).append(limiter)
        # redis-py answers XREAD as [[stream, [(id, {field: value}), ...]]] (RESP2).
        for _, entries in reply:
            for entry_id, fields in entries:
                self._last_id = _text(entry_id)
                self._notice(fields, self._last_id, redis_now, by_name)

    def _notice(
        self,
        fields: dict[Any, Any],
        entry_id: str,
        redis_now: float,
        by_name: dict[str, list[SharedLimiter]],
    ) -> None:
        try:
            name = _text(fields[b"n"])
            key = _text(fields[b"k"])
            remainder = float(_text(fields[b"r"]))
            written = int(entry_id.split("-", 1)[0]) / 1000
        except (KeyError, ValueError):
            return  # not ours (someone else writes to our prefix): ignore it
        self.notices += 1
        age = max(0.0, redis_now - written)
        for limiter in by_name.get(name, ()):
            now = limiter.clock()
            limiter.notice(key, min(limiter.burst, remainder + age * limiter.rate), now)
