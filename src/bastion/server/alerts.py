"""Security alerts of one node: feed the engine, and act on what it raises.

:class:`NodeAlerts` feeds :class:`~bastion.security.alerts.AlertEngine` (the pure
thresholds) from three places:

* :meth:`NodeAlerts.on_refusal`, a refusal-path listener: every refusal, as it
  happens, with its address and slug (auth failures, rate-limit hits, payload
  and origin refusals);
* :meth:`NodeAlerts.on_audit`, called with every audit event the node records:
  new blocks (``ip_blocked_auto``, ``ip_blocked_manual``) with their address;
* :meth:`NodeAlerts.poll`, each heartbeat tick: the growth of the exact counters
  that carry no address, forged bus messages (by reason) and app webhook dead
  letters (by app id).

A raised alert, once per rule per window at most:

1. counts ``bastion_alerts_total{alert,severity}``;
2. logs one line (WARNING, ERROR when critical) with the counts and the top
   addresses and reasons;
3. writes one ``security_alert`` audit row (when the audit log is on);
4. with ``[alerts] url``: queues one signed POST in the durable webhook queue,
   as the sender :data:`~bastion.security.alerts.ALERTS_SENDER`. The dispatcher
   signs it with ``[alerts] secret`` and sends it only to that URL, with the
   webhooks' retries, dead letters and (``refuse_private``) SSRF rules; an
   alert's own dead letter never feeds ``webhook_dead_letters`` (no loop).

The windows run on the wall clock, so ``raised_at`` reads as a Unix time.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping

from bastion.config import AlertSettings
from bastion.metrics import Metrics
from bastion.protocol.refusals import RefusalRecord
from bastion.security.alerts import (
    ALERTS_SENDER,
    Alert,
    AlertEngine,
    alert_audit_event,
    alert_event,
    signal_of,
)
from bastion.security.audit import AuditEvent
from bastion.store.webhook_queue import NewDelivery, WebhookQueue
from bastion.webhooks.payloads import encode_body

__all__ = ["BLOCK_TYPES", "NodeAlerts"]

log = logging.getLogger("bastion.alerts")

#: Audit types that are new blocks.
BLOCK_TYPES = frozenset({"ip_blocked_auto", "ip_blocked_manual"})


class NodeAlerts:
    """The node's alert engine and what a raised alert does (see the module docstring).

    Args:
        settings: ``[alerts]``.
        metrics: the node's counters (``alerts``; read: ``bus_forged``, ``webhooks_dead``).
        loop: the node's loop (queueing a delivery runs off it).
        audit: records an audit event (nothing when the audit log is off).
        clock: Unix seconds.
        node: names this node in alert bodies (the host name by default).
    """

    def __init__(
        self,
        settings: AlertSettings,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        *,
        audit: Callable[[AuditEvent], None] | None = None,
        clock: Callable[[], float] = time.time,
        node: str | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loop = loop
        self.audit = audit
        self.clock = clock
        self.node = node or socket.gethostname()
        self.engine = AlertEngine(settings.rules(), top=settings.top)
        #: Every alert raised since start, oldest first (the last few are kept).
        self.raised: list[Alert] = []
        self._queue: WebhookQueue | None = None
        self._wake: Callable[[], None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        #: The counters :meth:`poll` has seen: reason → forged, app id → dead.
        self._forged_seen: dict[str, int] = dict(metrics.bus_forged)
        self._dead_seen: dict[str, int] = dict(metrics.webhooks_dead)

    # --- what feeds it ------------------------------------------------------------------

    def on_refusal(self, record: RefusalRecord) -> None:
        """Refusal-path listener: a refusal of a watched kind counts at once."""
        signal = signal_of(record.reason)
        if signal is not None:
            self._act(
                self.engine.observe(
                    signal, self.clock(), address=record.ip, reason=record.reason.value.slug
                )
            )

    def on_audit(self, event: AuditEvent) -> None:
        """An audit event the node records: blocks count as ``new_blocks``."""
        if event.type in BLOCK_TYPES:
            self._act(
                self.engine.observe("new_blocks", self.clock(), address=event.ip, reason=event.type)
            )

    def poll(self) -> None:
        """Count what the address-less counters gained since the last poll."""
        now = self.clock()
        for reason, count in self._grown(self.metrics.bus_forged, self._forged_seen).items():
            self._act(self.engine.observe("forged_bus_messages", now, count=count, reason=reason))
        dead = self._grown(self.metrics.webhooks_dead, self._dead_seen)
        dead.pop(ALERTS_SENDER, None)  # an alert's own dead letter raises no alert
        for app_id, count in dead.items():
            self._act(self.engine.observe("webhook_dead_letters", now, count=count, reason=app_id))

    @staticmethod
    def _grown(counter: Mapping[str, int], seen: dict[str, int]) -> dict[str, int]:
        grown = {}
        for key, count in counter.items():
            delta = count - seen.get(key, 0)
            if delta > 0:
                grown[key] = delta
                seen[key] = count
        return grown

    # --- what a raised alert does ---------------------------------------------------------

    def open_alerts(self) -> list[Alert]:
        """The alerts open now, most recent first."""
        return self.engine.open_alerts(self.clock())

    def _act(self, alert: Alert | None) -> None:
        if alert is None:
            return
        self.raised = [*self.raised[-99:], alert]
        self.metrics.alerts[(alert.rule, alert.severity)] += 1
        alert_id = uuid.uuid4().hex
        addresses = ",".join(f"{ip}={count}" for ip, count in alert.top_addresses) or "-"
        reasons = ",".join(f"{reason}={count}" for reason, count in alert.top_reasons) or "-"
        log.log(
            logging.ERROR if alert.severity == "critical" else logging.WARNING,
            "security alert %s severity=%s count=%d threshold=%d window=%gs"
            " top_addresses=%s top_reasons=%s",
            alert.rule,
            alert.severity,
            alert.count,
            alert.threshold,
            alert.window_seconds,
            addresses,
            reasons,
            extra={"alert": alert.rule, "alert_severity": alert.severity, "count": alert.count},
        )
        if self.audit is not None:
            self.audit(alert_audit_event(alert, id=alert_id))
        self._notify(alert, alert_id)

    # --- the operator's endpoint ------------------------------------------------------------

    def attach(self, queue: WebhookQueue, wake: Callable[[], None]) -> None:
        """The webhook queue is open: alerts are queued there from now on."""
        self._queue, self._wake = queue, wake

    def detach(self) -> None:
        """The queue is closing: alerts are no longer queued."""
        self._queue = self._wake = None

    def _notify(self, alert: Alert, alert_id: str) -> None:
        url = self.settings.url
        if url is None:
            return
        now = self.clock()
        body = encode_body(int(now * 1000), [alert_event(alert, id=alert_id, node=self.node)])
        delivery = NewDelivery(
            app_id=ALERTS_SENDER,
            url=url,
            body=body,
            idempotency_key=alert_id,
            created_at=now,
        )
        task = self.loop.create_task(self._enqueue(delivery))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _enqueue(self, delivery: NewDelivery) -> None:
        queue, wake = self._queue, self._wake
        stored = 0
        if queue is not None:
            try:
                stored = await asyncio.to_thread(queue.enqueue, [delivery])
            except Exception as exc:  # the queue names its file, never a body
                log.warning("security alert not queued for delivery: %s", exc)
        if stored:
            if wake is not None:
                wake()
            return
        self.metrics.webhooks_dropped[ALERTS_SENDER] += 1
        log.warning("a security alert was not queued: the webhook queue is full or closed")

    async def flush(self) -> None:
        """Wait until every raised alert's delivery is in the queue (a stop)."""
        while self._pending:
            await asyncio.wait(set(self._pending))
