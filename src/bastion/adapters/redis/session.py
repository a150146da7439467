"""The Redis session of one node: connect, run, notice the loss, reconnect.

One supervisor task connects (a command client and a pub/sub connection), lets
the bus subscribe to every topic of current interest and the state re-assert
this node's share, then runs a reader, a writer, a syncer, a heartbeat and the
liveness loop. When any of them fails (Redis gone, a command timed out, no answer
to the heartbeat), the session is torn down, :attr:`RedisSession.healthy` goes
``False`` and the supervisor reconnects with exponential back-off (plus jitter)
up to ``reconnect_max_seconds``. While disconnected the node keeps serving its
local clients: the bus drops publishes (counted, never queued: a late event would
arrive out of order anyway) and the state keeps what it must re-assert.

The loss is logged once, at WARNING; the attempts that follow at DEBUG, with a
WARNING reminder every 20 attempts; the reconnection at INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Coroutine
from typing import Any, Protocol

from bastion.adapters.redis.client import COMMAND_TIMEOUT, describe_error, make_client
from bastion.adapters.redis.scripts import StateScripts
from bastion.metrics import Metrics

__all__ = ["RedisSession", "SessionBus", "SessionHistory", "SessionState"]

log = logging.getLogger("bastion.bus")

#: Seconds ``start`` waits for the first connection before serving without it.
START_WAIT = 5.0
#: Seconds ``stop`` waits for the session to close.
STOP_WAIT = 5.0
#: First back-off after a failure, seconds (doubles up to ``reconnect_max_seconds``).
INITIAL_BACKOFF = 0.1
#: Heartbeats without any answer from Redis before the session is declared dead.
MISSED_HEARTBEATS = 3
#: Seconds a clean stop may spend removing this node's share of the state.
LEAVE_WAIT = 2.0
#: The liveness key lives this many heartbeats without a refresh.
LIVENESS_HEARTBEATS = 3


class _SessionLost(Exception):
    """The session must be rebuilt (heartbeat unanswered, a task ended)."""


class SessionBus(Protocol):
    """What the session asks of the bus (:class:`~.topics.RedisBus`)."""

    async def begin(self, pubsub: Any) -> None:
        """A new session: subscribe to every topic of current interest."""

    def end(self) -> None:
        """The session is gone."""

    def lost(self) -> None:
        """The bus went down."""

    async def sync(self, pubsub: Any) -> None:
        """Make the subscribed topics what the node has interest in."""

    async def write(self, client: Any) -> None:
        """Write the queued messages."""

    def on_pubsub(self, message: dict[str, Any]) -> None:
        """One item from the pub/sub connection."""


class SessionState(Protocol):
    """What the session asks of the state (:class:`~.state.RedisState`)."""

    @property
    def prefix(self) -> str:
        """The cluster's key prefix."""
        ...

    def forged(self, kind: str) -> None:
        """A value read from Redis did not open under the cluster key."""

    async def begin(self, scripts: StateScripts) -> None:
        """A new session: register and re-assert this node's share."""

    async def write(self, client: Any, scripts: StateScripts) -> None:
        """Write the cache events waiting."""

    async def reconcile(self, scripts: StateScripts) -> None:
        """Make Redis record this node's share as it is now."""

    async def liveness(self, scripts: StateScripts) -> None:
        """One heartbeat: refresh liveness, reap the dead."""

    async def leave(self, scripts: StateScripts, client: Any) -> None:
        """A clean stop: remove this node's share."""


class SessionHistory(Protocol):
    """What the session asks of the history (:class:`~.history.RedisHistory`)."""

    async def begin(self, client: Any) -> None:
        """A new session: restart what went unrecorded, then record again."""

    def end(self) -> None:
        """The session is gone."""

    def lost(self) -> None:
        """The bus went down: what waits is delivered unrecorded."""

    async def write(self, client: Any) -> None:
        """Run the queued appends."""


