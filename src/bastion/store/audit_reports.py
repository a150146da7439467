"""Reports over the audit log, for the admin API: pages of events and refusal aggregates.

Reads only: the file is opened read-only for each call, whether or not a node is
writing it (:mod:`bastion.store.audit` owns the schema and the writer). Each read
is a small indexed query (``GROUP BY`` over the time index, pages bounded by the
caller), run synchronously by the admin API.

A log that does not exist yet (no event since start) or cannot be read is an
empty report, never an error: the operator sees nothing to show.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.security.audit import AuditEvent
from bastion.store import sqlite
from bastion.store.audit import AuditLogError, query

__all__ = ["RefusalReport", "events", "refusal_report"]

#: Refusals a set of rows stands for: repeated refusals are aggregated into one row
#: carrying their ``count`` (bastion.server.refusals); a row without it is one.
_REFUSALS = "COALESCE(SUM(COALESCE(json_extract(metadata, '$.count'), 1)), 0)"


@dataclass(frozen=True, slots=True)
class RefusalReport:
    """Refusals over a time range.

    Attributes:
        top_ips: ``{"ip", "count"}`` of the most refused addresses, most first.
        top_reasons: ``{"reason", "count"}`` of the most frequent refusal types.
        auth_failures: refusals that were failed authentications.

    Counts are refusals, not rows: a row that aggregates repeated refusals
    (``metadata.count``) counts for each of them.
    """

    top_ips: list[dict[str, Any]] = field(default_factory=list)
    top_reasons: list[dict[str, Any]] = field(default_factory=list)
    auth_failures: int = 0


def events(path: str | Path, **filters: Any) -> list[AuditEvent]:
    """Events matching ``filters`` (see :func:`bastion.store.audit.query`), newest first.

    Empty when the log does not exist yet or is not an audit log.
    """
    try:
        return query(path, **filters)
    except AuditLogError:
        return []


def refusal_report(
    path: str | Path,
    since: float,
    until: float,
    *,
    refusal_types: Collection[str],
    auth_failure_types: Collection[str],
    top: int = 10,
) -> RefusalReport:
    """The most refused addresses and reasons, and the failed authentications, in a range.

    Args:
        path: the audit log file.
        since: start of the range (inclusive, Unix seconds).
        until: end of the range (exclusive).
        refusal_types: the event types that are refusals (the refusal slugs).
        auth_failure_types: the event types that are failed authentications.
        top: how many addresses and reasons to list.
    """
    kinds = tuple(sorted(refusal_types))
    auth = tuple(sorted(auth_failure_types))
    marks = ", ".join("?" * len(kinds))
    auth_marks = ", ".join("?" * len(auth))
    where = f"time >= ? AND time < ? AND type IN ({marks})"
    params: list[object] = [since, until, *kinds]
    try:
        ips = sqlite.read_rows(
            path,
            f"SELECT ip, {_REFUSALS} AS n FROM audit_events WHERE {where} AND ip IS NOT NULL"  # noqa: S608 - placeholders only
            " GROUP BY ip ORDER BY n DESC, ip LIMIT ?",
            [*params, top],
        )
        reasons = sqlite.read_rows(
            path,
            f"SELECT type, {_REFUSALS} AS n FROM audit_events WHERE {where}"  # noqa: S608
            " GROUP BY type ORDER BY n DESC, type LIMIT ?",
            [*params, top],
        )
        failures = sqlite.read_rows(
            path,
            f"SELECT {_REFUSALS} FROM audit_events"  # noqa: S608
            f" WHERE time >= ? AND time < ? AND type IN ({auth_marks})",
            [since, until, *auth],
        )
    except sqlite3.Error:
        return RefusalReport()
    return RefusalReport(
        [{"ip": ip, "count": int(n)} for ip, n in ips or []],
        [{"reason": reason, "count": int(n)} for reason, n in reasons or []],
        int(failures[0][0]) if failures else 0,
    )
