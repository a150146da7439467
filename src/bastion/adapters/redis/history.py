"""Channel history in Redis: one Stream per channel, recorded, numbered and published at once.

Keys (``prefix`` from ``[adapter]``; ``{entry}`` is ``{app_id}:{channel}``, neither
part can hold a colon):

* ``{prefix}:hm:{entry}`` — a hash: ``e`` the epoch, ``o`` the last offset, ``b``
  the bytes kept, ``g`` the app's generation it belongs to; it expires
  ``position_ttl`` after the channel's last event (``max_age`` for a channel that
  never had one);
* ``{prefix}:hs:{entry}`` — a Stream whose entry ids are ``{offset}-0``, each with
  ``v`` the sealed event (``[event, data, excluded socket id]`` as JSON, with a
  MAC under the cluster key over it and the channel: :func:`~.scripts.seal`),
  ``t`` when it was recorded (Redis's clock, ms) and ``s`` the bytes it counts
  for; trimmed by count, bytes and age on every write and read, and expiring
  ``max_age`` after the last event;
* ``{prefix}:hg:{app_id}`` — the app's generation: a history whose ``g`` differs
  is treated as lost (a new epoch), which is how a node restarts every history of
  an app at once (a reload that stops recording, events delivered unrecorded
  while Redis was unreachable).

One script records an event: the epoch (a new one if the hash is gone or of an
older generation, the stream then emptied), the next offset, the entry, the
trimming, the TTLs, and the ``PUBLISH`` of the node's signed bus message with
``pos:{epoch}:{offset}`` in front, on the channel's topic. Redis runs scripts one
at a time, so every node, the publishing one included, receives the channel's
events in offset order, and a resume that reads the stream once its node's topic
subscription is confirmed misses nothing: an event is either in the range read or
published on the topic afterwards (a read while the node wants the topic but
Redis has not confirmed it is answered ``unavailable``, never risked).

Appends wait in a bounded queue for the session's writer, in order. What cannot
be recorded (the session is down, the queue is full, a write failed) is delivered
to this node's subscribers without a position, and the app's generation is
bumped when the session is back (before it counts as healthy), so no resume
across the gap is ever answered complete. Reads raise
:class:`~bastion.adapters.base.ClusterUnavailable` when Redis cannot answer; an
entry that does not open under the cluster key is counted as forged and the
resume is answered ``unavailable``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bastion.adapters.base import ClusterUnavailable, Deliver, ignore_delivery
from bastion.adapters.messages import ChannelEvent
from bastion.adapters.redis.client import COMMAND_TIMEOUT, describe_error
from bastion.adapters.redis.scripts import open_value, seal
from bastion.adapters.redis.session import RedisSession
from bastion.core.history import (
    Entry,
    HistoryLimits,
    Recovery,
    Unrecovered,
    complete,
    entry_size,
    verdict,
)
from bastion.protocol.positions import Position

__all__ = ["FORGED_HISTORY", "HistoryBus", "RedisHistory"]

log = logging.getLogger("bastion.bus")

#: What a forged history entry is reported as.
FORGED_HISTORY = "forged_history"
#: Appends waiting for the writer at most; past it they are delivered unrecorded.
MAX_PENDING = 10_000
#: Appends written in one pipeline.
BATCH = 200
#: Seconds a resume or backfill read may take.
READ_WAIT = 2.0

# Drops the oldest entries past any bound. ARGV of the caller: max events, max
# bytes, max age (ms) at 4, 5, 6. Returns the bytes kept.
_TRIM = """
local function trim(meta, stream, now, max_events, max_bytes, max_age, bytes)
  local length = redis.call('XLEN', stream)
  while length > 0 do
    local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
    local at, size = 0, 0
    local fields = first[2]
    for i = 1, #fields, 2 do
      if fields[i] == 't' then at = tonumber(fields[i + 1])
      elseif fields[i] == 's' then size = tonumber(fields[i + 1]) end
    end
    if length <= max_events and bytes <= max_bytes and at > now - max_age then break end
    redis.call('XDEL', stream, first[1])
    bytes = redis.call('HINCRBY', meta, 'b', -size)
    length = length - 1
  end
  return bytes
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function history(meta, stream, generation_key, fresh, empty_ttl)
  local generation = redis.call('GET', generation_key) or ''
  local found = redis.call('HMGET', meta, 'e', 'g')
  if found[1] and found[2] == generation then return found[1] end
  redis.call('DEL', stream)
  redis.call('DEL', meta)
  redis.call('HSET', meta, 'e', fresh, 'o', 0, 'b', 0, 'g', generation)
  redis.call('PEXPIRE', meta, empty_ttl)
  return fresh
end
"""

#: KEYS: meta, stream, generation. ARGV: fresh epoch, sealed value, size, max events,
#: max bytes, max age ms, position ttl ms, topic, signed message. Returns {epoch, offset}.
_APPEND = (
    _TRIM
    + """
