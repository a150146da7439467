"""The bus over Redis pub/sub: topics by interest, signed messages in, signed messages out.

Topics (``prefix`` from ``[adapter]``):

* ``{prefix}:ch:{app_id}:{channel}`` — one per channel, subscribed only while this
  node has a local subscriber of it (``interest_on`` / ``interest_off``); channel
  events and the channel's control messages (members, counts) travel on it;
* ``{prefix}:users:{app_id}`` — server-to-user events (``#server-to-user-{id}``),
  sign-ins coming and going, and ``terminate_connections``; subscribed always:
  they go by sign-in, which the bus does not track.

Every message is signed with the cluster key (:mod:`bastion.adapters.wire`). A
receiver drops its own echoes (but for recorded events, which the history's
script publishes and every node delivers from here, this one included), stale
messages and replays (counted), refuses
(counts, and audits at a bounded rate) forged or malformed ones and messages
re-published on another topic, and hands the rest to the hub for local delivery
only. Outgoing messages wait in a bounded queue for the session's writer; while
the session is down, or when the queue is full, they are dropped and counted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from bastion.adapters import wire
from bastion.adapters.base import Receive
from bastion.adapters.messages import (
    ChannelEvent,
    Message,
    Replaced,
    Suspend,
    Terminate,
    UserOffline,
    UserOnline,
)
from bastion.adapters.redis.client import COMMAND_TIMEOUT
from bastion.adapters.redis.session import RedisSession
from bastion.metrics import Metrics
from bastion.protocol.names import SERVER_TO_USER_PREFIX
from bastion.security.audit import AuditEvent, bus_forged_event
from bastion.security.ratelimit import TokenBucket

__all__ = ["RedisBus"]

log = logging.getLogger("bastion.bus")

#: Outgoing messages waiting for the writer; past it publishes are dropped (``backlog``).
MAX_PENDING = 10_000
#: Messages written in one pipeline.
BATCH = 500
#: Topics in one SUBSCRIBE / UNSUBSCRIBE command.
SUBSCRIBE_CHUNK = 500
#: Longest a subscribe answer waits for its topic's SUBSCRIBE to be confirmed, seconds.
READY_WAIT = 2.0
#: Audit records for forged messages: refill per second and burst (the count is exact).
FORGED_AUDIT_RATE = 1.0
FORGED_AUDIT_BURST = 20.0


def _ignore(message: Message) -> None:
    """The receiver before the hub attaches."""


class RedisBus:
    """Implements :class:`~bastion.adapters.base.Bus` over Redis pub/sub.

    Args:
        session: the node's Redis session (its life cycle is the bus's).
        prefix: the cluster's key prefix.
        app_ids: the node's apps (their users topics are always subscribed).
        max_bytes: the largest incoming payload accepted.
        audit: records an audit event (forged messages), if any.
        wall_clock: Unix seconds (message timestamps).
        max_pending: bound of the outgoing queue.
    """

    def __init__(
        self,
        session: RedisSession,
        prefix: str,
        app_ids: list[str],
        max_bytes: int,
        *,
        audit: Callable[[AuditEvent], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._session = session
        self._prefix = prefix
        self._max_bytes = max_bytes
        self._metrics: Metrics | None = session.metrics
        self._audit = audit
        self._wall_clock = wall_clock
        self._max_pending = max_pending
        self._receive: Receive = _ignore
        self._sequence = itertools.count(1)
        self._windows = wire.ReplayWindows()
        #: Topics this node wants; the users topics always.
        self._interest: set[str] = {self._users_topic(app_id) for app_id in app_ids}
        #: Topics subscribed on the current session.
        self._subscribed: set[str] = set()
        #: Topics whose SUBSCRIBE Redis confirmed on the current session.
        self._confirmed: set[str] = set()
        #: topic → subscribe answers waiting for its confirmation.
        self._waiters: dict[str, list[Callable[[], None]]] = {}
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._forged_bucket = TokenBucket(FORGED_AUDIT_RATE, FORGED_AUDIT_BURST, 0.0)

    # --- the Bus protocol ------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id on the bus."""
        return self._session.node_id

    @property
    def healthy(self) -> bool:
        """Whether the session is up (subscribed and able to publish)."""
        return self._session.healthy

    def attach(self, receive: Receive) -> None:
        """Messages from other nodes go to ``receive`` (``Hub.receive``)."""
        self._receive = receive

    async def start(self) -> None:
        """Start the session (see :meth:`RedisSession.start`)."""
        await self._session.start()

    async def stop(self) -> None:
        """Leave the cluster and close the session (see :meth:`RedisSession.stop`)."""
        await self._session.stop()

    def publish(
        self,
        app_id: str,
        channel: str,
        event: str,
        data: Any,
        exclude_socket_id: str | None = None,
        user_id: str | None = None,
        *,
        client: bool = False,
    ) -> None:
        """Queue one signed channel event; dropped (counted) when the bus is down."""
        if self._can_queue():
            message = ChannelEvent(app_id, channel, event, data, exclude_socket_id, user_id, client)
            self._queue(message)

    def broadcast(self, message: Message) -> None:
        """Queue one signed control message; dropped (counted) when the bus is down."""
        if self._can_queue():
            self._queue(message)

    def _can_queue(self) -> bool:
        if not self._session.healthy:
            self._count_dropped("disconnected")
            return False
        if len(self._outbox) >= self._max_pending:
            self._count_dropped("backlog")
            return False
        return True

    def _queue(self, message: Message) -> None:
        self._outbox.append(self._encode(message))
        self._session.wake_writer()

    def interest_on(self, app_id: str, channel: str) -> None:
        """Subscribe to the channel's topic (soon, on the syncer)."""
        self._interest.add(self._channel_topic(app_id, channel))
        self._session.wake_syncer()

    def interest_off(self, app_id: str, channel: str) -> None:
        """Unsubscribe from the channel's topic (soon, on the syncer)."""
        self._interest.discard(self._channel_topic(app_id, channel))
        self._session.wake_syncer()

    def when_ready(self, app_id: str, channel: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the channel's topic is confirmed (bounded by READY_WAIT)."""
        topic = self._channel_topic(app_id, channel)
        if not self._session.healthy or topic in self._confirmed or topic not in self._interest:
            # Down: delivery is local only anyway, so waiting would only delay the answer.
            callback()
            return
        waiters = self._waiters.setdefault(topic, [])
        waiters.append(callback)
        if len(waiters) == 1:
            # Never keep a client waiting on a slow or lost confirmation.
            asyncio.get_running_loop().call_later(READY_WAIT, self._release, topic)

    # --- the session's side ----------------------------------------------------------

    async def begin(self, pubsub: Any) -> None:
        """A new session: subscribe to every topic of current interest."""
        self._subscribed = set()
        await self.sync(pubsub)

    def end(self) -> None:
        """The session is gone: nothing is subscribed any more."""
        self._subscribed = set()

    def lost(self) -> None:
        """The bus is down: answer whoever waits, drop what waits to be sent."""
        # Nothing will be confirmed on a dead session.
        self._confirmed = set()
        for topic in list(self._waiters):
            self._release(topic)
        if self._outbox:
            self._count_dropped("disconnected", len(self._outbox))
            self._outbox.clear()

    async def sync(self, pubsub: Any) -> None:
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

    async def write(self, client: Any) -> None:
        """Write the queued messages, a pipeline per batch."""
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

    async def publish_now(self, client: Any, message: Message) -> None:
        """Send ``message`` on ``client`` at once (a clean stop, after the session)."""
        topic, payload = self._encode(message)
        await client.publish(topic, payload)

    def on_pubsub(self, message: dict[str, Any]) -> None:
        """One item from the pub/sub connection (the session's reader)."""
        kind = message.get("type")
        if kind == "message":
            self._receive_payload(message["channel"], message["data"])
        elif kind == "subscribe":
            topic = _text(message["channel"])
            self._confirmed.add(topic)
            self._release(topic)
        elif kind == "unsubscribe":
            self._confirmed.discard(_text(message["channel"]))

    # --- messages ----------------------------------------------------------------------

    def _encode(self, message: Message) -> tuple[str, bytes]:
        """A signed message and its topic."""
        envelope = wire.Envelope(
            origin=self._session.node_id,
            seq=next(self._sequence),
            sent_at=int(self._wall_clock() * 1000),
            message=message,
        )
        return self._topic(message), wire.encode(envelope, self._session.key)

    def confirmed(self, app_id: str, channel: str) -> bool:
        """Whether events published on the channel now reach this node, if it wants them.

        ``False`` only while the node has interest in the channel's topic and Redis
        has not confirmed the subscription (``when_ready`` answers anyway after
        ``READY_WAIT``): a resume read then could miss what is published meanwhile.
        """
        topic = self._channel_topic(app_id, channel)
        return topic not in self._interest or topic in self._confirmed

    def encode_recorded(self, message: ChannelEvent) -> tuple[str, bytes]:
        """A server event the history records: its topic and signed bytes (kind ``he``)."""
        envelope = wire.Envelope(
            origin=self._session.node_id,
            seq=next(self._sequence),
            sent_at=int(self._wall_clock() * 1000),
            message=message,
        )
        return self._topic(message), wire.encode_recorded(envelope, self._session.key)

    def _receive_payload(self, topic: bytes, payload: bytes) -> None:
        try:
            position, signed = wire.split_position(payload)
            envelope = wire.decode(signed, self._session.key, self._max_bytes, position)
        except wire.BusMessageError as error:
            self.forged(error.reason, len(payload))
            return
        if envelope.origin == self._session.node_id and position is None:
            return  # our own publish, already delivered locally
        message = envelope.message
        if topic != self._topic(message).encode():
            # Authentic but re-published on another topic: not what its sender sent.
            self.forged("wrong_topic", len(payload))
            return
        now_ms = int(self._wall_clock() * 1000)
        if wire.is_stale(envelope.sent_at, now_ms):
            self._count_dropped("stale")
            return
        if not self._windows.accept(envelope.origin, envelope.seq, now_ms):
            self._count_dropped("replayed")
            return
        if self._metrics is not None and isinstance(message, ChannelEvent):
            # Channel events only: control messages are not events of the app.
            self._metrics.bus_received[message.app_id] += 1
        try:
            self._receive(message)
        except Exception:  # a delivery bug must not end the bus session
            log.exception("delivering a bus message failed")

    def forged(self, reason: str, size: int) -> None:
        """Count a refused message or value; log and audit it at a bounded rate."""
        if self._metrics is not None:
            self._metrics.bus_forged[reason] += 1
        if self._forged_bucket.take(time.monotonic()) > 0:
            return  # counted; audit and log are rate-limited against a flood
        log.warning("redis bus %s: refused a bus message (%s)", self._session.where, reason)
        if self._audit is not None:
            self._audit(bus_forged_event(reason, size, id=uuid.uuid4().hex, time=time.time()))

    def _release(self, topic: str) -> None:
        for callback in self._waiters.pop(topic, ()):
            try:
                callback()
            except Exception:  # one answer's defect must not stop the others
                log.exception("answering a subscribe failed")

    def drop(self, reason: str) -> None:
        """Count something of this node's that the cluster will not get (``reason``)."""
        self._count_dropped(reason)

    def _count_dropped(self, reason: str, count: int = 1) -> None:
        if self._metrics is not None:
            self._metrics.bus_dropped[reason] += count

    # --- topics ------------------------------------------------------------------------

    def _channel_topic(self, app_id: str, channel: str) -> str:
        # App ids cannot hold ":", so the topic splits back unambiguously.
        return f"{self._prefix}:ch:{app_id}:{channel}"

    def _users_topic(self, app_id: str) -> str:
        return f"{self._prefix}:users:{app_id}"

    def _topic(self, message: Message) -> str:
        if isinstance(message, UserOnline | UserOffline | Terminate | Replaced | Suspend) or (
            isinstance(message, ChannelEvent) and message.channel.startswith(SERVER_TO_USER_PREFIX)
        ):
            return self._users_topic(message.app_id)
        return self._channel_topic(message.app_id, message.channel)


def _app_of(topic: str, prefix: str) -> str:
    """The app id in a topic (``{prefix}:ch:{app}:…`` or ``{prefix}:users:{app}``)."""
    parts = topic[len(prefix) + 1 :].split(":", 2)
    return parts[1] if len(parts) > 1 else ""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
