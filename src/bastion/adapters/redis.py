"""The Redis adapter: nodes share publishes over Redis pub/sub.

Topics (``prefix`` from ``[adapter]``):

* ``{prefix}:ch:{app_id}:{channel}`` — one per channel, subscribed only while this
  node has a local subscriber of it (``interest_on`` / ``interest_off``);
* ``{prefix}:users:{app_id}`` — server-to-user events (``#server-to-user-{id}``),
  subscribed always: they go by sign-in, which the bus does not track.

Occupancy (``channel_occupied`` / ``channel_vacated``) is decided once for the
cluster in Redis (:mod:`bastion.adapters.occupancy`): the syncer runs one atomic
script per change of this node's interest, in order, by desired state (a quick
subscribe, unsubscribe, subscribe of one channel ends with the node's field set
and no event), and reports the channels this node was the first or the last
holder of. Every heartbeat the node refreshes its liveness key and reaps the
nodes whose key expired, reporting the channels only they held as vacated. After
a reconnection the node re-asserts its interest (an ``occupied`` may be reported
again if Redis lost its data); while the bus is down nothing is decided.

Every message is signed with the cluster key (see :mod:`bastion.adapters.bus`).
A receiver drops its own echoes, duplicates (replays) and stale messages, refuses
(counts and audits) forged or malformed ones, and hands the rest to the hub for
local delivery only.

Outage: one supervisor task connects, subscribes to every topic of current interest,
and runs a reader, a writer, a subscription syncer and a heartbeat. When any of them
fails (Redis gone, a command timed out, no answer to the heartbeat), the session is
torn down, :attr:`RedisAdapter.healthy` goes ``False`` and the supervisor reconnects
with exponential back-off (plus jitter) up to ``reconnect_max_seconds``. Publishes
while disconnected are dropped and counted, never queued: the node keeps serving
its local clients, and a late event would arrive out of order anyway. The outgoing
queue is bounded too (a slow Redis drops, counted as ``backlog``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from bastion.adapters import bus
from bastion.adapters.base import (
    MEMBER_ADDED,
    MEMBER_REMOVED,
    SUBSCRIPTION_COUNT,
    TERMINATE,
    WATCH_OFFLINE,
    WATCH_ONLINE,
    ChannelState,
    ClusterUnavailable,
    Deliver,
    Emit,
)
from bastion.adapters.occupancy import Occupancy, member_tag, split_tag
from bastion.config import AdapterSettings, AppSettings
from bastion.core import events as ev
from bastion.metrics import Metrics
from bastion.protocol import messages as msg
from bastion.protocol.names import SERVER_TO_USER_PREFIX
from bastion.security.audit import AuditEvent, bus_forged_event, redact
from bastion.security.ratelimit import TokenBucket

__all__ = ["RedisAdapter", "describe_url"]

_T = TypeVar("_T")

log = logging.getLogger("bastion.bus")

#: Seconds to open a TCP (or TLS) connection to Redis before the attempt fails.
CONNECT_TIMEOUT = 5.0
#: Seconds one command (publish batch, subscribe) may take before the session is lost.
COMMAND_TIMEOUT = 5.0
#: Seconds ``start`` waits for the first connection before serving without it.
START_WAIT = 5.0
#: Seconds ``stop`` waits for the session to close.
STOP_WAIT = 5.0
#: First back-off after a failure, seconds (doubles up to ``reconnect_max_seconds``).
INITIAL_BACKOFF = 0.1
#: Outgoing messages waiting for the writer; past it publishes are dropped (``backlog``).
MAX_PENDING = 10_000
#: Messages written in one pipeline.
BATCH = 500
#: Topics in one SUBSCRIBE / UNSUBSCRIBE command.
SUBSCRIBE_CHUNK = 500
#: Incoming messages older (or newer) than this, by the sender's clock, are dropped:
#: bounds how long a captured message can be replayed. Nodes need NTP-synced clocks.
REPLAY_WINDOW_MS = 60_000
#: Message ids remembered to drop replays inside the window (oldest forgotten first).
SEEN_IDS = 100_000
#: Heartbeats without any answer from Redis before the session is declared dead.
MISSED_HEARTBEATS = 3
#: Longest a subscribe answer waits for its topic's SUBSCRIBE to be confirmed, seconds.
READY_WAIT = 2.0
#: Seconds a clean stop may spend removing this node's share of the occupancy.
LEAVE_WAIT = 2.0
#: The liveness key lives this many heartbeats without a refresh.
LIVENESS_HEARTBEATS = 3
#: Audit records for forged messages: refill per second and burst (the count is exact).
FORGED_AUDIT_RATE = 1.0
FORGED_AUDIT_BURST = 20.0
#: Seconds a cluster-wide read (REST query, presence members, cache) may take.
QUERY_WAIT = 2.0
#: Seconds a query waits for this node's own pending changes to reach Redis first.
SETTLE_WAIT = 0.5


def describe_url(url: str) -> str:
    """``host:port/db`` (or the socket path) of a Redis URL: never its password."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"unix:{parts.path}"
        host = parts.hostname or "localhost"
        port = parts.port or 6379
    except ValueError:
        return "redis (unparsable url)"
    db = parts.path.lstrip("/") or "0"
    return f"{parts.scheme}://{host}:{port}/{db}"