local now = now_ms()
local epoch = history(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[6])
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
local id = string.format('%d-0', offset)
redis.call('XADD', KEYS[2], id, 'v', ARGV[2], 't', now, 's', ARGV[3])
local bytes = redis.call('HINCRBY', KEYS[1], 'b', ARGV[3])
trim(KEYS[1], KEYS[2], now, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), bytes)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local position = epoch .. ':' .. string.format('%d', offset)
redis.call('PUBLISH', ARGV[8], 'pos:' .. position .. '\\n' .. ARGV[9])
return {epoch, offset}
"""
)

#: KEYS: meta, stream, generation. ARGV: fresh epoch, asked epoch ('' for none), asked
#: offset (-1 for none), max events, max bytes, max age ms, max replay. Returns
#: {epoch, top, oldest, id, value, id, value, ...}: the entries after the asked
#: offset only when they can be a complete replay.
_SINCE = (
    _TRIM
    + """
local now = now_ms()
local epoch = history(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[6])
local top = tonumber(redis.call('HGET', KEYS[1], 'o'))
local bytes = tonumber(redis.call('HGET', KEYS[1], 'b'))
trim(KEYS[1], KEYS[2], now, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), bytes)
local oldest = top + 1
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if first then oldest = tonumber(string.match(first[1], '^(%d+)')) end
local result = {epoch, top, oldest}
local asked = tonumber(ARGV[3])
if ARGV[2] == epoch and asked >= 0 and asked < top and asked + 1 >= oldest
    and top - asked <= tonumber(ARGV[7]) then
  local from = string.format('%d-0', asked + 1)
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', top - asked)) do
    local value = ''
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'v' then value = fields[i + 1] end
    end
    table.insert(result, entry[1])
    table.insert(result, value)
  end
end
return result
"""
)


class HistoryBus(Protocol):
    """What the history asks of the bus (:class:`~.topics.RedisBus`)."""

    def encode_recorded(self, message: ChannelEvent) -> tuple[str, bytes]:
        """A recorded event's topic and signed bytes."""
        ...

    def confirmed(self, app_id: str, channel: str) -> bool:
        """Whether the channel's events reach this node (if it has interest in them)."""
        ...

    def forged(self, reason: str, size: int) -> None:
        """Count, and log and audit at a bounded rate, something forged."""

    def drop(self, reason: str) -> None:
        """Count something the cluster will not get."""


#: One queued append: app, channel, event, data, excluded socket, limits, sealed value.
_Append = tuple[str, str, str, str, str | None, HistoryLimits, str]


