"""The node's counters as the admin API shows them: JSON, read through the exposition.

``GET /api/security/metrics`` and ``GET /api/security/dashboard`` read the same
families as ``/metrics`` (:class:`~bastion.api.ops.NodeCollector`), at the moment
of the call, so the JSON and the Prometheus scrape never disagree. Labels are
app ids this node knows and refusal slugs: never a secret, an address or
client text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from bastion.api.ops import NodeCollector, NodeView

__all__ = ["per_app", "summary"]

#: A family's samples: (labels, value).
Samples = list[tuple[dict[str, str], float]]

#: The per-app figures of ``apps`` in ``metrics`` and ``dashboard``, by counter family.
_PER_APP = (
    ("connections", "connections_current"),
    ("connections_opened", "connections_opened"),
    ("messages_in", "messages_in"),
    ("events_published", "events_published"),
    ("refusals", "refusals"),
)


def _counters(node: NodeView) -> dict[str, Samples]:
    """Every ``bastion_*`` family's samples, read through the Prometheus collector."""
    families: dict[str, Samples] = {}
    for family in NodeCollector(node).collect():
        name = family.name.removeprefix("bastion_")
        families[name] = [
            (dict(sample.labels), sample.value)
            for sample in family.samples
            if not sample.name.endswith("_created")
        ]
    return families


def _by(samples: Iterable[tuple[dict[str, str], float]], label: str) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for labels, value in samples:
        totals[labels.get(label, "")] += int(value)
    return dict(sorted(totals.items()))


def _total(samples: Iterable[tuple[dict[str, str], float]]) -> int:
    return sum(int(value) for _, value in samples)


def per_app(families: Mapping[str, Samples]) -> dict[str, Any]:
    """Each configured app's counters (``{app_id: {figure: count}}``), zeros included.

    The app ids are the collector's labels: configured ids only (``""`` gathers what
    belongs to no app, and is left out).
    """
    columns = {name: _by(families.get(family, []), "app") for name, family in _PER_APP}
    ids = sorted({app for column in columns.values() for app in column} - {""})
    return {app: {name: column.get(app, 0) for name, column in columns.items()} for app in ids}


def summary(node: NodeView) -> dict[str, Any]:
    """The node's counters as JSON (labels are app ids and slugs, never secrets)."""
    c = _counters(node)
    bus_connected: bool | None = None
    if node.settings.adapter.driver == "redis":
        bus_connected = _total(c.get("bus_connected", [])) > 0
    audit = node.audit
    return {
        "connections": _by(c["connections_current"], "app"),
        "connections_opened": _by(c["connections_opened"], "app"),
        "apps": per_app(c),
        "messages_in": _total(c["messages_in"]),
        "events_published": _total(c["events_published"]),
        "deliveries": _total(c["deliveries"]),
        "refusals": {
            "by_reason": _by(c["refusals"], "reason"),
            "by_app": _by(c["refusals"], "app"),
        },
        "auth_failures": _total(c["auth_failures"]),
        "rate_limit_hits": _total(c["rate_limit_hits"]),
        "blocked_ips": _total(c.get("blocked_ips", [])),
        "webhooks": {
            "delivered": _total(c["webhooks_delivered"]),
            "attempts_failed": _total(c["webhook_attempts_failed"]),
            "dead": _total(c["webhooks_dead"]),
            "dropped": _total(c["webhooks_dropped"]),
            "queue_pending": _total(c["webhook_queue_pending"]),
            "in_flight": _total(c["webhooks_in_flight"]),
        },
        "bus": {
            "driver": node.settings.adapter.driver,
            "connected": bus_connected,
            "connects": _total(c["bus_connects"]),
            "published": _total(c["bus_published"]),
            "received": _total(c["bus_received"]),
            "dropped": _by(c["bus_dropped"], "reason"),
            "forged": _by(c["bus_forged"], "reason"),
        },
        "audit": {
            "enabled": audit is not None,
            "dropped": audit.dropped if audit is not None else 0,
            "failed": audit.failed if audit is not None else 0,
        },
    }
