"""The one refusal path: count, log, audit, and tell the listeners (reputation, budgets).

Every refusal, whatever layer found it, passes through :meth:`RefusalPath.record`
before its connection or request is answered. The answer itself (close code,
``pusher:error``, subscription error or HTTP status) comes from
:mod:`bastion.protocol.refusals`. Log lines carry the rule and identifiers,
never the refused data.

What each refusal reaches:

* the counter ``Metrics.refusals`` (slug and app) and every :attr:`RefusalPath.listeners`
  (IP reputation, the failed-authentication budget): every time, at once;
* the log and every :attr:`RefusalPath.summaries` (the audit log): **aggregated**
  per ``(ip, slug, app)`` over :data:`AGGREGATE_SECONDS`
  (:class:`~bastion.security.repeats.RepeatAggregator`). The first refusal of a
  key is written at once, as one line and one row; the repeats inside its window
  become one more line and one more row carrying their exact ``count`` and the
  ``first``/``last`` times, written when the window closes
  (:meth:`RefusalPath.flush`, each heartbeat tick) or when the node stops
  (:meth:`RefusalPath.flush_all`). A flood from one address therefore writes a
  couple of lines and rows per reason per minute, and summing ``count`` over the
  rows still gives every refusal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bastion.metrics import Metrics
from bastion.protocol.refusals import Reason, RefusalRecord, Rule
from bastion.security.repeats import Aggregate, RepeatAggregator

__all__ = [
    "AGGREGATE_SECONDS",
    "MAX_AGGREGATED_KEYS",
    "RefusalPath",
    "RefusalRecord",
    "RefusalSummary",
]

log = logging.getLogger("bastion.refusals")

#: Seconds over which the repeats of one (address, reason, app) become one line and row.
AGGREGATE_SECONDS = 60.0
#: Keys counted at once at most; past it the oldest window is written early.
MAX_AGGREGATED_KEYS = 10_000

#: (ip, slug, app id): what makes two refusals "the same" for the log and the audit log.
RefusalKey = tuple[str | None, str, str | None]


@dataclass(frozen=True, slots=True)
class RefusalSummary:
    """What the log and the audit log write: one refusal, or the repeats of one window.

    Attributes:
        record: the refusal (for an aggregate: the last one of the window).
        count: how many refusals this stands for (1 unless ``aggregated``).
        first: Unix seconds of the first of them.
        last: Unix seconds of the last of them.
        aggregated: whether this is a window's repeats rather than a first refusal.
    """

    record: RefusalRecord
    count: int
    first: float
    last: float
    aggregated: bool


class RefusalPath:
    """Counts each refusal, logs and audits it (aggregated), and notifies listeners.

    Args:
        metrics: the node's counters.
        clock: Unix seconds (the times written in the audit log).
        aggregate_seconds: the window of :data:`AGGREGATE_SECONDS`.
        max_keys: :data:`MAX_AGGREGATED_KEYS`.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        aggregate_seconds: float = AGGREGATE_SECONDS,
        max_keys: int = MAX_AGGREGATED_KEYS,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        #: Called with every refusal, as it happens (reputation, budgets).
        self.listeners: list[Callable[[RefusalRecord], None]] = []
        #: Called with what is written: first refusals and aggregates (the audit log).
        self.summaries: list[Callable[[RefusalSummary], None]] = []
        self._repeats: RepeatAggregator[RefusalKey, RefusalRecord] = RepeatAggregator(
            aggregate_seconds, max_keys
        )

    def record(
        self,
        reason: Reason,
        *,
        app_id: str | None = None,
        ip: str | None = None,
        socket_id: str | None = None,
        user_id: str | None = None,
        detail: str | None = None,
    ) -> Rule:
        """Record a refusal and return the rule that says how to answer it."""
        rule = reason.value
        self.metrics.refusals[(rule.slug, app_id or "")] += 1
        record = RefusalRecord(reason, app_id, ip, socket_id, user_id, detail or rule.message)
        now = self.clock()
        if self._repeats.offer((ip, rule.slug, app_id), record, now):
            self._write(RefusalSummary(record, 1, now, now, aggregated=False))
        for listener in self.listeners:
            listener(record)
        return rule

    def flush(self) -> int:
        """Write the aggregates of the windows that have ended; returns how many."""
        return self._write_all(self._repeats.due(self.clock()))

    def flush_all(self) -> int:
        """Write every open count now (the node stops); returns how many aggregates."""
        return self._write_all(self._repeats.drain())

    def pending(self) -> int:
        """Refusals counted and not yet written as an aggregate."""
        return self._repeats.pending()

    def _write_all(self, aggregates: list[Aggregate[RefusalKey, RefusalRecord]]) -> int:
        for aggregate in aggregates:
            self._write(
                RefusalSummary(
                    aggregate.sample,
                    aggregate.count,
                    aggregate.first,
                    aggregate.last,
                    aggregated=True,
                )
            )
        return len(aggregates)

    def _write(self, summary: RefusalSummary) -> None:
        record = summary.record
        rule = record.reason.value
        level = logging.WARNING if rule.severity == "warning" else logging.INFO
        if log.isEnabledFor(level):
            # The same facts as fields, for `--log-format json` (the text is unchanged).
            extra = {
                "reason": rule.slug,
                "app_id": record.app_id,
                "ip": record.ip,
                "socket_id": record.socket_id,
            }
            if summary.aggregated:
                log.log(
                    level,
                    "refused reason=%s app=%s ip=%s socket=%s detail=%r"
                    " count=%d over %.1f s (repeats aggregated)",
                    rule.slug,
                    record.app_id or "-",
                    record.ip or "-",
                    record.socket_id or "-",
                    record.detail,
                    summary.count,
                    summary.last - summary.first,
                    extra={**extra, "count": summary.count},
                )
            else:
                log.log(
                    level,
                    "refused reason=%s app=%s ip=%s socket=%s detail=%r",
                    rule.slug,
                    record.app_id or "-",
                    record.ip or "-",
                    record.socket_id or "-",
                    record.detail,
                    extra=extra,
                )
        for summary_listener in self.summaries:
            summary_listener(summary)