class _SessionLost(Exception):
    """The bus session must be rebuilt (heartbeat unanswered)."""


class RedisAdapter:
    """Implements :class:`bastion.adapters.base.Adapter` over Redis pub/sub.

    Args:
        settings: the ``[adapter]`` settings (``url`` must be set).
        apps: the node's apps (their secrets derive the key without ``cluster_secret``;
            their payload limits bound an incoming message).
        metrics: the node's metrics, if any.
        audit: records an audit event (forged bus messages), if any.
        node_id: this node's id on the bus (random by default).
        wall_clock: Unix seconds (message timestamps).
        max_pending: bound of the outgoing queue.
    """

    def __init__(
        self,
        settings: AdapterSettings,
        apps: Sequence[AppSettings],
        *,
        metrics: Metrics | None = None,
        audit: Callable[[AuditEvent], None] | None = None,
        node_id: str | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_pending: int = MAX_PENDING,
    ) -> None:
        if settings.url is None:
            raise ValueError("adapter.url is required for the redis adapter")
        self._url = settings.url
        self._where = describe_url(settings.url)
        self._prefix = settings.prefix
        self._heartbeat = settings.heartbeat_seconds
        self._reconnect_max = settings.reconnect_max_seconds
        secret = settings.cluster_secret
        self._key = bus.cluster_key(
            secret.get_secret_value() if secret is not None else None,
            [app.secret.get_secret_value() for app in apps],
        )
        # JSON escaping can grow data up to 6x; names and ids add a little.
        largest = max((app.max_event_payload_bytes for app in apps), default=10_240)
        self._max_bytes = 6 * largest + 16_384
        self._node_id = node_id or uuid.uuid4().hex
        self._metrics = metrics
        self._audit = audit
        self._wall_clock = wall_clock
        self._max_pending = max_pending
        self._deliver: Deliver | None = None
        self._emit: Emit | None = None
        #: ``{app_id}:{channel}`` entries this node has local interest in (desired).
        self._occ_wanted: set[str] = set()
        #: Entries Redis records for this node, as far as this session knows.
        self._occ_held: set[str] = set()
        #: Re-read ``_occ_held`` from Redis before the next reconcile (we were reaped).
        self._occ_reload = False
        #: Presence members on this node (desired): tag → (user_info JSON, first socket).
        self._pres_wanted: dict[str, tuple[str, str | None]] = {}
        #: Member tags Redis records for this node, as far as this session knows.
        self._pres_held: set[str] = set()
        #: ``{app_id}\n{user_id}`` of users signed in on this node (desired, held).
        self._users_wanted: set[str] = set()
        self._users_held: set[str] = set()
        #: entry → this node's subscriber count; entries whose count Redis lacks.
        self._counts: dict[str, int] = {}
        self._counts_dirty: set[str] = set()
        #: entry → when its cluster count was last announced (loop time); entries
        #: whose announcement waits for the throttle.
        self._count_sent: dict[str, float] = {}
        self._count_held: set[str] = set()
        #: Entries whose app sends subscription_count events (the total is broadcast).
        self._count_announced: set[str] = set()
        #: entry → a cache channel's last event to record (the latest wins).
        self._cache_out: dict[str, tuple[str, str, int]] = {}
        #: The current session's state operations (``None`` while disconnected).
        self._state: Occupancy | None = None
        #: Set when the syncer has nothing left to do (a clean stop waits for it).
        self._settled: asyncio.Event | None = None
        #: Topics this node wants; the users topics always.
        self._interest: set[str] = {self._users_topic(app.id) for app in apps}
        #: Topics subscribed on the current session.
        self._subscribed: set[str] = set()
        #: Topics whose SUBSCRIBE Redis confirmed on the current session.
        self._confirmed: set[str] = set()
        #: topic → subscribe answers waiting for its confirmation.
        self._waiters: dict[str, list[Callable[[], None]]] = {}
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._forged_bucket = TokenBucket(FORGED_AUDIT_RATE, FORGED_AUDIT_BURST, 0.0)
        self._healthy = False
        self._task: asyncio.Task[None] | None = None
        self._wake_writer: asyncio.Event | None = None
        self._wake_syncer: asyncio.Event | None = None
        self._attempted: asyncio.Event | None = None
        #: Cluster reads in flight (kept so they are not garbage-collected).
        self._reads: set[asyncio.Task[None]] = set()

    # --- the Adapter protocol ----------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id on the bus."""
        return self._node_id

    @property
    def healthy(self) -> bool:
        """Whether the bus session is up (subscribed and able to publish)."""
        return self._healthy

    @property
    def clustered(self) -> bool:
        """Occupancy and presence are decided here, once for the cluster."""
        return True

    def attach(self, deliver: Deliver) -> None:
        """Events from other nodes go to ``deliver`` (``Hub.deliver_remote``)."""
        self._deliver = deliver

    def attach_events(self, emit: Emit) -> None:
        """Occupied/vacated decided for the cluster go to ``emit`` (the hub's listeners)."""
        self._emit = emit

    async def start(self) -> None:
        """Start the supervisor; wait (bounded) for the first connection attempt.

        A Redis that is down does not fail the start: the node serves its local
        clients and keeps reconnecting (start order in a deployment must not matter).
        """
        if self._task is not None:
            return
        self._wake_writer = asyncio.Event()
        self._wake_syncer = asyncio.Event()
        self._settled = asyncio.Event()
        self._attempted = asyncio.Event()
        self._task = asyncio.create_task(self._supervise(), name="bastion-bus")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), START_WAIT)
        if not self._healthy:
            log.warning(
                "redis bus %s unreachable at start: serving local clients only, reconnecting",
                self._where,
            )

    async def stop(self) -> None:
        """Leave the cluster, stop the supervisor and close the connections.

        With the bus up, interest changes still pending are written first, then the
        node removes its share of the occupancy (reporting the channels it was the
        last holder of) and its liveness key. With the bus down, the survivors reap
        the node once its liveness key expires.
        """
        task = self._task
        if task is None:
            return
        leave = self._healthy
        if leave and self._settled is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), LEAVE_WAIT)
        self._task = None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, STOP_WAIT)
        self._set_healthy(False)
        self._drop_outbox()
        if leave:
            try:
                await asyncio.wait_for(self._leave(), LEAVE_WAIT)
            except Exception as error:  # survivors reap what is left
                log.warning(
                    "redis bus %s: leaving the cluster failed (%s); survivors will reap",
                    self._where,
                    _describe(error),
                )

    async def _leave(self) -> None:
        client = self._client()
        try:
            occupancy = self._occupancy(client)
            # What the drain did not already remove (normally nothing).
            for tag in sorted(await occupancy.held_users()):
                if await occupancy.user_off(tag):
                    await self._publish_now(client, self._user_frame(tag, online=False))
            for tag in sorted(await occupancy.held_members()):
                if await occupancy.member_off(tag):
                    await self._publish_now(client, self._member_frame(tag, None))
                    self._report_member(tag, added=False)
            for entry in sorted(await occupancy.held()):
                if await occupancy.off(entry):
                    self._report(ev.ChannelVacated, entry)
            await occupancy.leave()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), COMMAND_TIMEOUT)

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: Any,
        exclude_socket_id: str | None,
        user_id: str | None = None,
        *,
        client: bool = False,
    ) -> None:
        """Queue one signed message for the other nodes; drop it when the bus is down."""
        if not self._healthy:
            self._count_dropped("disconnected")
            return
        if len(self._outbox) >= self._max_pending:
            self._count_dropped("backlog")
            return
        self._outbox.append(
            self._encode(app_id, channel, event, data, exclude_socket_id, user_id, client)
        )
        if self._wake_writer is not None:
            self._wake_writer.set()

    def _encode(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: Any,
        exclude_socket_id: str | None,
        user_id: str | None = None,
        client: bool = False,
    ) -> tuple[str, bytes]:
        """A signed bus message and its topic."""
        message = bus.BusMessage(
            origin=self._node_id,
            id=uuid.uuid4().hex,
            sent_at=int(self._wall_clock() * 1000),
            app_id=app_id,
            channel=channel,
            event=event,
            data=data,
            exclude_socket_id=exclude_socket_id,
            user_id=user_id,
            client=client,
        )
        return self._topic(app_id, channel), bus.encode(message, self._key)

    async def _publish_now(self, client: aioredis.Redis, frame: tuple[str, str, str, str]) -> None:
        app_id, channel, event, data = frame
        topic, payload = self._encode(app_id, channel, event, data, None)
        await client.publish(topic, payload)

    def interest_on(self, app_id: str, channel: str) -> None:
        """Subscribe to the channel's topic (soon, on the syncer)."""
        self._interest.add(self._channel_topic(app_id, channel))
        self._occ_wanted.add(f"{app_id}:{channel}")
        self._wake()

    def interest_off(self, app_id: str, channel: str) -> None:
        """Unsubscribe from the channel's topic (soon, on the syncer)."""
        self._interest.discard(self._channel_topic(app_id, channel))
        self._occ_wanted.discard(f"{app_id}:{channel}")
        self._wake()

    def _wake(self) -> None:
        if self._settled is not None:
            self._settled.clear()
        if self._wake_syncer is not None:
            self._wake_syncer.set()

    def when_ready(self, app_id: str, channel: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the channel's topic is confirmed (bounded by READY_WAIT)."""
        topic = self._channel_topic(app_id, channel)
        if not self._healthy or topic in self._confirmed or topic not in self._interest:
            # Down: delivery is local only anyway, so waiting would only delay the answer.
            callback()
            return
        waiters = self._waiters.setdefault(topic, [])
        waiters.append(callback)
        if len(waiters) == 1:
            # Never keep a client waiting on a slow or lost confirmation.
            asyncio.get_running_loop().call_later(READY_WAIT, self._release, topic)

    def _release(self, topic: str) -> None:
        for callback in self._waiters.pop(topic, ()):
            try:
                callback()
            except Exception:  # one answer's defect must not stop the others
                log.exception("answering a subscribe failed")

    def _release_all(self) -> None:
        for topic in list(self._waiters):
            self._release(topic)

    # --- cluster state -------------------------------------------------------------------

    def count(self, app_id: str, channel: str, subscribers: int, *, announce: bool) -> None:
        """Record this node's subscriber count of ``channel`` (soon, on the syncer)."""
        entry = f"{app_id}:{channel}"
        if announce:
            self._count_announced.add(entry)
        else:
            self._count_announced.discard(entry)
        if self._counts.get(entry) != subscribers:
            self._counts[entry] = subscribers
            self._counts_dirty.add(entry)
            self._wake()

    def member_on(
        self, app_id: str, channel: str, user_id: str, user_info: Any, socket_id: str
    ) -> None:
        """Add a member (soon, on the syncer); member_added goes out if new to the cluster."""
        tag = member_tag(f"{app_id}:{channel}", user_id)
        info = msg.dumps(user_info)
        self._pres_wanted[tag] = (info, socket_id)
        if not self._healthy:
            # Nothing can be decided for the cluster: this node's clients learn now.
            self._deliver_frame(self._member_frame(tag, info), socket_id)
        self._wake()

    def member_off(self, app_id: str, channel: str, user_id: str) -> None:
        """Remove a member (soon); member_removed goes out if it left the cluster."""
        tag = member_tag(f"{app_id}:{channel}", user_id)
        self._pres_wanted.pop(tag, None)
        if not self._healthy:
            self._deliver_frame(self._member_frame(tag, None), None)
        self._wake()

    def user_presence(self, app_id: str, user_id: str, online: bool) -> None:
        """Record a user signed in on this node, or its last connection gone (soon)."""
        tag = f"{app_id}\n{user_id}"
        if online:
            self._users_wanted.add(tag)
        else:
            self._users_wanted.discard(tag)
        if not self._healthy:
            self._deliver_frame(self._user_frame(tag, online=online), None)
        self._wake()

    def terminate_user(self, app_id: str, user_id: str) -> None:
        """Ask every other node to close ``user_id``'s connections."""
        self.publish(app_id, SERVER_TO_USER_PREFIX + user_id, TERMINATE, "", None)

    def cache(self, app_id: str, channel: str, event: str, data: str, ttl_seconds: int) -> None:
        """Record a cache channel's last event in Redis (with the next publishes)."""
        if not self._healthy:
            return
        self._cache_out[f"{app_id}:{channel}"] = (event, data, max(1, ttl_seconds) * 1000)
        if self._wake_writer is not None:
            self._wake_writer.set()

    def members(
        self, app_id: str, channel: str, callback: Callable[[dict[str, Any] | None], None]
    ) -> None:
        """Call back with the cluster's members of ``channel``; ``None`` when unknown."""

        async def read(state: Occupancy) -> dict[str, Any]:
            raw = await state.members(f"{app_id}:{channel}")
            return {user_id: _loads(info) for user_id, info in raw.items()}

        self._read(read, callback)

    def cached_event(
        self, app_id: str, channel: str, callback: Callable[[tuple[str, str] | None, bool], None]
    ) -> None:
        """Call back with a cache channel's last event and whether Redis answered."""

        async def read(state: Occupancy) -> tuple[str, str] | None:
            found = await state.cached(f"{app_id}:{channel}")
            return None if found is None else (found[0], found[1])

        def done(result: tuple[str, str] | _Unknown | None) -> None:
            if isinstance(result, _Unknown):
                callback(None, False)
            else:
                callback(result, True)

        self._read(read, done, unknown=_UNKNOWN)

    def online_users(
        self, app_id: str, user_ids: list[str], callback: Callable[[set[str] | None], None]
    ) -> None:
        """Call back with those of ``user_ids`` signed in anywhere; ``None`` when unknown."""

        async def read(state: Occupancy) -> set[str]:
            return await state.online(app_id, user_ids)

        self._read(read, callback)

    def _read(self, read: Callable[[Occupancy], Any], callback: Any, unknown: Any = None) -> None:
        """Run one cluster read off the caller's stack; call back with ``unknown`` on failure."""
        state = self._state
        if not self._healthy or state is None:
            callback(unknown)
            return

        async def run() -> None:
            try:
                result = await asyncio.wait_for(read(state), QUERY_WAIT)
            except Exception as error:
                log.warning(
                    "redis bus %s: a cluster read failed (%s)", self._where, _describe(error)
                )
                result = unknown
            try:
                callback(result)
            except Exception:  # the callback's defect must not be lost silently
                log.exception("answering with cluster state failed")

        task = asyncio.get_running_loop().create_task(run())
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def channel_states(
        self, app_id: str, names: list[str] | None, prefix: str = ""
    ) -> dict[str, ChannelState]:
        """The cluster's view of ``names``, or of every occupied channel with ``prefix``."""

        async def read(state: Occupancy) -> dict[str, ChannelState]:
            wanted = names
            if wanted is None:
                found = await state.occupied(app_id, prefix)
                return {
                    name: ChannelState(True, subscriptions, users)
                    for name, (subscriptions, users) in found.items()
                }
            infos = await state.channel_info([f"{app_id}:{name}" for name in wanted])
            return {
                name: ChannelState(occupied, subscriptions, users)
                for name, (occupied, subscriptions, users) in zip(wanted, infos, strict=True)
            }

        return await self._query(read)

    async def user_ids(self, app_id: str, channel: str) -> list[str]:
        """The users present in ``channel`` anywhere in the cluster."""

        async def read(state: Occupancy) -> list[str]:
            return sorted(await state.members(f"{app_id}:{channel}"))

        return await self._query(read)

    async def cached(self, app_id: str, channel: str) -> tuple[str, str, int] | None:
        """A cache channel's last event ``(event, data, ttl_ms)`` in the cluster."""

        async def read(state: Occupancy) -> tuple[str, str, int] | None:
            return await state.cached(f"{app_id}:{channel}")

        return await self._query(read)

    async def claim_signature(
        self, app_id: str, signature: str, grace_seconds: float, ttl_seconds: float
    ) -> bool | None:
        """Claim a signed REST request's signature for the cluster; ``None`` if unknown."""
        state = self._state
        if not self._healthy or state is None:
            return None
        grace_ms, ttl_ms = int(grace_seconds * 1000), int(ttl_seconds * 1000)
        try:
            return await asyncio.wait_for(
                state.claim(app_id, signature, grace_ms, ttl_ms), QUERY_WAIT
            )
        except (TimeoutError, aioredis.RedisError) as error:
            log.warning(
                "redis bus %s: replay guard unavailable (%s); this node's guard only",
                self._where,
                _describe(error),
            )
            return None

    async def _query(self, read: Callable[[Occupancy], Coroutine[Any, Any, _T]]) -> _T:
        settled = self._settled
        if settled is not None:
            # Read this node's own writes: its pending interest, member and count
            # changes are applied first (not waiting forever under constant churn).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), SETTLE_WAIT)
        state = self._state
        if not self._healthy or state is None:
            raise ClusterUnavailable("the redis bus is disconnected")
        try:
            return await asyncio.wait_for(read(state), QUERY_WAIT)
        except TimeoutError:
            raise ClusterUnavailable("the redis bus did not answer in time") from None
        except aioredis.RedisError as error:
            raise ClusterUnavailable(_describe(error)) from None

    # --- cluster events ------------------------------------------------------------------

    def _announce_count(self, entry: str, total: int) -> None:
        """Tell every node a channel's cluster-wide subscriber count (throttled as Pusher)."""
        app_id, _, channel = entry.partition(":")
        if channel.startswith("presence-"):
            return  # presence channels count members, not subscriptions
        loop = asyncio.get_running_loop()
        now = loop.time()
        sent = self._count_sent.get(entry)
        if total > msg.COUNT_THROTTLE_THRESHOLD and sent is not None:
            wait = sent + msg.COUNT_THROTTLE_SECONDS - now
            if wait > 0:
                if entry not in self._count_held:
                    self._count_held.add(entry)
                    loop.call_later(wait, self._recount, entry)
                return
        self._count_sent[entry] = now
        if entry in self._count_announced:  # else only the webhook event: no bus traffic
            data = msg.dumps({"subscription_count": total})
            self._broadcast((app_id, channel, SUBSCRIPTION_COUNT, data), None)
        if self._emit is not None:
            try:
                self._emit(ev.SubscriptionCountChanged(app_id, channel, total))
            except Exception:  # a listener's defect must not end the bus session
                log.exception("reporting SubscriptionCountChanged failed")

    def _recount(self, entry: str) -> None:
        """A throttled count is due: write (and so read back) the count again."""
        self._count_held.discard(entry)
        if entry in self._counts:
            self._counts_dirty.add(entry)
            self._wake()

    def _member_frame(self, tag: str, info: str | None) -> tuple[str, str, str, str]:
        """``(app_id, channel, event, data)`` of member_added (with ``info``) or _removed."""
        app_id, channel, user_id = split_tag(tag)
        if info is None:
            return app_id, channel, MEMBER_REMOVED, msg.dumps({"user_id": user_id})
        data = msg.dumps({"user_id": user_id, "user_info": _loads(info)})
        return app_id, channel, MEMBER_ADDED, data

    @staticmethod
    def _user_frame(tag: str, *, online: bool) -> tuple[str, str, str, str]:
        app_id, _, user_id = tag.partition("\n")
        event = WATCH_ONLINE if online else WATCH_OFFLINE
        return app_id, SERVER_TO_USER_PREFIX + user_id, event, ""

    def _deliver_frame(self, frame: tuple[str, str, str, str], exclude: str | None) -> None:
        """Hand a cluster event to this node's own clients."""
        if self._deliver is None:
            return
        app_id, channel, event, data = frame
        try:
            self._deliver(app_id, channel, event, data, exclude, None)
        except Exception:  # a delivery bug must not end the bus session
            log.exception("delivering a cluster event failed")

    def _broadcast(self, frame: tuple[str, str, str, str], exclude: str | None) -> None:
        """A cluster decision: to this node's clients, then to the other nodes."""
        self._deliver_frame(frame, exclude)
        app_id, channel, event, data = frame
        self.publish(app_id, channel, event, data, exclude)

    def _report_member(self, tag: str, *, added: bool) -> None:
        if self._emit is None:
            return
        app_id, channel, user_id = split_tag(tag)
        kind = ev.MemberAdded if added else ev.MemberRemoved
        try:
            self._emit(kind(app_id, channel, user_id))
        except Exception:  # a listener's defect must not end the bus session
            log.exception("reporting %s failed", kind.__name__)

    # --- topics ----------------------------------------------------------------------------

    def _channel_topic(self, app_id: str, channel: str) -> str:
        # App ids cannot hold ":", so the topic splits back unambiguously.
        return f"{self._prefix}:ch:{app_id}:{channel}"

    def _users_topic(self, app_id: str) -> str:
        return f"{self._prefix}:users:{app_id}"

    def _topic(self, app_id: str, channel: str) -> str:
        if channel.startswith(SERVER_TO_USER_PREFIX):
            return self._users_topic(app_id)
        return self._channel_topic(app_id, channel)

    # --- the session -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = INITIAL_BACKOFF
        failures = 0
        while self._task is not None:  # stop() clears it (a swallowed cancel ends too)
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure ends the session, never the node
                was_healthy = self._healthy
                self._set_healthy(False)
                if was_healthy:
                    delay, failures = INITIAL_BACKOFF, 0
                    log.warning(
                        "redis bus %s lost (%s): serving local clients only, reconnecting",
                        self._where,
                        _describe(error),
                    )
                else:
                    failures += 1
                    # Every attempt at DEBUG; a reminder at WARNING now and then.
                    level = logging.WARNING if failures % 20 == 0 else logging.DEBUG
                    log.log(
                        level,
                        "redis bus %s still unreachable after %d attempts (%s)",
                        self._where,
                        failures,
                        _describe(error),
                    )
            finally:
                self._set_healthy(False)
                self._drop_outbox()
                if self._attempted is not None:
                    self._attempted.set()
            # Jitter so that a cluster does not reconnect in lock-step after an outage.
            await asyncio.sleep(delay * (1 + random.random() / 2))
            delay = min(delay * 2, self._reconnect_max)

    def _client(self) -> aioredis.Redis:
        client: aioredis.Redis = aioredis.from_url(
            self._url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            socket_keepalive=True,
            health_check_interval=0,
            # Reconnection is ours (with back-off and resubscription), never redis-py's.
            retry=Retry(NoBackoff(), 0),
        )
        return client

    def _occupancy(self, client: aioredis.Redis) -> Occupancy:
        ttl_ms = max(1, int(LIVENESS_HEARTBEATS * self._heartbeat * 1000))
        return Occupancy(client, self._prefix, self._node_id, ttl_ms)

    async def _session(self) -> None:
        client = self._client()
        occupancy = self._occupancy(client)
        # redis-py leaves the PubSub methods untyped.
        pubsub: Any = client.pubsub(ignore_subscribe_messages=False)
        tasks: list[asyncio.Task[None]] = []
        try:
            await client.ping()
            await pubsub.connect()
            self._subscribed = set()
            await self._sync(pubsub)
            # Register, then re-assert this node's interest: what the last session
            # left in Redis is the starting point (channels left during an outage
            # are vacated now; a reaped node starts from nothing).
            await asyncio.wait_for(occupancy.beat(), COMMAND_TIMEOUT)
            self._occ_reload = True
            await self._reconcile(occupancy)
            self._state = occupancy
            self._set_healthy(True)
            log.info("redis bus %s connected (node %s)", self._where, self._node_id)
            if self._attempted is not None:
                self._attempted.set()
            last_seen = [asyncio.get_running_loop().time()]
            tasks = [
                _spawn(self._reader(pubsub, last_seen)),
                _spawn(self._writer(client, occupancy)),
                _spawn(self._syncer(pubsub, occupancy)),
                _spawn(self._heartbeat_loop(pubsub, last_seen)),
                _spawn(self._liveness_loop(occupancy)),
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
                self._state = None
                self._subscribed = set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), COMMAND_TIMEOUT)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.aclose(), COMMAND_TIMEOUT)

    async def _reader(self, pubsub: Any, last_seen: list[float]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
            last_seen[0] = loop.time()
            if message is None:
                continue
            kind = message.get("type")
            if kind == "message":
                self._receive(message["channel"], message["data"])
            elif kind == "subscribe":
                topic = _text(message["channel"])
                self._confirmed.add(topic)
                self._release(topic)
            elif kind == "unsubscribe":
                self._confirmed.discard(_text(message["channel"]))

    async def _writer(self, client: aioredis.Redis, occupancy: Occupancy) -> None:
        assert self._wake_writer is not None
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            if self._cache_out:
                writes, self._cache_out = self._cache_out, {}
                # Reset on any exit (a cancelled session too): no unclosed pipelines.
                async with client.pipeline(transaction=False) as pipe:
                    for entry, (event, data, ttl_ms) in writes.items():
                        value = json.dumps([event, data])
                        pipe.set(occupancy.cache_key(entry), value, px=ttl_ms)
                    await asyncio.wait_for(pipe.execute(), COMMAND_TIMEOUT)
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(len(self._outbox), BATCH))]
                async with client.pipeline(transaction=False) as pipe:
                    for topic, payload in batch:
                        pipe.publish(topic, payload)
                    try:
                        await asyncio.wait_for(pipe.execute(), COMMAND_TIMEOUT)
                    except BaseException:
                        self._count_dropped("disconnected", len(batch))
                        raise
                if self._metrics is not None:
                    for topic, _ in batch:
                        self._metrics.bus_published[_app_of(topic, self._prefix)] += 1

    async def _syncer(self, pubsub: Any, occupancy: Occupancy) -> None:
        assert self._wake_syncer is not None
        while True:
            if not self._wake_syncer.is_set() and self._settled is not None:
                self._settled.set()
            await self._wake_syncer.wait()
            self._wake_syncer.clear()
            await self._sync(pubsub)
            await self._reconcile(occupancy)

    async def _reconcile(self, occupancy: Occupancy) -> None:
        """Make Redis record this node's interest as it is now, one change at a time.

        By desired state: an entry is written only if it still differs when its
        turn comes, so a channel left and joined again meanwhile costs nothing.
        Changes made during a pass wake the syncer for another one.
        """
        if self._occ_reload:
            self._occ_reload = False
            self._occ_held = await asyncio.wait_for(occupancy.held(), COMMAND_TIMEOUT)
            self._pres_held = await asyncio.wait_for(occupancy.held_members(), COMMAND_TIMEOUT)
            self._users_held = await asyncio.wait_for(occupancy.held_users(), COMMAND_TIMEOUT)
            self._counts_dirty = set(self._counts)
        # Members leave before their channel is vacated, and join after it is occupied.
        members = self._pres_held
        for tag in sorted(members - self._pres_wanted.keys()):
            if tag in self._pres_wanted or tag not in members:
                continue
            removed = await asyncio.wait_for(occupancy.member_off(tag), COMMAND_TIMEOUT)
            members.discard(tag)
            if removed:
                self._broadcast(self._member_frame(tag, None), None)
                self._report_member(tag, added=False)
        users = self._users_held
        for tag in sorted(users - self._users_wanted):
            if tag in self._users_wanted or tag not in users:
                continue
            offline = await asyncio.wait_for(occupancy.user_off(tag), COMMAND_TIMEOUT)
            users.discard(tag)
            if offline:
                self._broadcast(self._user_frame(tag, online=False), None)
        held = self._occ_held
        for entry in sorted(held - self._occ_wanted):
            if entry in self._occ_wanted or entry not in held:
                continue
            vacated = await asyncio.wait_for(occupancy.off(entry), COMMAND_TIMEOUT)
            held.discard(entry)
            self._counts.pop(entry, None)
            if vacated:
                self._count_sent.pop(entry, None)
                self._count_announced.discard(entry)
                self._report(ev.ChannelVacated, entry)
            else:  # the others' subscribers learn the smaller total
                ((_, total, _),) = await asyncio.wait_for(
                    occupancy.channel_info([entry]), COMMAND_TIMEOUT
                )
                self._announce_count(entry, total)
        for entry in sorted(self._occ_wanted - held):
            if entry not in self._occ_wanted or entry in held:
                continue
            occupied = await asyncio.wait_for(occupancy.on(entry), COMMAND_TIMEOUT)
            held.add(entry)
            if occupied:
                self._report(ev.ChannelOccupied, entry)
        for tag in sorted(self._pres_wanted.keys() - members):
            wanted = self._pres_wanted.get(tag)
            if wanted is None or tag in members:
                continue
            added = await asyncio.wait_for(occupancy.member_on(tag, wanted[0]), COMMAND_TIMEOUT)
            members.add(tag)
            if added:
                self._broadcast(self._member_frame(tag, wanted[0]), wanted[1])
                self._report_member(tag, added=True)
        for tag in sorted(self._users_wanted - users):
            if tag not in self._users_wanted or tag in users:
                continue
            online = await asyncio.wait_for(occupancy.user_on(tag), COMMAND_TIMEOUT)
            users.add(tag)
            if online:
                self._broadcast(self._user_frame(tag, online=True), None)
        dirty = {entry for entry in self._counts_dirty if entry in self._counts}
        # A count whose channel Redis does not record for us yet waits for its turn.
        self._counts_dirty = dirty - held
        counts = {entry: self._counts[entry] for entry in dirty & held}
        if counts:
            totals = await asyncio.wait_for(occupancy.counts(counts), COMMAND_TIMEOUT)
            for entry, total in totals.items():
                self._announce_count(entry, total)

    async def _liveness_loop(self, occupancy: Occupancy) -> None:
        assert self._wake_syncer is not None
        while True:
            await asyncio.sleep(self._heartbeat)
            if await asyncio.wait_for(occupancy.beat(), COMMAND_TIMEOUT):
                # Our registration was gone: survivors took us for dead and removed
                # our share (reporting it vacated). Start again from what Redis has.
                log.warning("redis bus %s: this node was reaped; re-asserting", self._where)
                self._occ_reload = True
                self._wake()
            for dead in await asyncio.wait_for(occupancy.dead_nodes(), COMMAND_TIMEOUT):
                reaped = await asyncio.wait_for(occupancy.reap(dead), COMMAND_TIMEOUT)
                log.info(
                    "redis bus %s: reaped node %s (%d channels vacated, %d members removed)",
                    self._where,
                    dead,
                    len(reaped.vacated),
                    len(reaped.removed),
                )
                for tag in reaped.offline:
                    self._broadcast(self._user_frame(tag, online=False), None)
                for tag in reaped.removed:
                    self._broadcast(self._member_frame(tag, None), None)
                    self._report_member(tag, added=False)
                for entry in reaped.vacated:
                    self._report(ev.ChannelVacated, entry)

    def _report(self, kind: type[ev.ChannelOccupied] | type[ev.ChannelVacated], entry: str) -> None:
        """Hand an occupancy decision to the hub's listeners (never raises)."""
        if self._emit is None:
            return
        # App ids cannot hold ":", so the entry splits back unambiguously.
        app_id, _, channel = entry.partition(":")
        try:
            self._emit(kind(app_id, channel))
        except Exception:  # a listener's defect must not end the bus session
            log.exception("reporting %s failed", kind.__name__)

    async def _sync(self, pubsub: Any) -> None:
        """Make the subscribed topics what the node has interest in."""
        wanted = set(self._interest)
        joining = sorted(wanted - self._subscribed)
        leaving = sorted(self._subscribed - wanted)
        for start in range(0, len(joining), SUBSCRIBE_CHUNK):
            chunk = joining[start : start + SUBSCRIBE_CHUNK]
            await asyncio.wait_for(pubsub.subscribe(*chunk), COMMAND_TIMEOUT)
            self._subscribed.update(chunk)
        for start in range(0, len(leaving), SUBSCRIBE_CHUNK):
            chunk = leaving[start : start + SUBSCRIBE_CHUNK]
            await asyncio.wait_for(pubsub.unsubscribe(*chunk), COMMAND_TIMEOUT)
            self._subscribed.difference_update(chunk)

    async def _heartbeat_loop(self, pubsub: Any, last_seen: list[float]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._heartbeat)
            if loop.time() - last_seen[0] > MISSED_HEARTBEATS * self._heartbeat:
                raise _SessionLost("no answer to the heartbeat")
            # The PONG comes back through the reader, which marks the session alive.
            await asyncio.wait_for(pubsub.ping(), COMMAND_TIMEOUT)

    # --- receiving -------------------------------------------------------------------------

    def _receive(self, topic: bytes, payload: bytes) -> None:
        try:
            message = bus.decode(payload, self._key, self._max_bytes)
        except bus.BusMessageError as error:
            self._forged(error.reason, len(payload))
            return
        if message.origin == self._node_id:
            return  # our own publish, already delivered locally
        if topic != self._topic(message.app_id, message.channel).encode():
            # Authentic but re-published on another topic: not what its sender sent.
            self._forged("wrong_topic", len(payload))
            return
        now_ms = int(self._wall_clock() * 1000)
        if abs(now_ms - message.sent_at) > REPLAY_WINDOW_MS:
            self._count_dropped("stale")
            return
        if not self._remember(message.id, message.sent_at, now_ms):
            self._count_dropped("replayed")
            return
        if self._metrics is not None and not message.event.startswith("pusher_internal:"):
            # Channel events only: cluster control messages (members, counts,
            # sign-ins, terminations) are not events of the app.
            self._metrics.bus_received[message.app_id] += 1
        if self._deliver is None:
            return
        try:
            self._deliver(
                message.app_id,
                message.channel,
                message.event,
                message.data,
                message.exclude_socket_id,
                message.user_id,
                client=message.client,
            )
        except Exception:  # a delivery bug must not end the bus session
            log.exception("delivering a bus message failed")

    def _remember(self, message_id: str, sent_at: int, now_ms: int) -> bool:
        """Record ``message_id``; ``False`` when it was seen (a replay)."""
        seen = self._seen
        if message_id in seen:
            return False
        seen[message_id] = sent_at
        # Forget ids that left the window (nobody can replay them now), and the
        # oldest past the bound.
        while seen:
            oldest_id, oldest_at = next(iter(seen.items()))
            if len(seen) > SEEN_IDS or now_ms - oldest_at > REPLAY_WINDOW_MS:
                del seen[oldest_id]
            else:
                break
        return True

    def _forged(self, reason: str, size: int) -> None:
        if self._metrics is not None:
            self._metrics.bus_forged[reason] += 1
        now = time.monotonic()
        if self._forged_bucket.take(now) > 0:
            return  # counted; audit and log are rate-limited against a flood
        log.warning("redis bus %s: refused a bus message (%s)", self._where, reason)
        if self._audit is not None:
            self._audit(bus_forged_event(reason, size, id=uuid.uuid4().hex, time=time.time()))

    # --- state -----------------------------------------------------------------------------

    def _set_healthy(self, healthy: bool) -> None:
        if healthy and not self._healthy and self._metrics is not None:
            self._metrics.bus_connects += 1
        self._healthy = healthy
        if not healthy:
            # Nothing will be confirmed on a dead session; answer whoever waits.
            self._confirmed = set()
            self._release_all()
        if self._metrics is not None:
            self._metrics.bus_connected = int(healthy)

    def _drop_outbox(self) -> None:
        if self._outbox:
            self._count_dropped("disconnected", len(self._outbox))
            self._outbox.clear()

    def _count_dropped(self, reason: str, count: int = 1) -> None:
        if self._metrics is not None:
            self._metrics.bus_dropped[reason] += count


def _spawn(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.create_task(coroutine)


def _app_of(topic: str, prefix: str) -> str:
    """The app id in a topic (``{prefix}:ch:{app}:…`` or ``{prefix}:users:{app}``)."""
    parts = topic[len(prefix) + 1 :].split(":", 2)
    return parts[1] if len(parts) > 1 else ""


def _describe(error: BaseException) -> str:
    """An error's class and text, scrubbed and short (it may echo server replies)."""
    text = redact(str(error))[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Unknown:
    """A cluster read that got no answer (distinct from an answer of ``None``)."""


_UNKNOWN = _Unknown()


def _loads(text: str) -> Any:
    """A JSON value recorded by a node (``None`` if it is not valid JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
