"""Security alerts: thresholds over a sliding window, raised once per window.

Pure: no clock, no I/O; ``now`` is an argument everywhere. :class:`AlertEngine`
is fed the node's security signals as they happen and answers with an
:class:`Alert` when one crosses its rule's threshold; the node
(:mod:`bastion.server.alerts`) writes the audit row, the log line and the metric,
and queues the operator's notification.

Signals (:data:`SIGNALS`), each a rule of ``[alerts]`` with a threshold, a window
and a severity:

* ``auth_failures``: refusals of failed authentications (bad REST signatures,
  channel auth, sign-ins, tokens, admin tokens): :data:`AUTH_FAILURE_REASONS`;
* ``rate_limit_hits``: refusals by a rate limit or connection cap
  (:data:`RATE_LIMIT_REASONS`);
* ``payload_refusals``: malformed, oversized or schema-violating input
  (:data:`PAYLOAD_REASONS`);
* ``origin_refusals``: handshakes from an origin the app does not allow;
* ``new_blocks``: addresses blocked (automatically or by an operator);
* ``forged_bus_messages``: cluster bus messages refused by their MAC or shape;
* ``webhook_dead_letters``: app webhook deliveries given up.

The window. Each rule counts its signal in :data:`BUCKETS_PER_WINDOW` buckets
spanning its window (so the count is over the last window, to a twentieth of it),
with the addresses and reasons seen in each bucket (at most
:data:`MAX_KEYS_PER_BUCKET` distinct ones per bucket; beyond that the events are
counted, not named). When the count reaches the threshold the alert is raised,
naming the top addresses and reasons of the window, never a payload or a secret.

Damping. A raised rule stays **open** for one window and raises nothing more
meanwhile; then it re-arms, and raises again only if the last window's count is
still at the threshold. A sustained attack therefore raises one alert per rule
per window, and an alert flood is bounded by the number of rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bastion.protocol.refusals import Reason
from bastion.security.admission import AUTH_FAILURE_REASONS
from bastion.security.alert_rules import DEFAULT_RULES, SIGNALS, AlertRule, AlertSeverity
from bastion.security.audit import AuditEvent, MetadataValue

__all__ = [
    "ALERTS_KEY",
    "ALERTS_SENDER",
    "AUTH_FAILURE_REASONS",
    "BUCKETS_PER_WINDOW",
    "DEFAULT_RULES",
    "MAX_KEYS_PER_BUCKET",
    "ORIGIN_REASONS",
    "PAYLOAD_REASONS",
    "RATE_LIMIT_REASONS",
    "SECURITY_ALERT",
    "SIGNALS",
    "Alert",
    "AlertEngine",
    "AlertRule",
    "AlertSeverity",
    "alert_audit_event",
    "alert_event",
    "signal_of",
]

#: Refusals by a rate limit or a connection cap.
RATE_LIMIT_REASONS = frozenset(
    {
        Reason.MESSAGE_RATE,
        Reason.CLIENT_EVENT_RATE,
        Reason.CLIENT_EVENT_APP_RATE,
        Reason.SUBSCRIBE_RATE,
        Reason.HTTP_IP_RATE,
        Reason.HTTP_APP_RATE,
        Reason.HTTP_CONNECTION_RATE,
        Reason.HTTP_IP_CONNECTIONS,
        Reason.AUTH_FAILURE_LIMIT,
        Reason.REFUSAL_LIMIT,
    }
)
#: Input refused for its shape, size or schema.
PAYLOAD_REASONS = frozenset(
    {
        Reason.BINARY_FRAME,
        Reason.FRAME_TOO_LARGE,
        Reason.WEBSOCKET_PROTOCOL,
        Reason.INVALID_UTF8,
        Reason.MALFORMED_JSON,
        Reason.NOT_AN_OBJECT,
        Reason.JSON_TOO_DEEP,
        Reason.MISSING_EVENT,
        Reason.INVALID_DATA,
        Reason.CLIENT_EVENT_NAME,
        Reason.CLIENT_EVENT_TOO_LARGE,
        Reason.CLIENT_EVENT_NOT_ALLOWED,
        Reason.CLIENT_EVENT_SCHEMA,
        Reason.SUBSCRIBE_INVALID_CHANNEL,
        Reason.SUBSCRIBE_CHANNEL_DATA,
        Reason.SUBSCRIBE_MEMBER_TOO_LARGE,
        Reason.HTTP_BODY_TOO_LARGE,
        Reason.HTTP_HEADERS_TOO_LARGE,
        Reason.HTTP_BAD_REQUEST,
        Reason.HTTP_INVALID_BODY,
        Reason.HTTP_INVALID_FIELD,
        Reason.HTTP_PAYLOAD_TOO_LARGE,
        Reason.HTTP_INVALID_CHANNEL,
        Reason.HTTP_INVALID_EVENT,
    }
)
#: Handshakes from an origin the app does not allow.
ORIGIN_REASONS = frozenset({Reason.HTTP_ORIGIN_REFUSED})

_SIGNAL_OF: dict[Reason, str] = {
    **dict.fromkeys(AUTH_FAILURE_REASONS, "auth_failures"),
    **dict.fromkeys(RATE_LIMIT_REASONS, "rate_limit_hits"),
    **dict.fromkeys(PAYLOAD_REASONS, "payload_refusals"),
    **dict.fromkeys(ORIGIN_REASONS, "origin_refusals"),
}

#: Buckets a rule's window is cut into.
BUCKETS_PER_WINDOW = 20
#: Distinct addresses (and reasons) named per bucket at most.
MAX_KEYS_PER_BUCKET = 64


#: The audit type (and webhook event name) of a raised alert.
SECURITY_ALERT = "security_alert"
#: What alert deliveries carry as their app id in the webhook queue: no app id can
#: be it (app ids are letters, digits, ``_`` and ``-``), so an alert is never signed
#: with an app's secret and an app's webhook never with the alerts secret.
ALERTS_SENDER = "@alerts"
#: ``X-Pusher-Key`` of alert deliveries (a receiver using a Pusher SDK's webhook
#: check configures this key with ``[alerts] secret``).
ALERTS_KEY = "bastion-alerts"


def signal_of(reason: Reason) -> str | None:
    """The signal a refusal feeds, if any."""
    return _SIGNAL_OF.get(reason)


@dataclass(frozen=True, slots=True)
class Alert:
    """A rule that crossed its threshold.

    Attributes:
        rule: the rule's signal name (``auth_failures``...).
        severity: the rule's severity.
        count: events within the window when it was raised.
        threshold: the rule's threshold.
        window_seconds: the rule's window.
        raised_at: when (the caller's clock).
        until: when it re-arms (``raised_at + window_seconds``): open until then.
        top_addresses: the addresses with the most events in the window, most first.
        top_reasons: the reasons with the most events in the window, most first.
    """

    rule: str
    severity: AlertSeverity
    count: int
    threshold: int
    window_seconds: float
    raised_at: float
    until: float
    top_addresses: tuple[tuple[str, int], ...]
    top_reasons: tuple[tuple[str, int], ...]

    def open_at(self, now: float) -> bool:
        """Whether the alert is still open at ``now``."""
        return self.raised_at <= now < self.until


def alert_event(alert: Alert, *, id: str, node: str) -> dict[str, object]:
    """The alert as a webhook event object (``{"name": "security_alert", ...}``).

    It goes into a Pusher-shaped body (``{"time_ms", "events": [...]}``) so any
    Pusher SDK's webhook check verifies it. Addresses, reason slugs and counts
    only: never a payload, a token or a secret.
    """
    return {
        "name": SECURITY_ALERT,
        "id": id,
        "node": node,
        "alert": alert.rule,
        "severity": alert.severity,
        "count": alert.count,
        "threshold": alert.threshold,
        "window_seconds": alert.window_seconds,
        "raised_at": alert.raised_at,
        "until": alert.until,
        "top_addresses": [{"ip": ip, "count": count} for ip, count in alert.top_addresses],
        "top_reasons": [{"reason": reason, "count": count} for reason, count in alert.top_reasons],
    }


def _pairs(pairs: tuple[tuple[str, int], ...]) -> str:
    return ",".join(f"{name}={count}" for name, count in pairs)


def alert_audit_event(alert: Alert, *, id: str) -> AuditEvent:
    """The ``security_alert`` audit row: a warning naming the rule, counts and the top few.

    Its ``ip`` is the top address (so the per-address audit queries find it).
    """
    metadata: dict[str, MetadataValue] = {
        "alert": alert.rule,
        "alert_severity": alert.severity,
        "count": alert.count,
        "threshold": alert.threshold,
        "window_seconds": alert.window_seconds,
        "until": alert.until,
        "top_addresses": _pairs(alert.top_addresses),
        "top_reasons": _pairs(alert.top_reasons),
    }
    return AuditEvent(
        id=id,
        time=alert.raised_at,
        type=SECURITY_ALERT,
        severity="warning",
        ip=alert.top_addresses[0][0] if alert.top_addresses else None,
        app_id=None,
        socket_id=None,
        user_id=None,
        message=(
            f"Security alert {alert.rule} ({alert.severity}): {alert.count} in"
            f" {alert.window_seconds:g} s, threshold {alert.threshold}"
        ),
        metadata=metadata,
    )


class _Bucket:
    __slots__ = ("addresses", "count", "reasons", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.addresses: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()


def _tally(counter: Counter[str], key: str | None, count: int) -> None:
    if key is not None and (key in counter or len(counter) < MAX_KEYS_PER_BUCKET):
        counter[key] += count


class _Window:
    """One rule's sliding count and its open alert."""

    __slots__ = ("alert", "buckets", "rule", "total", "width")

    def __init__(self, rule: AlertRule) -> None:
        self.rule = rule
        self.width = rule.window_seconds / BUCKETS_PER_WINDOW
        self.buckets: list[_Bucket] = []
        self.total = 0
        self.alert: Alert | None = None

    def expire(self, now: float) -> None:
        horizon = now - self.rule.window_seconds
        buckets = self.buckets
        while buckets and buckets[0].start + self.width <= horizon:
            self.total -= buckets.pop(0).count

    def add(self, now: float, count: int, address: str | None, reason: str | None) -> None:
        self.expire(now)
        buckets = self.buckets
        if not buckets or now >= buckets[-1].start + self.width:
            # Aligned to the width, so buckets never overlap whatever the arrival times.
            buckets.append(_Bucket(now - now % self.width))
        bucket = buckets[-1]
        bucket.count += count
        self.total += count
        _tally(bucket.addresses, address, count)
        _tally(bucket.reasons, reason, count)

    def check(self, now: float, top: int) -> Alert | None:
        alert = self.alert
        if alert is not None and now < alert.until:
            return None  # open: damped until it re-arms
        rule = self.rule
        if self.total < rule.threshold:
            return None
        addresses: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for bucket in self.buckets:
            addresses.update(bucket.addresses)
            reasons.update(bucket.reasons)
        self.alert = Alert(
            rule=rule.signal,
            severity=rule.severity,
            count=self.total,
            threshold=rule.threshold,
            window_seconds=rule.window_seconds,
            raised_at=now,
            until=now + rule.window_seconds,
            top_addresses=_top(addresses, top),
            top_reasons=_top(reasons, top),
        )
        return self.alert


def _top(counter: Counter[str], top: int) -> tuple[tuple[str, int], ...]:
    ordered = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
    return tuple(ordered[:top])


class AlertEngine:
    """Counts each signal against its rule and raises alerts (see the module docstring).

    Args:
        rules: at most one rule per signal; a signal without a rule is ignored.
        top: addresses and reasons an alert names at most.
    """

    __slots__ = ("_windows", "top")

    def __init__(self, rules: Iterable[AlertRule], *, top: int = 5) -> None:
        self.top = top
        self._windows: dict[str, _Window] = {}
        for rule in rules:
            if rule.signal in self._windows:
                raise ValueError(f"two rules for {rule.signal}")
            self._windows[rule.signal] = _Window(rule)

    @property
    def rules(self) -> Mapping[str, AlertRule]:
        """Signal → its rule."""
        return {signal: window.rule for signal, window in self._windows.items()}

    def observe(
        self,
        signal: str,
        now: float,
        *,
        count: int = 1,
        address: str | None = None,
        reason: str | None = None,
    ) -> Alert | None:
        """``count`` events of ``signal`` at ``now``; the alert they raise, if any.

        Args:
            signal: one of :data:`SIGNALS`.
            now: the caller's clock (monotonic or wall, the same every call).
            count: how many events (> 0).
            address: the client address they came from, when there is one.
            reason: a bounded word naming what happened (a refusal slug...).
        """
        window = self._windows.get(signal)
        if window is None or count <= 0:
            return None
        window.add(now, count, address, reason)
        return window.check(now, self.top)

    def open_alerts(self, now: float) -> list[Alert]:
        """The alerts open at ``now``, most recent first."""
        alerts = [
            window.alert
            for window in self._windows.values()
            if window.alert is not None and window.alert.open_at(now)
        ]
        return sorted(alerts, key=lambda alert: (-alert.raised_at, alert.rule))

    def counts(self, now: float) -> dict[str, int]:
        """Each rule's count over its window at ``now``."""
        totals = {}
        for signal, window in self._windows.items():
            window.expire(now)
            totals[signal] = window.total
        return totals
