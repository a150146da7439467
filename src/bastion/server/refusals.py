"""The one refusal path: count, log, and tell the listeners (audit, reputation).

Every refusal, whatever layer found it, passes through :meth:`RefusalPath.record`
before its connection or request is answered. The answer itself (close code,
``pusher:error``, subscription error or HTTP status) comes from
:mod:`bastion.protocol.refusals`. Log lines carry the rule and identifiers,
never the refused data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from bastion.metrics import Metrics
from bastion.protocol.refusals import Reason, Rule

__all__ = ["RefusalPath", "RefusalRecord"]

log = logging.getLogger("bastion.refusals")


@dataclass(frozen=True, slots=True)
class RefusalRecord:
    """One refusal, as audit and IP reputation (#3) receive it."""

    reason: Reason
    app_id: str | None
    ip: str | None
    socket_id: str | None
    user_id: str | None
    detail: str


class RefusalPath:
    """Counts each refusal, logs it without a stack trace, and notifies listeners."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.listeners: list[Callable[[RefusalRecord], None]] = []

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
        text = detail or rule.message
        level = logging.WARNING if rule.severity == "warning" else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "refused reason=%s app=%s ip=%s socket=%s detail=%r",
                rule.slug,
                app_id or "-",
                ip or "-",
                socket_id or "-",
                text,
                # The same facts as fields, for `--log-format json` (the text is unchanged).
                extra={"reason": rule.slug, "app_id": app_id, "ip": ip, "socket_id": socket_id},
            )
        if self.listeners:
            record = RefusalRecord(reason, app_id, ip, socket_id, user_id, text)
            for listener in self.listeners:
                listener(record)
        return rule
