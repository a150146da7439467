"""The refusal path: every refusal counted and heard, log lines and audit rows aggregated."""

from __future__ import annotations

import logging

import pytest

from bastion.metrics import Metrics
from bastion.protocol.refusals import Reason
from bastion.security.audit import from_refusal
from bastion.server.refusals import RefusalPath, RefusalRecord, RefusalSummary

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def path_with(clock: Clock) -> tuple[RefusalPath, list[RefusalRecord], list[RefusalSummary]]:
    path = RefusalPath(Metrics(), clock=clock)
    heard: list[RefusalRecord] = []
    written: list[RefusalSummary] = []
    path.listeners.append(heard.append)
    path.summaries.append(written.append)
    return path, heard, written


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bastion.refusals"]


def test_a_flood_is_heard_in_full_but_written_once_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bastion.refusals")
    clock = Clock()
    path, heard, written = path_with(clock)
    for _ in range(1000):
        path.record(Reason.CLIENT_EVENT_NAME, app_id="1", ip="203.0.113.7", socket_id="1.2")
        clock.now += 0.01
    # Counted and heard (reputation, budgets) every time ...
    assert path.metrics.refusals[("client_event_name", "1")] == 1000
    assert len(heard) == 1000
    # ... but written once so far: the first one, at once.
    assert [(s.count, s.aggregated) for s in written] == [(1, False)]
    assert len(lines(caplog)) == 1
    assert lines(caplog)[0].startswith(
        "refused reason=client_event_name app=1 ip=203.0.113.7 socket=1.2 detail="
    )
    assert path.pending() == 999

    clock.now = T0 + 60.0  # the window ends
    assert path.flush() == 1
    assert [(s.count, s.aggregated) for s in written] == [(1, False), (999, True)]
    assert written[1].first == pytest.approx(T0 + 0.01)
    assert written[1].last == pytest.approx(T0 + 9.99)
    assert len(lines(caplog)) == 2
    assert lines(caplog)[1].endswith("count=999 over 10.0 s (repeats aggregated)")
    assert path.pending() == 0


def test_each_address_reason_and_app_is_written_at_once() -> None:
    clock = Clock()
    path, _, written = path_with(clock)
    path.record(Reason.MALFORMED_JSON, app_id="1", ip="203.0.113.7")
    path.record(Reason.MALFORMED_JSON, app_id="1", ip="203.0.113.8")
    path.record(Reason.MALFORMED_JSON, app_id="2", ip="203.0.113.7")
    path.record(Reason.NOT_AN_OBJECT, app_id="1", ip="203.0.113.7")
    path.record(Reason.NOT_AN_OBJECT, app_id="1", ip="203.0.113.7", socket_id="other")
    assert [s.count for s in written] == [1, 1, 1, 1]
    assert path.pending() == 1


def test_a_stop_writes_every_open_count() -> None:
    clock = Clock()
    path, _, written = path_with(clock)
    for slug_reason in (Reason.MALFORMED_JSON, Reason.HTTP_SIGNATURE):
        for _ in range(3):
            path.record(slug_reason, ip="203.0.113.7")
    assert path.flush() == 0  # no window has ended
    assert path.flush_all() == 2
    assert sorted((s.record.reason.name, s.count) for s in written if s.aggregated) == [
        ("HTTP_SIGNATURE", 2),
        ("MALFORMED_JSON", 2),
    ]
    assert sum(s.count for s in written) == 6


def test_an_aggregate_becomes_one_audit_row_with_its_count() -> None:
    record = RefusalRecord(Reason.MESSAGE_RATE, "1", "203.0.113.7", "1.2", None, "slow down")
    row = from_refusal(record, id="x", time=T0 + 59, repeats=(412, T0 + 1, T0 + 59))
    assert row.type == "message_rate" and row.time == T0 + 59
    assert row.metadata["count"] == 412
    assert (row.metadata["first"], row.metadata["last"]) == (T0 + 1, T0 + 59)
    assert row.message == "slow down (repeated 412 times over 58.0 s)"
    single = from_refusal(record, id="y", time=T0)
    assert "count" not in single.metadata and single.message == "slow down"
