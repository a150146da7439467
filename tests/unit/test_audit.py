"""The audit event model, redaction, time parsing, and the SQLite audit log."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.protocol.refusals import Reason
from bastion.security.audit import (
    REDACTED,
    AuditEvent,
    fair_share,
    from_refusal,
    parse_time,
    redact,
)
from bastion.server.refusals import RefusalRecord
from bastion.store.audit import AuditLog, AuditLogError, query

SIG = "a" * 32 + "0123456789abcdef" * 2
NOW = 1_800_000_000.0


def event(n: int = 0, **overrides: object) -> AuditEvent:
    fields: dict[str, object] = {
        "id": f"{n:032x}",
        "time": NOW + n,
        "type": "malformed_json",
        "severity": "warning",
        "ip": "10.0.0.1",
        "app_id": "12345",
        "socket_id": "1.2",
        "user_id": None,
        "message": "Message is not valid JSON",
        "metadata": {"reason": "MALFORMED_JSON", "error_code": 4300},
    }
    fields.update(overrides)
    return AuditEvent(**fields)  # type: ignore[arg-type]


# --- model -------------------------------------------------------------------------------


def test_from_refusal_copies_identifiers_and_rule() -> None:
    record = RefusalRecord(
        Reason.HTTP_SIGNATURE, "12345", "10.0.0.9", None, None, "Invalid signature"
    )
    got = from_refusal(record, id="abc", time=NOW)
    assert got == AuditEvent(
        id="abc",
        time=NOW,
        type="auth_signature",
        severity="warning",
        ip="10.0.0.9",
        app_id="12345",
        socket_id=None,
        user_id=None,
        message="Invalid signature",
        metadata={"reason": "HTTP_SIGNATURE", "http_status": 401},
    )


def test_from_refusal_keeps_info_severity_and_ids() -> None:
    record = RefusalRecord(Reason.PONG_TIMEOUT, "1", "::1", "9.8", "u1", "Pong reply not received")
    got = from_refusal(record, id="x", time=1.0)
    assert (got.type, got.severity, got.socket_id, got.user_id) == (
        "pong_timeout",
        "info",
        "9.8",
        "u1",
    )
    assert got.metadata == {"reason": "PONG_TIMEOUT", "close_code": 4201}


@pytest.mark.parametrize(
    "overrides",
    [{"id": ""}, {"type": ""}, {"severity": "error"}, {"time": float("nan")}],
)
def test_invalid_events_cannot_exist(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        event(**overrides)


def test_event_is_frozen() -> None:
    with pytest.raises(AttributeError):
        event().type = "x"  # type: ignore[misc]


# --- redaction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"sig {SIG} end", f"sig {REDACTED} end"),
        (SIG.upper(), REDACTED),
        (f"a=1&auth_signature={SIG}&b=2", f"a=1&auth_signature={REDACTED}&b=2"),
        ("auth_signature=short", f"auth_signature={REDACTED}"),
        (f"?auth=app-key:{SIG}", f"?auth={REDACTED}"),
        (f"auth app-key:{SIG} sent", f"auth {REDACTED} sent"),
        ("secret=hunter2 ok", f"secret={REDACTED} ok"),
        ("Invalid signature", "Invalid signature"),
        ("auth_key does not belong to this app", "auth_key does not belong to this app"),
        ("ip ::1 socket 123.456", "ip ::1 socket 123.456"),
        ("deadbeef" * 7, "deadbeef" * 7),  # 56 hex digits: not a signature
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_constructor_redacts_message_and_metadata() -> None:
    got = event(message=f"bad auth=key:{SIG}", metadata={"q": f"x={SIG}", "n": 3, "ok": True})
    assert SIG not in got.message
    assert got.metadata == {"q": f"x={REDACTED}", "n": 3, "ok": True}


# --- time parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - 1800),
        ("1h", NOW - 3600),
        ("2d", NOW - 172_800),
        ("1w", NOW - 604_800),
        ("90s", NOW - 90),
        ("1.5h", NOW - 5400),
        ("1700000000", 1_700_000_000.0),
        ("2026-01-31T12:00:00Z", 1_769_860_800.0),
        ("2026-01-31T12:00:00", 1_769_860_800.0),
        ("2026-01-31T13:00:00+01:00", 1_769_860_800.0),
        ("2026-01-31", 1_769_817_600.0),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "1y", "h", "-", "yesterday", "nan", "inf", "1 h"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text, now=NOW)


# --- store ---------------------------------------------------------------------------------


def open_log(path: Path, **options: object) -> AuditLog:
    options.setdefault("clock", lambda: NOW + 1000)
    return AuditLog(str(path), **options)  # type: ignore[arg-type]


def test_record_then_close_writes_everything(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    audit = open_log(db, batch_size=7)
    events = [event(n) for n in range(1000)]
    for item in events:
        audit.record(item)
    assert audit.close(10)
    assert audit.dropped == 0 and audit.failed == 0
    got = query(db, limit=5000)
    assert got == list(reversed(events))  # newest first, identical round trip


def test_schema_indexes_and_wal(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    open_log(db).close(5)
    connection = sqlite3.connect(db)
    try:
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
        columns = [row[1] for row in connection.execute("PRAGMA table_info(audit_events)")]
        indexes = {row[1] for row in connection.execute("PRAGMA index_list(audit_events)")}
    finally:
        connection.close()
    assert mode == "wal"
    assert columns == [
        "id",
        "time",
        "type",
        "severity",
        "ip",
        "app_id",
        "socket_id",
        "user_id",
        "message",
        "metadata",
    ]
    assert {"audit_events_time", "audit_events_type", "audit_events_ip"} <= indexes


def test_query_filters(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    audit = open_log(db)
    audit.record(event(1))
    audit.record(event(2, type="auth_signature", ip="10.0.0.2", app_id="777"))
    audit.record(event(3, type="pong_timeout", severity="info", app_id=None))
    audit.record(event(4, ip="10.0.0.2"))
    assert audit.close(5)

    def ids(**filters: object) -> list[int]:
        return [int(e.id, 16) for e in query(db, **filters)]  # type: ignore[arg-type]

    assert ids() == [4, 3, 2, 1]
    assert ids(type="malformed_json") == [4, 1]
    assert ids(severity="info") == [3]
    assert ids(ip="10.0.0.2") == [4, 2]
    assert ids(app_id="777") == [2]
    assert ids(since=NOW + 2) == [4, 3, 2]
    assert ids(until=NOW + 2) == [1]
    assert ids(since=NOW + 2, until=NOW + 4, ip="10.0.0.2") == [2]
    assert ids(limit=2) == [4, 3]
    assert ids(type="nothing") == []


def test_query_missing_file_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "missing.sqlite3"
    with pytest.raises(AuditLogError, match="no audit log"):
        query(db)
    assert not db.exists()


def test_query_not_an_audit_log(tmp_path: Path) -> None:
    db = tmp_path / "other.sqlite3"
    db.write_bytes(b"not a database at all" * 100)
    with pytest.raises(AuditLogError):
        query(db)


def test_open_bad_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AuditLogError, match="cannot open"):
        AuditLog(str(tmp_path / "no-such-dir" / "audit.sqlite3"))


def test_retention_by_age_on_open_and_in_writer(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    day = 86_400
    audit = open_log(db, retention_days=2, clock=lambda: NOW)
    audit.record(event(1, time=NOW - 3 * day))  # too old
    audit.record(event(2, time=NOW - 1 * day))
    assert audit.close(5)
    assert [e.id for e in query(db)] == [event(2).id, event(1).id]  # not pruned yet
    reopened = open_log(db, retention_days=2, clock=lambda: NOW)  # open prunes
    assert [e.id for e in query(db)] == [event(2).id]
    # In the writer thread: every `prune_every` inserts.
    reopened.close(5)
    writer = open_log(db, retention_days=2, clock=lambda: NOW + day * 1.5, prune_every=1)
    writer.record(event(3, time=NOW))
    assert writer.close(5)
    assert [e.id for e in query(db)] == [event(3).id]


def test_a_flood_from_one_address_cannot_push_out_the_others_rows(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    audit = open_log(db, batch_size=500)
    # Older evidence from other addresses, and from no address at all.
    audit.record(event(1, type="ip_blocked_auto", ip="198.51.100.1", time=NOW - 3 * 86_400))
    audit.record(event(2, type="auth_signature", ip="198.51.100.2", time=NOW - 2 * 86_400))
    audit.record(event(3, type="config_loaded", ip=None, time=NOW - 86_400))
    # Then a flood from one address, all newer.
    for n in range(100, 1100):
        audit.record(event(n, ip="203.0.113.7", time=NOW + n))
    assert audit.close(10)
    open_log(db, max_rows=50).close(5)  # open prunes
    kept = query(db, limit=1000)
    assert len(kept) == 50
    assert {1, 2, 3} <= {int(e.id, 16) for e in kept}  # every other address's rows
    flood = sorted(int(e.id, 16) for e in kept if e.ip == "203.0.113.7")
    assert flood == list(range(1053, 1100))  # the flooder keeps its newest rows


def test_more_addresses_than_rows_deletes_the_oldest(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    audit = open_log(db)
    for n in range(10):
        audit.record(event(n, ip=f"198.51.100.{n}"))
    assert audit.close(5)
    open_log(db, max_rows=4).close(5)
    assert sorted(int(e.id, 16) for e in query(db)) == [6, 7, 8, 9]


def test_fair_share_examples() -> None:
    assert fair_share([], 10) == 0
    assert fair_share([3, 4], 10) == 4  # everything fits
    assert fair_share([1, 1, 1, 1000], 40) == 37
    assert fair_share([5, 5, 5], 2) == 0  # more groups than room


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=0, max_value=200), max_size=30),
    capacity=st.integers(min_value=0, max_value=2000),
)
def test_fair_share_is_the_largest_level_that_fits(counts: list[int], capacity: int) -> None:
    level = fair_share(counts, capacity)
    kept = sum(min(count, level) for count in counts)
    if sum(counts) <= capacity:
        assert level == max(counts, default=0)
    else:
        assert kept <= capacity
        assert sum(min(count, level + 1) for count in counts) > capacity


def test_retention_by_max_rows_keeps_newest(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    audit = open_log(db, max_rows=3, prune_every=4, batch_size=1)
    for n in (5, 1, 4, 2, 3, 6):  # insertion order differs from time order
        audit.record(event(n))
    assert audit.close(5)
    # Pruned after 4 inserts (kept 5, 4, 2); 3 and 6 came after.
    assert sorted(int(e.id, 16) for e in query(db)) == [2, 3, 4, 5, 6]
    open_log(db, max_rows=3).close(5)  # open prunes
    assert [int(e.id, 16) for e in query(db)] == [6, 5, 4]


def test_full_queue_drops_are_counted_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "audit.sqlite3"
    audit = open_log(db, queue_size=2)
    # Hold the writer inside its first batch so the queue stays full.
    gate = threading.Event()
    entered = threading.Event()
    original = audit._write

    def slow_write(connection: sqlite3.Connection, batch: list[AuditEvent]) -> None:
        entered.set()
        gate.wait(10)
        original(connection, batch)

    audit._write = slow_write  # type: ignore[method-assign]
    audit.batch_seconds = 0
    audit.record(event(0))
    assert entered.wait(5)
    caplog.set_level(logging.WARNING, logger="bastion.audit")
    for n in range(1, 13):
        audit.record(event(n))  # 2 fit, 10 are dropped; never blocks
    assert audit.dropped == 10
    warnings = [r for r in caplog.records if r.name == "bastion.audit"]
    assert len(warnings) == 1 and "dropped" in warnings[0].getMessage()
    gate.set()
    assert audit.close(5)
    assert len(query(db)) == 3
    audit.record(event(99))  # after close: dropped, not written
    assert audit.dropped == 11


def test_duplicate_ids_are_written_once(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    audit = open_log(db)
    audit.record(event(1))
    audit.record(event(1))  # same id: ignored, not an error
    assert audit.close(5)
    assert audit.failed == 0
    assert len(query(db)) == 1