class RedisHistory:
    """Implements :class:`~bastion.adapters.base.History` over Redis Streams.

    Args:
        session: the node's Redis session.
        bus: the node's bus (signs the recorded events, counts what is dropped).
        prefix: the cluster's key prefix.
        key: the cluster key (seals the entries).
        epochs: makes a fresh epoch (random).
    """

    def __init__(
        self,
        session: RedisSession,
        bus: HistoryBus,
        prefix: str,
        key: bytes,
        epochs: Callable[[], str] | None = None,
    ) -> None:
        self._session = session
        self._bus = bus
        self._prefix = prefix
        self._key = key
        self._epochs = epochs or (lambda: secrets.token_urlsafe(6))
        self._deliver: Deliver = ignore_delivery
        self._outbox: deque[_Append] = deque()
        #: Apps whose histories restart (a new generation) once the session is back.
        self._restart: set[str] = set()
        #: The append script's SHA1 on the current session (loaded by :meth:`begin`).
        self._append_sha = ""
        self._since: Any = None

    def attach(self, deliver: Deliver) -> None:
        """Where unrecorded events go on this node (recorded ones come over the bus)."""
        self._deliver = deliver

    # --- keys ---------------------------------------------------------------------------

    def _keys(self, app_id: str, channel: str) -> list[str]:
        entry = f"{app_id}:{channel}"
        return [
            f"{self._prefix}:hm:{entry}",
            f"{self._prefix}:hs:{entry}",
            f"{self._prefix}:hg:{app_id}",
        ]

    # --- the History protocol ------------------------------------------------------------

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: str,
        exclude_socket_id: str | None,
        limits: HistoryLimits,
    ) -> None:
        """Queue the append (the script publishes it); unrecorded when it cannot be."""
        if not self._session.healthy or len(self._outbox) >= MAX_PENDING:
            self._unrecorded(app_id, channel, event, data, exclude_socket_id)
            return
        value = seal(
            self._key,
            (app_id, channel, "history"),
            json.dumps([event, data, exclude_socket_id], separators=(",", ":")),
        )
        self._outbox.append((app_id, channel, event, data, exclude_socket_id, limits, value))
        self._session.wake_writer()

    async def since(
        self,
        app_id: str,
        channel: str,
        asked: Position | None,
        socket_id: str | None,
        limits: HistoryLimits,
    ) -> Recovery:
        """What ``asked`` missed, read from Redis (all or nothing)."""
        script = self._since
        if not self._session.healthy or script is None:
            raise ClusterUnavailable("the redis bus is disconnected")
        if not self._bus.confirmed(app_id, channel):
            # Events published after the read might never reach this node's subscriber.
            raise ClusterUnavailable("the channel's topic is not confirmed yet")
        args = [
            self._epochs(),
            asked.epoch if asked is not None else "",
            asked.offset if asked is not None else -1,
            limits.max_events,
            limits.max_bytes,
            _ms(limits.max_age),
            limits.max_replay,
        ]
        try:
            raw = await asyncio.wait_for(
                script(keys=self._keys(app_id, channel), args=args), READ_WAIT
            )
        except TimeoutError:
            raise ClusterUnavailable("the redis bus did not answer in time") from None
        except Exception as error:  # a Redis error or a broken reply: no partial answer
            raise ClusterUnavailable(describe_error(error)) from None
        return self._recovery(app_id, channel, asked, socket_id, limits, raw)

    def restart(self, app_id: str) -> None:
        """Every history of the app starts again (a new generation), now or on reconnect."""
        self._restart.add(app_id)
        self._session.wake_writer()

    def tick(self) -> None:
        """Nothing to sweep: Redis expires the keys."""

    # --- the session's side --------------------------------------------------------------

    async def begin(self, client: Any) -> None:
        """A new session: load the scripts, restart the apps whose events went unrecorded."""
        self._append_sha = await _timed(client.script_load(_APPEND))
        await self._restart_apps(client)
        self._since = client.register_script(_SINCE)

    def end(self) -> None:
        """The session is gone: no script runs until the next one."""
        self._since = None

    def lost(self) -> None:
        """The bus went down: what waits is delivered here, unrecorded."""
        pending, self._outbox = self._outbox, deque()
        for app_id, channel, event, data, exclude, _, _ in pending:
            self._unrecorded(app_id, channel, event, data, exclude)

    async def write(self, client: Any) -> None:
        """Run the queued appends in order, a pipeline per batch (the session's writer)."""
        if self._restart:
            await self._restart_apps(client)
        while self._outbox:
            batch = [self._outbox.popleft() for _ in range(min(len(self._outbox), BATCH))]
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for item in batch:
                        self._queue_append(pipe, item)
                    await asyncio.wait_for(pipe.execute(), COMMAND_TIMEOUT)
            except BaseException:
                # Unknown which ran: delivered here unrecorded, the app restarted later.
                for app_id, channel, event, data, exclude, _, _ in batch:
                    self._unrecorded(app_id, channel, event, data, exclude)
                raise

    def _queue_append(self, pipe: Any, item: _Append) -> None:
        app_id, channel, event, data, exclude, limits, value = item
        topic, signed = self._bus.encode_recorded(
            ChannelEvent(app_id, channel, event, data, exclude)
        )
        args = [
            self._epochs(),
            value,
            entry_size(event, data, exclude),
            limits.max_events,
            limits.max_bytes,
            _ms(limits.max_age),
            _ms(limits.position_ttl),
            topic,
            signed,
        ]
        keys = self._keys(app_id, channel)
        pipe.evalsha(self._append_sha, len(keys), *keys, *args)

    async def _restart_apps(self, client: Any) -> None:
        apps, self._restart = self._restart, set()
        try:
            for app_id in sorted(apps):
                await _timed(client.set(f"{self._prefix}:hg:{app_id}", self._epochs()))
                log.info("redis bus %s: history of app %s restarted", self._session.where, app_id)
        except BaseException:
            self._restart |= apps
            raise

    # --- helpers -------------------------------------------------------------------------

    def _unrecorded(
        self, app_id: str, channel: str, event: str, data: str, exclude: str | None
    ) -> None:
        """Deliver here without a position; the app's histories restart on reconnect."""
        self._bus.drop("history_unrecorded")
        self._restart.add(app_id)
        try:
            self._deliver(app_id, channel, event, data, exclude, None)
        except Exception:  # a delivery bug must not end the bus session
            log.exception("delivering an unrecorded event failed")

    def _recovery(
        self,
        app_id: str,
        channel: str,
        asked: Position | None,
        socket_id: str | None,
        limits: HistoryLimits,
        raw: list[Any],
    ) -> Recovery:
        epoch, top, oldest = _text(raw[0]), int(raw[1]), int(raw[2])
        found = verdict(asked, epoch, top, oldest, limits.max_replay)
        if found is not None:
            return found
        assert asked is not None
        where = (app_id, channel, "history")
        missed: list[Entry] = []
        for index in range(3, len(raw) - 1, 2):
            entry_id, sealed = _text(raw[index]), _text(raw[index + 1])
            opened = open_value(self._key, where, sealed)
            decoded = _event(opened) if opened is not None else None
            if decoded is None:
                self._bus.forged(FORGED_HISTORY, len(sealed))
                return Recovery(False, Position(epoch, top), reason=Unrecovered.UNAVAILABLE)
            event, data, exclude = decoded
            offset = int(entry_id.partition("-")[0])
            missed.append(Entry(offset, 0.0, event, data, exclude, 0))
        return complete(asked, socket_id, epoch, top, missed)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _event(text: str) -> tuple[str, str, str | None] | None:
    """A recorded ``[event, data, excluded socket]``; ``None`` if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and isinstance(value[1], str)
        and (value[2] is None or isinstance(value[2], str))
    ):
        return value[0], value[1], value[2]
    return None


async def _timed(operation: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(operation, COMMAND_TIMEOUT)
