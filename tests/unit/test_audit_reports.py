"""The admin API's reads of the audit log: pages of events and refusal aggregates."""

from __future__ import annotations

from pathlib import Path

from bastion.security.audit import AuditEvent
from bastion.store.audit import AuditLog
from bastion.store.audit_reports import RefusalReport, events, refusal_report

NOW = 1_800_000_000.0
REFUSALS = {"auth_signature", "ip_rate_limited", "origin_refused"}
AUTH_FAILURES = {"auth_signature"}


def event(n: int, type_: str, ip: str | None, count: int | None = None) -> AuditEvent:
    return AuditEvent(
        id=f"{n:032x}",
        time=NOW + n,
        type=type_,
        severity="warning",
        ip=ip,
        app_id="1",
        socket_id=None,
        user_id=None,
        message="refused",
        metadata={} if count is None else {"count": count},
    )


def write(path: Path, *items: AuditEvent) -> str:
    audit = AuditLog(str(path), clock=lambda: NOW + 1000)
    for item in items:
        audit.record(item)
    assert audit.close(10)
    return str(path)


def test_a_missing_log_is_an_empty_report(tmp_path: Path) -> None:
    missing = tmp_path / "none.sqlite3"
    assert events(missing, limit=5) == []
    report = refusal_report(
        missing, 0.0, NOW, refusal_types=REFUSALS, auth_failure_types=AUTH_FAILURES
    )
    assert report == RefusalReport()
    assert not missing.exists()


def test_refusals_are_ranked_by_address_and_reason_within_the_range(tmp_path: Path) -> None:
    path = write(
        tmp_path / "audit.sqlite3",
        event(1, "auth_signature", "10.0.0.1"),
        event(2, "auth_signature", "10.0.0.1"),
        event(3, "ip_rate_limited", "10.0.0.2"),
        event(6, "ip_rate_limited", "10.0.0.4", count=4),  # one row for four refusals
        event(4, "origin_refused", None),
        event(5, "config_changed", "10.0.0.3"),  # not a refusal
        event(50, "auth_signature", "10.0.0.9"),  # outside the range
    )
    report = refusal_report(
        path, NOW, NOW + 10, refusal_types=REFUSALS, auth_failure_types=AUTH_FAILURES, top=2
    )
    assert report.top_ips == [{"ip": "10.0.0.4", "count": 4}, {"ip": "10.0.0.1", "count": 2}]
    assert report.top_reasons == [
        {"reason": "ip_rate_limited", "count": 5},
        {"reason": "auth_signature", "count": 2},
    ]
    assert report.auth_failures == 2
    assert [found.type for found in events(path, since=NOW + 4, limit=10)] == [
        "auth_signature",
        "ip_rate_limited",
        "config_changed",
        "origin_refused",
    ]
