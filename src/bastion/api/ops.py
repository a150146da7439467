"""Operations endpoints: the Prometheus exposition (``/metrics``) and readiness (``/readyz``).

:class:`Ops` is built once per node and answers both; the route table
(:mod:`bastion.api.routes`) routes the two paths here before any app route and
exempts them from the per-address REST bucket for scrapers that pass the access
check (a refused scrape spends it like any request). The access check is made of
gates (:mod:`bastion.api.gates`) that :class:`Ops` configures: :attr:`Ops.peers`,
:attr:`Ops.hosts` and :attr:`Ops.token`.

Exposition. A :class:`NodeCollector` reads the node's
:class:`~bastion.metrics.Metrics`, its hub and its blocklist *at scrape time*:
nothing is counted twice and nothing lives in the process-wide default registry,
so several nodes in one process (the tests, the benchmarks) never collide. Label
values are app ids this node knows (anything else is counted under ``app=""``),
refusal slugs, close codes and their classes, route templates, status classes,
alert rule names and fixed bus reasons; a value that is not a short lower-case
word becomes ``other``. Never a secret, token, user id, address or client text.
The histograms are counted in plain Python on the event
(:class:`~bastion.metrics.Histogram`) and exported here as histogram families;
docs/observability.md lists every family with its labels.

Access to ``/metrics`` (``[metrics]``): the request must carry
``Authorization: Bearer <token>`` equal to ``token`` (compared in constant time,
never logged), or come from an address in ``allow_from`` with a ``Host`` header
that names this server (:mod:`bastion.security.hosts`: an IP literal,
``localhost``, ``server.host`` or one of ``allowed_hosts``, so a DNS-rebinding page
in a browser on an allowed host reads nothing). The address is the one the
listener's operator gate decides on
(:attr:`~bastion.security.proxies.ClientAddress.operator_ip`): the TCP peer, or
the client a trusted proxy named; a request forwarded by nobody we trust has none.

Readiness. ``/readyz`` is 200 while the node can take traffic and 503 otherwise,
naming each check: ``serving`` (not draining), ``audit`` (when ``[audit]`` is on:
the log is open, and no failed batch was first seen by a probe within the last
:data:`AUDIT_FAILURE_WINDOW_SECONDS`), ``bus`` (with the redis driver: connected)
``user_limits`` (with the redis driver and an app with
``max_connections_per_user``: ``per_node`` while each node counts its own users'
connections because Redis is away) and ``webhook_queue`` (when some app has
webhooks: the queue is open). Each
check's value is ``"ok"`` or a fixed word, never a path or an exception's text,
because the endpoint is unauthenticated like ``/healthz``.
"""

from __future__ import annotations

import gc
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from bastion.api.gates import AllowedPeers, BearerToken
from bastion.api.http import NO_STORE, HttpResponse
from bastion.api.templates import TEMPLATES
from bastion.config import Settings
from bastion.metrics import GC_PAUSE_BUCKETS, Histogram, Metrics, close_class, status_class
from bastion.protocol.refusals import Reason
from bastion.security.admission import AUTH_FAILURE_REASONS
from bastion.security.alerts import ALERTS_SENDER, Alert
from bastion.security.hosts import HostPolicy

__all__ = [
    "AUDIT_FAILURE_WINDOW_SECONDS",
    "AUTH_FAILURE_SLUGS",
    "RATE_LIMIT_SLUGS",
    "NodeCollector",
    "NodeView",
    "Ops",
]

#: Seconds after a failed audit batch during which the node reports not ready. A
#: lost audit trail is a security fault, but one SQLite hiccup must not keep the
#: node out of rotation until a restart.
AUDIT_FAILURE_WINDOW_SECONDS = 60.0

#: Refusal slugs counted by ``bastion_auth_failures_total``.
AUTH_FAILURE_SLUGS = frozenset(reason.value.slug for reason in AUTH_FAILURE_REASONS)

#: Refusal slugs counted by ``bastion_rate_limit_hits_total``.
RATE_LIMIT_SLUGS = frozenset(
    {
        "client_event_rate",
        "client_event_app_rate",
        "client_event_type_rate",
        "event_rate_limited",
        "subscribe_rate",
        "ip_rate_limited",
        "app_rate_limited",
        "connection_rate",
        "ip_connection_limit",
        "auth_failure_limit",
    }
)