class RedisSession:
    """Supervises the connections; the bus, the state and the history do the work.

    Args:
        url: the Redis URL (never logged: ``where`` names it).
        where: the URL as it may be logged.
        node_id: this node's id.
        heartbeat: seconds between heartbeats.
        reconnect_max: the longest back-off, seconds.
        key: the cluster key (the state seals values with it).
        metrics: the node's metrics, if any.
    """

    def __init__(
        self,
        url: str,
        where: str,
        node_id: str,
        heartbeat: float,
        reconnect_max: float,
        key: bytes,
        metrics: Metrics | None,
    ) -> None:
        self.url = url
        self.where = where
        self.node_id = node_id
        self.heartbeat = heartbeat
        self.reconnect_max = reconnect_max
        self.key = key
        self.metrics = metrics
        self.healthy = False
        #: The current session's state operations (``None`` while disconnected).
        self.scripts: StateScripts | None = None
        #: Set when the syncer has nothing left to do (reads and a clean stop wait).
        self.settled: asyncio.Event | None = None
        self._bus: SessionBus | None = None
        self._state: SessionState | None = None
        self._history: SessionHistory | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake_writer: asyncio.Event | None = None
        self._wake_syncer: asyncio.Event | None = None
        self._attempted: asyncio.Event | None = None

    def attach(
        self, bus: SessionBus, state: SessionState, history: SessionHistory | None = None
    ) -> None:
        """The bus, the state and the history this session runs (once, before :meth:`start`)."""
        self._bus = bus
        self._state = state
        self._history = history

    # --- wake-ups --------------------------------------------------------------------

    def wake_writer(self) -> None:
        """Something waits to be written (publishes, cache events)."""
        if self._wake_writer is not None:
            self._wake_writer.set()

    def wake_syncer(self) -> None:
        """Interest or state changed: sync topics and reconcile soon."""
        if self.settled is not None:
            self.settled.clear()
        if self._wake_syncer is not None:
            self._wake_syncer.set()

    async def settle(self, within: float) -> None:
        """Wait (at most ``within`` seconds) until this node's pending changes are in Redis."""
        settled = self.settled
        if settled is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), within)

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the supervisor; wait (bounded) for the first connection attempt.

        A Redis that is down does not fail the start: the node serves its local
        clients and keeps reconnecting (start order in a deployment must not matter).
        """
        if self._task is not None:
            return
        self._wake_writer = asyncio.Event()
        self._wake_syncer = asyncio.Event()
        self.settled = asyncio.Event()
        self._attempted = asyncio.Event()
        self._task = asyncio.create_task(self._supervise(), name="bastion-bus")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), START_WAIT)
        if not self.healthy:
            log.warning(
                "redis bus %s unreachable at start: serving local clients only, reconnecting",
                self.where,
            )

    async def stop(self) -> None:
        """Leave the cluster, stop the supervisor and close the connections.

        With the bus up, changes still pending are written first, then the node
        removes its share of the state (reporting what it was the last holder of)
        and its liveness key. With the bus down, the survivors reap the node once
        its liveness key expires.
        """
        task = self._task
        if task is None:
            return
        assert self._bus is not None and self._state is not None
        leave = self.healthy
        if leave:
            await self.settle(LEAVE_WAIT)
        self._task = None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, STOP_WAIT)
        self._set_healthy(False)
        if leave:
            client = make_client(self.url)
            try:
                await asyncio.wait_for(self._state.leave(self._scripts(client), client), LEAVE_WAIT)
            except Exception as error:  # survivors reap what is left
                log.warning(
                    "redis bus %s: leaving the cluster failed (%s); survivors will reap",
                    self.where,
                    describe_error(error),
                )
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.aclose(), COMMAND_TIMEOUT)

    def _set_healthy(self, healthy: bool) -> None:
        assert self._bus is not None
        if healthy and not self.healthy and self.metrics is not None:
            self.metrics.bus_connects += 1
        self.healthy = healthy
        if not healthy:
            self._bus.lost()
            if self._history is not None:
                self._history.lost()
        if self.metrics is not None:
            self.metrics.bus_connected = int(healthy)

    def _scripts(self, client: Any) -> StateScripts:
        assert self._state is not None
        ttl_ms = max(1, int(LIVENESS_HEARTBEATS * self.heartbeat * 1000))
        return StateScripts(
            client, self._state.prefix, self.node_id, ttl_ms, self.key, self._state.forged
        )

    # --- the supervisor --------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = INITIAL_BACKOFF
        failures = 0
        while self._task is not None:  # stop() clears it (a swallowed cancel ends too)
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure ends the session, never the node
                was_healthy = self.healthy
                self._set_healthy(False)
                if was_healthy:
                    delay, failures = INITIAL_BACKOFF, 0
                    log.warning(
                        "redis bus %s lost (%s): serving local clients only, reconnecting",
                        self.where,
                        describe_error(error),
                    )
                else:
                    failures += 1
                    # Every attempt at DEBUG; a reminder at WARNING now and then.
                    level = logging.WARNING if failures % 20 == 0 else logging.DEBUG
                    log.log(
                        level,
                        "redis bus %s still unreachable after %d attempts (%s)",
                        self.where,
                        failures,
                        describe_error(error),
                    )
            finally:
                self._set_healthy(False)
                if self._attempted is not None:
                    self._attempted.set()
            # Jitter so that a cluster does not reconnect in lock-step after an outage.
            await asyncio.sleep(delay * (1 + random.random() / 2))
            delay = min(delay * 2, self.reconnect_max)

    async def _session(self) -> None:
        assert self._bus is not None and self._state is not None
        bus, state = self._bus, self._state
        client = make_client(self.url)
        scripts = self._scripts(client)
        # redis-py leaves the PubSub methods untyped.
        pubsub: Any = client.pubsub(ignore_subscribe_messages=False)
        tasks: list[asyncio.Task[None]] = []
        try:
            await client.ping()
            await pubsub.connect()
            await bus.begin(pubsub)
            await state.begin(scripts)
            if self._history is not None:
                # Before the session counts as healthy: no resume is answered from a
                # history that missed events this node delivered unrecorded.
                await self._history.begin(client)
            self.scripts = scripts
            self._set_healthy(True)
            log.info("redis bus %s connected (node %s)", self.where, self.node_id)
            if self._attempted is not None:
                self._attempted.set()
            last_seen = [asyncio.get_running_loop().time()]
            tasks = [
                _spawn(self._reader(pubsub, last_seen)),
                _spawn(self._writer(client, scripts)),
                _spawn(self._syncer(pubsub, scripts)),
                _spawn(self._heartbeat_loop(pubsub, last_seen)),
                _spawn(self._liveness_loop(scripts)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
            raise _SessionLost("a bus task ended")
        finally:
            try:
                for task in tasks:
                    task.cancel()
                if tasks:
                    # asyncio.wait never raises the tasks' errors, but does let a
                    # cancellation of this task (stop) through.
                    await asyncio.wait(tasks)
                    for task in tasks:
                        if not task.cancelled():
                            task.exception()  # retrieved: no "never retrieved" noise
            finally:
                # Even when stop cancelled the wait above: never leak the sockets.
                self.scripts = None
                bus.end()
                if self._history is not None:
                    self._history.end()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), COMMAND_TIMEOUT)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.aclose(), COMMAND_TIMEOUT)

    async def _reader(self, pubsub: Any, last_seen: list[float]) -> None:
        assert self._bus is not None
        bus = self._bus
        loop = asyncio.get_running_loop()
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
            last_seen[0] = loop.time()
            if message is not None:
                bus.on_pubsub(message)

    async def _writer(self, client: Any, scripts: StateScripts) -> None:
        assert self._wake_writer is not None and self._bus is not None
        assert self._state is not None
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            await self._state.write(client, scripts)
            await self._bus.write(client)
            if self._history is not None:
                await self._history.write(client)

    async def _syncer(self, pubsub: Any, scripts: StateScripts) -> None:
        assert self._wake_syncer is not None and self._bus is not None
        assert self._state is not None
        while True:
            if not self._wake_syncer.is_set() and self.settled is not None:
                self.settled.set()
            await self._wake_syncer.wait()
            self._wake_syncer.clear()
            await self._bus.sync(pubsub)
            await self._state.reconcile(scripts)

    async def _heartbeat_loop(self, pubsub: Any, last_seen: list[float]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat)
            if loop.time() - last_seen[0] > MISSED_HEARTBEATS * self.heartbeat:
                raise _SessionLost("no answer to the heartbeat")
            # The PONG comes back through the reader, which marks the session alive.
            await asyncio.wait_for(pubsub.ping(), COMMAND_TIMEOUT)

    async def _liveness_loop(self, scripts: StateScripts) -> None:
        assert self._state is not None
        while True:
            await asyncio.sleep(self.heartbeat)
            await self._state.liveness(scripts)


def _spawn(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.create_task(coroutine)
