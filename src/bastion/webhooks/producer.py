"""From hub events to durable webhook deliveries: the asyncio glue.

:meth:`WebhookProducer.on_event` is a :attr:`bastion.core.hub.Hub.listeners`
callback. It runs inside the hub's call (a subscribe, a client event, a
disconnect), so it never blocks and never raises: it smooths (``smoothing``), turns
the event into Pusher's object (``payloads``), filters it per endpoint and adds it to
that endpoint's open batch (``batcher``). A closed batch becomes one
:class:`~bastion.store.webhook_queue.NewDelivery` per endpoint, written to the SQLite
queue by one writer task through :func:`asyncio.to_thread` (in order, never on the
loop); then the dispatcher is woken to send it.

``subscription_count`` follows Pusher: only for apps that opted in to subscription
counting (``enable_subscription_count``); the cluster state reports counts already
throttled (at most one every 5 s per channel above 100 subscribers,
:mod:`bastion.protocol.counts`), so a busy channel never turns every subscribe into
a webhook.

One loop timer serves every delay: the next held vacated/removed and the next batch
window, whichever is first.

What is durable when: an event is in memory while it is held (up to
``vacated_delay_seconds``) or in an open batch (up to ``batch_max_ms``); once the
queue's ``enqueue`` has returned, it survives a crash and is delivered at least once.
:meth:`WebhookProducer.flush` (shutdown) releases every held event at once — the
channels did vacate — closes every open batch and waits for the writer, so a clean
stop loses nothing. A crash (SIGKILL) loses only what was still in memory.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bastion.config import AppSettings, WebhookDeliverySettings, WebhookEventType
from bastion.core import events as ev
from bastion.metrics import Metrics
from bastion.security.audit import AuditEvent
from bastion.store.webhook_queue import NewDelivery, WebhookQueue
from bastion.webhooks.batcher import Batch, Batcher
from bastion.webhooks.payloads import event_name, webhook_event
from bastion.webhooks.smoothing import Smoother

__all__ = ["MAX_UNWRITTEN", "WEBHOOK_DROPPED", "WebhookProducer"]

log = logging.getLogger("bastion.webhooks")

#: Audit event type recorded when deliveries are dropped (queue full or unwritable).
WEBHOOK_DROPPED = "webhook_dropped"
#: Closed batches waiting for the writer at most. Past it new ones are dropped and
#: counted: a stalled disk must not grow the node's memory without bound.
MAX_UNWRITTEN = 10_000

#: Each event type and the one it cancels (smoothing needs both halves of a pair
#: even when an endpoint asks for only one of them).
_PAIRED: dict[WebhookEventType, WebhookEventType] = {
    "channel_occupied": "channel_vacated",
    "channel_vacated": "channel_occupied",
    "member_added": "member_removed",
    "member_removed": "member_added",
}


@dataclass(frozen=True, slots=True)
class _Endpoint:
    url: str
    event_types: frozenset[str]
    channel_prefixes: tuple[str, ...] | None

    def wants(self, name: str, channel: str) -> bool:
        if name not in self.event_types:
            return False
        return self.channel_prefixes is None or channel.startswith(self.channel_prefixes)


class WebhookProducer:
    """Turns hub events into batched, durable webhook deliveries.

    Args:
        settings: ``[webhooks]`` (batching and smoothing).
        apps: every app; only those with ``webhooks`` produce anything.
        queue: the durable queue.
        loop: the running loop (timers, the writer task).
        wake: called after deliveries were stored (the dispatcher's ``wake``).
        metrics: the node's counters.
        audit: records a ``webhook_dropped`` warning when deliveries are dropped.
        wall_clock: Unix seconds, for ``time_ms`` and ``created_at``.
    """

    def __init__(
        self,
        settings: WebhookDeliverySettings,
        apps: Iterable[AppSettings],
        queue: WebhookQueue,
        loop: asyncio.AbstractEventLoop,
        *,
        wake: Callable[[], None],
        metrics: Metrics,
        audit: Callable[[AuditEvent], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._queue = queue
        self._loop = loop
        self._wake = wake
        self._metrics = metrics
        self._audit = audit
        self._wall_clock = wall_clock
        self._smoother = Smoother(settings.vacated_delay_seconds)
        self._batcher = Batcher(settings.batch_max_events, settings.batch_max_ms)
        self._endpoints: dict[str, tuple[_Endpoint, ...]] = {}
        #: app id → event types some endpoint wants, with their smoothing partners.
        self._interest: dict[str, frozenset[str]] = {}
        for app in apps:
            if not app.webhooks:
                continue
            endpoints = tuple(
                _Endpoint(
                    hook.url,
                    frozenset(hook.event_types),
                    None if hook.channel_prefixes is None else tuple(hook.channel_prefixes),
                )
                for hook in app.webhooks
            )
            wanted: set[str] = set()
            for endpoint in endpoints:
                wanted |= endpoint.event_types
            wanted |= {_PAIRED[name] for name in wanted if name in _PAIRED}
            if not app.enable_subscription_count:
                # Pusher sends these only to apps that opted in to subscription counting.
                wanted.discard("subscription_count")
            self._endpoints[app.id] = endpoints
            self._interest[app.id] = frozenset(wanted)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._unwritten: collections.deque[NewDelivery] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._dropping = False
        #: Deliveries handed to the queue and stored.
        self.stored = 0
        #: app id → deliveries dropped (queue full, writer backlog full, write failed).
        self.dropped: collections.Counter[str] = collections.Counter()
        #: Hub events or timer runs that failed unexpectedly (logged, never raised).
        self.failures = 0

    # --- the hub listener --------------------------------------------------------------

    def on_event(self, event: ev.HubEvent) -> None:
        """The hub listener: never blocks, never raises into the hub."""
        try:
            if self._closed:
                return
            interest = self._interest.get(event.app_id)
            if interest is None or event_name(event) not in interest:
                return
            now = self._loop.time()
            for item in self._smoother.push(event, now):
                self._route(item, now)
            self._release_due(now)
        except Exception as exc:
            self.failures += 1
            log.warning("webhook event not queued (%s): %s", type(event).__name__, exc)

    def _route(self, event: ev.HubEvent, now: float) -> None:
        """Add ``event`` to the open batch of every endpoint that wants it."""
        name = event_name(event)
        payload = None
        urls: set[str] = set()
        for endpoint in self._endpoints.get(event.app_id, ()):
            # Two entries with one URL share its batch: the event goes in once.
            if endpoint.url in urls or not endpoint.wants(name, event.channel):
                continue
            urls.add(endpoint.url)
            if payload is None:  # built once, shared by every endpoint's batch
                payload = webhook_event(event)
            time_ms = int(self._wall_clock() * 1000)
            batch = self._batcher.add(event.app_id, endpoint.url, payload, now, time_ms)
            if batch is not None:
                self._submit(batch)

    # --- timers ------------------------------------------------------------------------

    def _release_due(self, now: float) -> None:
        """Send what is due at ``now`` (held events, batches), re-arm."""
        for item in self._smoother.due(now):
            self._route(item, now)
        for batch in self._batcher.due(now):
            self._submit(batch)
        self._schedule()

    def _schedule(self) -> None:
        """Arm the one timer for the earliest held event or batch."""
        candidates = (self._smoother.next_due(), self._batcher.next_deadline())
        deadlines = [t for t in candidates if t is not None]
        if not deadlines:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        when = min(deadlines)
        if self._timer is not None:
            if self._timer_at <= when:
                return  # fires first anyway and re-arms
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        try:
            # The loop may run a timer up to its clock resolution early: it is due.
            self._release_due(max(self._loop.time(), self._timer_at))
        except Exception as exc:
            self.failures += 1
            log.warning("webhook timer failed: %s", exc)

    # --- the writer --------------------------------------------------------------------

    def _submit(self, batch: Batch) -> None:
        """Queue one closed batch for the writer (bounded)."""
        if len(self._unwritten) >= MAX_UNWRITTEN:
            self._dropped({batch.app_id: 1}, "the queue writer is behind")
            return
        self._unwritten.append(
            NewDelivery(
                app_id=batch.app_id,
                url=batch.url,
                body=batch.body(),
                idempotency_key=uuid.uuid4().hex,
                created_at=self._wall_clock(),
            )
        )
        if self._writer is None:
            self._writer = self._loop.create_task(self._write())

    async def _write(self) -> None:
        """Store what is unwritten, in order, off the loop; wake the dispatcher."""
        try:
            while self._unwritten:
                items = list(self._unwritten)
                self._unwritten.clear()
                try:
                    stored = await asyncio.to_thread(self._queue.enqueue, items)
                except Exception as exc:
                    stored = 0
                    self.failures += 1
                    log.warning("webhook queue write failed: %s", exc)
                self.stored += stored
                if stored < len(items):
                    # The queue keeps the first ones it can and drops the rest.
                    lost = collections.Counter(item.app_id for item in items[stored:])
                    self._dropped(lost, "the webhook queue is full or unwritable")
                else:
                    self._dropping = False
                if stored:
                    self._wake()
        finally:
            self._writer = None

    def _dropped(self, lost: dict[str, int], why: str) -> None:
        """Count dropped deliveries; log and audit once per episode of drops."""
        for app_id, count in lost.items():
            self.dropped[app_id] += count
            self._metrics.webhooks_dropped[app_id] += count
        if self._dropping:
            return
        self._dropping = True
        total = sum(lost.values())
        message = f"webhook deliveries dropped: {why}"
        log.warning("%s (%d now; counted until it recovers)", message, total)
        if self._audit is not None:
            for app_id, count in lost.items():
                self._audit(
                    AuditEvent(
                        id=uuid.uuid4().hex,
                        time=self._wall_clock(),
                        type=WEBHOOK_DROPPED,
                        severity="warning",
                        ip=None,
                        app_id=app_id,
                        socket_id=None,
                        user_id=None,
                        message=message,
                        metadata={"dropped": count},
                    )
                )

    # --- shutdown ----------------------------------------------------------------------

    async def flush(self) -> None:
        """Send everything now: release held events, close open batches, store them.

        After it, :meth:`on_event` ignores events (the node is stopping).
        """
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._loop.time()
        for released in self._smoother.flush():
            self._route(released, now)
        for batch in self._batcher.drain():
            self._submit(batch)
        await self.drained()

    async def drained(self) -> None:
        """Wait until every closed batch has been handed to the queue."""
        while self._writer is not None:
            # Shielded: a cancelled caller must not cancel a write half-way.
            await asyncio.shield(self._writer)