_PREFIX = "bastion_"
#: What a slug or bus reason looks like; anything else is exported as ``other``.
_WORD = re.compile(r"[a-z0-9_]{1,64}")
#: Webhook delivery counters of the alerts sender → ``bastion_alert_deliveries_total``.
_ALERT_DELIVERY_RESULTS = (
    ("delivered", "webhooks_delivered"),
    ("failed", "webhook_attempts_failed"),
    ("dead", "webhooks_dead"),
    ("dropped", "webhooks_dropped"),
)


# --- what Ops reads from a node (bastion.server.runtime.Node satisfies these) ---------


class _AppView(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def connections(self) -> int: ...


class _BusView(Protocol):
    @property
    def healthy(self) -> bool: ...


class _HubView(Protocol):
    @property
    def apps_by_id(self) -> Mapping[str, _AppView]: ...

    @property
    def deliveries(self) -> int: ...

    @property
    def bus(self) -> _BusView: ...


class _ContextView(Protocol):
    @property
    def draining(self) -> bool: ...


class _BlockSetView(Protocol):
    def active(self, now: float) -> Sequence[object]: ...


class _BlockListView(Protocol):
    @property
    def blocks(self) -> _BlockSetView: ...


class _AlertsView(Protocol):
    @property
    def engine(self) -> _AlertEngineView: ...

    def open_alerts(self) -> list[Alert]: ...


class _AlertEngineView(Protocol):
    @property
    def rules(self) -> Mapping[str, Any]: ...


class _AuditView(Protocol):
    @property
    def dropped(self) -> int: ...

    @property
    def failed(self) -> int: ...


class NodeView(Protocol):
    """What the endpoints read from a running node (:class:`~bastion.server.runtime.Node`)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def hub(self) -> _HubView: ...

    @property
    def ctx(self) -> _ContextView: ...

    @property
    def audit(self) -> _AuditView | None: ...

    @property
    def blocklist(self) -> _BlockListView | None: ...

    @property
    def webhook_queue(self) -> object | None: ...

    @property
    def webhook_dispatcher(self) -> object | None: ...


# --- the exposition -------------------------------------------------------------------


def _word(value: str) -> str:
    return value if _WORD.fullmatch(value) else "other"


def _histogram(
    name: str,
    doc: str,
    labels: Sequence[str],
    histogram: Histogram[Any],
    label_of: Callable[[Any], tuple[str, ...] | None],
) -> HistogramMetricFamily:
    """A histogram family from ``histogram``'s series, keys turned into labels.

    ``label_of`` maps a key to its label values (``None``: left out); keys that map
    to the same labels are added together.
    """
    merged: dict[tuple[str, ...], list[float]] = {}
    for key, series in histogram.by_key.items():
        values = label_of(key)
        if values is None:
            continue
        total = merged.get(values)
        if total is None:
            merged[values] = list(series)
        else:
            for index, count in enumerate(series):
                total[index] += count
    family = HistogramMetricFamily(_PREFIX + name, doc, labels=list(labels))
    bounds = (*(repr(float(bound)) for bound in histogram.bounds), "+Inf")
    for values, series in sorted(merged.items()):
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, series[:-1], strict=True):
            cumulative += int(count)
            buckets.append((bound, cumulative))
        family.add_metric(list(values), buckets, series[-1])
    return family


class NodeCollector:
    """A prometheus-client collector reading one node's counters at scrape time.

    Args:
        node: the node whose counters are exported.
        wall_clock: Unix seconds (block expiry is wall-clock).
        checks: the readiness checks (``bastion_ready``); none: not exported.
    """

    def __init__(
        self,
        node: NodeView,
        wall_clock: Callable[[], float] = time.time,
        checks: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.node = node
        self.wall_clock = wall_clock
        self.checks = checks

    def collect(self) -> Iterator[Metric]:
        """Every ``bastion_*`` family, read from the node now."""
        node = self.node
        metrics = node.metrics
        apps = node.hub.apps_by_id
        app_ids = sorted(apps)

        def app_of(app_id: str) -> str:
            # Only ids from our own configuration become labels: a bug that put a
            # client's text in an app id must not reach the scrape.
            return app_id if app_id in apps else ""

        def per_app(name: str, doc: str, counter: Mapping[str, int]) -> CounterMetricFamily:
            totals: Counter[str] = Counter(dict.fromkeys(app_ids, 0))
            for app_id, count in counter.items():
                if app_id == ALERTS_SENDER:  # alert deliveries have their own family
                    continue
                totals[app_of(app_id)] += count
            family = CounterMetricFamily(_PREFIX + name, doc, labels=["app"])
            for app_id, count in sorted(totals.items()):
                family.add_metric([app_id], count)
            return family

        def per_word(name: str, doc: str, counter: Mapping[str, int]) -> CounterMetricFamily:
            totals: Counter[str] = Counter()
            for reason, count in counter.items():
                totals[_word(reason)] += count
            family = CounterMetricFamily(_PREFIX + name, doc, labels=["reason"])
            for reason, count in sorted(totals.items()):
                family.add_metric([reason], count)
            return family

        # --- connections and traffic ---
        current = GaugeMetricFamily(
            _PREFIX + "connections_current", "WebSocket connections open now.", labels=["app"]
        )
        for app_id in app_ids:
            current.add_metric([app_id], apps[app_id].connections)
        yield current
        yield per_app(
            "connections_opened",
            "WebSocket connections admitted.",
            metrics.connections_opened,
        )
        closed_totals: Counter[tuple[str, str]] = Counter()
        for (app_id, code), count in metrics.connections_closed.items():
            closed_totals[(app_of(app_id), str(int(code)))] += count
        closed = CounterMetricFamily(
            _PREFIX + "connections_closed",
            "WebSocket connections closed, by close code.",
            labels=["app", "code"],
        )
        for labels, count in sorted(closed_totals.items()):
            closed.add_metric(list(labels), count)
        yield closed
        yield per_app("messages_in", "Client frames received.", metrics.messages_in)
        yield from _traffic_families(metrics, app_of)
        yield per_app(
            "events_published", "Events published through the REST API.", metrics.events_published
        )
        yield CounterMetricFamily(
            _PREFIX + "deliveries",
            "Event frames written to local subscribers.",
            value=node.hub.deliveries,
        )
        yield per_app(
            "frames_discarded",
            "Frames dropped unsent for connections that fell behind (slow consumers).",
            metrics.frames_discarded,
        )
        yield per_app(
            "bytes_discarded",
            "Bytes of the frames dropped unsent for connections that fell behind.",
            metrics.bytes_discarded,
        )

        # --- refusals ---
        refusals: Counter[tuple[str, str]] = Counter()
        for (slug, app_id), count in metrics.refusals.items():
            refusals[(_word(slug), app_of(app_id))] += count
        family = CounterMetricFamily(
            _PREFIX + "refusals",
            "Refusals, by reason slug (docs/errors.md) and app.",
            labels=["reason", "app"],
        )
        for labels, count in sorted(refusals.items()):
            family.add_metric(list(labels), count)
        yield family
        auth: Counter[str] = Counter()
        for (slug, app_id), count in refusals.items():
            if slug in AUTH_FAILURE_SLUGS:
                auth[app_id] += count
        family = CounterMetricFamily(
            _PREFIX + "auth_failures",
            "Failed authentications (signatures, channel auth, sign-ins, tokens).",
            labels=["app"],
        )
        for app_id, count in sorted(auth.items()):
            family.add_metric([app_id], count)
        yield family
        family = CounterMetricFamily(
            _PREFIX + "rate_limit_hits",
            "Requests, connections and frames refused by a rate limit.",
            labels=["reason", "app"],
        )
        for (slug, app_id), count in sorted(refusals.items()):
            if slug in RATE_LIMIT_SLUGS:
                family.add_metric([slug, app_id], count)
        yield family
        yield per_app(
            "users_suspended",
            "Users signed out everywhere for spending their error budget (decided here).",
            metrics.users_suspended,
        )
        blocklist = node.blocklist
        if blocklist is not None:
            yield GaugeMetricFamily(
                _PREFIX + "blocked_ips",
                "Addresses blocked on this node now (automatic and manual).",
                value=len(blocklist.blocks.active(self.wall_clock())),
            )

        # --- webhooks ---
        yield per_app(
            "webhooks_delivered",
            "Webhook deliveries answered with a 2xx.",
            metrics.webhooks_delivered,
        )
        yield per_app(
            "webhook_attempts_failed",
            "Webhook attempts that failed (network, time-out, non-2xx, refused address).",
            metrics.webhook_attempts_failed,
        )
        yield per_app(
            "webhooks_dead", "Webhook deliveries moved to the dead letters.", metrics.webhooks_dead
        )
        yield per_app(
            "webhooks_dropped",
            "Webhook deliveries dropped because the queue was full.",
            metrics.webhooks_dropped,
        )
        yield from _webhook_histograms(metrics, app_of)
        yield GaugeMetricFamily(
            _PREFIX + "webhook_queue_pending",
            "Pending webhook deliveries at the dispatcher's last count.",
            value=metrics.webhook_queue_pending,
        )
        yield GaugeMetricFamily(
            _PREFIX + "webhooks_in_flight",
            "Webhook attempts in flight.",
            value=metrics.webhooks_in_flight,
        )

        # --- the cluster bus ---
        if node.settings.adapter.driver == "redis":
            # Only with a bus: a 0 on a single node would read as "bus down".
            yield GaugeMetricFamily(
                _PREFIX + "bus_connected",
                "1 while the node is connected to the cluster bus.",
                value=metrics.bus_connected,
            )
        yield CounterMetricFamily(
            _PREFIX + "bus_connects",
            "Times the bus connection was (re-)established.",
            value=metrics.bus_connects,
        )
        yield per_app("bus_published", "Events written to the cluster bus.", metrics.bus_published)
        yield per_app(
            "bus_received",
            "Channel events from other nodes delivered locally (not cluster control messages).",
            metrics.bus_received,
        )
        yield per_word(
            "bus_dropped", "Bus events not sent or not delivered, by reason.", metrics.bus_dropped
        )
        yield per_word(
            "bus_forged",
            "Incoming bus messages refused as forged or malformed.",
            metrics.bus_forged,
        )

        if node.settings.adapter.driver == "redis":
            yield CounterMetricFamily(
                _PREFIX + "user_limits_per_node",
                "Per-user connection caps decided by this node alone (Redis unavailable).",
                value=metrics.user_limits_per_node,
            )
        limits: Any = getattr(node, "cluster_limits", None)
        if limits is not None:
            yield GaugeMetricFamily(
                _PREFIX + "cluster_limits_connected",
                "1 while the cluster-wide rate limits sync with Redis.",
                value=int(limits.healthy),
            )
            yield CounterMetricFamily(
                _PREFIX + "cluster_limits_syncs",
                "Rounds of cluster-wide rate limit synchronisation with Redis.",
                value=limits.syncs,
            )
            yield CounterMetricFamily(
                _PREFIX + "cluster_limits_failures",
                "Failed rounds of cluster-wide rate limit synchronisation.",
                value=limits.failures,
            )

        # --- live configuration ---
        reloads = CounterMetricFamily(
            _PREFIX + "config_reloads",
            "Live configuration reloads (SIGHUP, PUT config), by result.",
            labels=["result"],
        )
        for result, count in sorted(metrics.config_reloads.items()):
            reloads.add_metric([_word(result)], count)
        yield reloads

        # --- the cycle collector (process-wide) and the loop ---
        yield from _collector_families(metrics)
        yield _histogram(
            "event_loop_lag_seconds",
            "How late the loop ran a sampling timer (every 0.25 s): what every client waited.",
            (),
            metrics.loop_lag,
            lambda key: (),
        )

        # --- security alerts and readiness ---
        yield from _alert_families(metrics, getattr(node, "alerts", None))
        if self.checks is not None:
            checks = self.checks()
            yield GaugeMetricFamily(
                _PREFIX + "ready",
                "1 while the node is ready for traffic (every /readyz check ok).",
                value=int(all(value == "ok" for value in checks.values())),
            )
            each = GaugeMetricFamily(
                _PREFIX + "ready_check",
                "1 while this /readyz check is ok, else 0.",
                labels=["check"],
            )
            for check, value in sorted(checks.items()):
                each.add_metric([_word(check)], int(value == "ok"))
            yield each

        # --- the audit log ---
        audit = node.audit
        if audit is not None:
            yield CounterMetricFamily(
                _PREFIX + "audit_events_dropped",
                "Audit events dropped because the audit queue was full.",
                value=audit.dropped,
            )
            yield CounterMetricFamily(
                _PREFIX + "audit_events_failed",
                "Audit events lost because their batch failed to write.",
                value=audit.failed,
            )


def _traffic_families(metrics: Metrics, app_of: Callable[[str], str]) -> Iterator[Metric]:
    """Connections' lives, reconnects, message sizes, REST and publish latency."""
    yield _histogram(
        "connection_duration_seconds",
        "How long WebSocket connections lived, at their close, by close code class.",
        ("app", "code_class"),
        metrics.connection_seconds,
        lambda key: (app_of(key[0]), close_class(int(key[1]))),
    )
    yield _histogram(
        "connection_messages_per_minute",
        "Messages a connection sent per minute of its life, at its close.",
        ("app",),
        metrics.connection_rates,
        lambda key: (app_of(key),),
    )
    reconnects = CounterMetricFamily(
        _PREFIX + "reconnects",
        "Connections that arrived within 30 s of a close from the same address or user.",
        labels=["app", "match"],
    )
    totals: Counter[tuple[str, str]] = Counter()
    for (app_id, match), count in metrics.reconnects.items():
        totals[(app_of(app_id), _word(match))] += count
    for labels, count in sorted(totals.items()):
        reconnects.add_metric(list(labels), count)
    yield reconnects
    yield _histogram(
        "message_size_bytes",
        "Size of each client message, bytes.",
        ("app",),
        metrics.message_bytes,
        lambda key: (app_of(key),),
    )
    yield _histogram(
        "rest_request_duration_seconds",
        "HTTP requests, from read to answer written, by route template and status class.",
        ("route", "status_class"),
        metrics.request_seconds,
        lambda key: (key[0] if key[0] in TEMPLATES else "other", status_class(int(key[1]))),
    )
    yield _histogram(
        "publish_fanout_seconds",
        "Accepted REST publishes, from the request read to the local fan-out written.",
        ("app",),
        metrics.publish_seconds,
        lambda key: (app_of(key),),
    )


def _webhook_histograms(metrics: Metrics, app_of: Callable[[str], str]) -> Iterator[Metric]:
    """Webhook latency and attempts by app (alert deliveries are counted apart)."""

    def apps_only(key: str) -> tuple[str, ...] | None:
        return None if key == ALERTS_SENDER else (app_of(key),)

    yield _histogram(
        "webhook_delivery_seconds",
        "Webhook deliveries, from queued to answered 2xx (retries included).",
        ("app",),
        metrics.webhook_seconds,
        apps_only,
    )
    yield _histogram(
        "webhook_attempts",
        "Attempts each webhook delivery took, counted when delivered or dead.",
        ("app",),
        metrics.webhook_attempts,
        apps_only,
    )


def _alert_families(metrics: Metrics, alerts: _AlertsView | None) -> Iterator[Metric]:
    """Alerts raised and open, and how their deliveries to the operator fared."""
    raised = CounterMetricFamily(
        _PREFIX + "alerts",
        "Security alerts raised, by rule and severity.",
        labels=["alert", "severity"],
    )
    totals: Counter[tuple[str, str]] = Counter()
    if alerts is not None:  # every rule's series exists from the start, at 0
        for name, rule in alerts.engine.rules.items():
            totals[(_word(name), _word(rule.severity))] += 0
    for (name, severity), count in metrics.alerts.items():
        totals[(_word(name), _word(severity))] += count
    for labels, count in sorted(totals.items()):
        raised.add_metric(list(labels), count)
    yield raised
    if alerts is not None:
        open_now = {alert.rule for alert in alerts.open_alerts()}
        family = GaugeMetricFamily(
            _PREFIX + "alerts_open",
            "1 while the rule's last alert is open (raised within its window).",
            labels=["alert"],
        )
        for name in sorted(alerts.engine.rules):
            family.add_metric([_word(name)], int(name in open_now))
        yield family
    deliveries = CounterMetricFamily(
        _PREFIX + "alert_deliveries",
        "Alert POSTs to [alerts] url, by result (failed counts attempts).",
        labels=["result"],
    )
    for result, counter in _ALERT_DELIVERY_RESULTS:
        counts: Mapping[str, int] = getattr(metrics, counter)
        deliveries.add_metric([result], counts.get(ALERTS_SENDER, 0))
    yield deliveries


def _collector_families(metrics: Metrics) -> Iterator[Metric]:
    """The cycle collector's pauses (timed by ``bastion serve``) and what it never scans."""
    pauses = HistogramMetricFamily(
        _PREFIX + "gc_pause_seconds",
        "Pauses of the whole process by the cycle collector, by generation.",
        labels=["generation"],
    )
    collections = CounterMetricFamily(
        _PREFIX + "gc_collections",
        "Cycle collector passes, by generation.",
        labels=["generation"],
    )
    for generation, counts in sorted(metrics.gc_pauses.items()):
        cumulative, buckets = 0, []
        for bound, count in zip((*GC_PAUSE_BUCKETS, math.inf), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
        label = str(generation)
        pauses.add_metric([label], buckets, metrics.gc_pause_seconds[generation])
        collections.add_metric([label], cumulative)
    yield pauses
    yield collections
    yield GaugeMetricFamily(
        _PREFIX + "gc_frozen_objects",
        "Objects moved out of the cycle collector's sight (level under churn, unless a leak).",
        value=gc.get_freeze_count(),
    )


# --- the endpoints ----------------------------------------------------------------------


class Ops:
    """Answers ``/metrics`` and ``/readyz`` for one node.

    Args:
        node: the node (settings, counters, hub, audit log, queue, blocklist).
        clock: monotonic seconds (the audit failure window).
        wall_clock: Unix seconds (block expiry).
    """

    def __init__(
        self,
        node: NodeView,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.clock = clock
        settings = node.settings.metrics
        self.enabled = settings.enabled
        #: Who may scrape without the token (``allow_from``), and with it.
        self.peers = AllowedPeers(settings.allow_from, Reason.METRICS_FORBIDDEN)
        self.token = BearerToken(settings.token, Reason.METRICS_FORBIDDEN)
        #: The ``Host`` values a token-less scrape may carry.
        self.hosts = HostPolicy(node.settings.server.host, settings.allowed_hosts)
        # Our own registry: the process-wide default would be shared by every node here.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node, wall_clock, self.checks))
        #: The audit log's ``failed`` count at the last probe, and when it last grew.
        self._audit_failed = 0
        self._audit_failed_at: float | None = None

    # --- /metrics -----------------------------------------------------------------

    def may_scrape(
        self, address: str | None, authorization: Iterable[str], *, host_ok: bool = True
    ) -> bool:
        """Whether this request may read ``/metrics``.

        Args:
            address: the address the operator gate decides on (``None``: none).
            authorization: every ``Authorization`` header value of the request;
                more than one is refused, as an ambiguous request.
            host_ok: whether the ``Host`` header names this server (:attr:`hosts`);
                needed for access by address, not with the token.
        """
        if not self.enabled:
            return False
        if host_ok and self.address_allowed(address):
            return True
        return self.token_valid(authorization)

    def address_allowed(self, address: str | None) -> bool:
        """Whether ``address`` is in ``allow_from``."""
        return self.peers.allows(address)

    def token_valid(self, authorization: Iterable[str]) -> bool:
        """Whether the request carries exactly one ``Bearer`` header with the token."""
        return self.token.valid(list(authorization))

    def exposition(self) -> HttpResponse:
        """The Prometheus text exposition of the node's counters, read now."""
        return HttpResponse(
            200, generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST, headers=NO_STORE
        )

    # --- /readyz ------------------------------------------------------------------

    def checks(self) -> dict[str, str]:
        """Each readiness check that applies to this node: ``"ok"`` or why not."""
        node = self.node
        settings = node.settings
        checks = {"serving": "draining" if node.ctx.draining else "ok"}
        if settings.audit.enabled:
            checks["audit"] = self._audit_check()
        if settings.adapter.driver == "redis":
            checks["bus"] = "ok" if node.hub.bus.healthy else "disconnected"
            if any(app.max_connections_per_user is not None for app in settings.apps):
                # The per-user caps are counted in Redis, over the bus's session.
                checks["user_limits"] = "ok" if node.hub.bus.healthy else "per_node"
        alert_url = settings.alerts.enabled and settings.alerts.url is not None
        if alert_url or any(app.webhooks for app in settings.apps):
            open_ = node.webhook_queue is not None and node.webhook_dispatcher is not None
            checks["webhook_queue"] = "ok" if open_ else "closed"
        return checks

    def _audit_check(self) -> str:
        audit = self.node.audit
        if audit is None:
            return "closed"
        now = self.clock()
        failed = audit.failed
        if failed > self._audit_failed:
            self._audit_failed_at = now
        self._audit_failed = failed
        if self._audit_failed_at is not None:
            if now - self._audit_failed_at < AUDIT_FAILURE_WINDOW_SECONDS:
                return "write_failed"
            self._audit_failed_at = None
        return "ok"

    def readiness(self) -> HttpResponse:
        """200 ``{"ready": true, "checks": {...}}``, or 503 with the same shape."""
        checks = self.checks()
        ready = all(value == "ok" for value in checks.values())
        body = json.dumps({"ready": ready, "checks": checks}, sort_keys=True).encode()
        return HttpResponse(200 if ready else 503, body, headers=NO_STORE)
