"""Claims shared through the queue file: two queue objects on one file (as two workers).

Every clock is passed in as ``now``; the lease is set per claim.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.store.webhook_queue import (
    DEFAULT_LEASE_SECONDS,
    NewDelivery,
    QueueCounts,
    WebhookQueue,
    _new_owner,
    list_dead_letters,
)
from bastion.webhooks.dispatcher import MIN_LEASE_SECONDS, lease_seconds

T0 = 1_700_000_000.0
URL = "https://hooks.example.com/pusher"
LEASE = 30.0


def item(n: int = 0) -> NewDelivery:
    return NewDelivery(
        app_id="app1",
        url=URL,
        body=b'{"time_ms":1,"events":[{"name":"channel_occupied","channel":"c%d"}]}' % n,
        idempotency_key=uuid.uuid4().hex,
        created_at=T0,
    )


def open_queue(path: Path, owner: str | None = None) -> WebhookQueue:
    return WebhookQueue.open(str(path), max_pending=1000, retention_days=7, owner=owner)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "queue.sqlite3"


@pytest.fixture
def pair(path: Path) -> Iterator[tuple[WebhookQueue, WebhookQueue]]:
    a, b = open_queue(path, owner="worker-a"), open_queue(path, owner="worker-b")
    yield a, b
    a.close()
    b.close()


def lease_of(queue: WebhookQueue, id: int) -> tuple[str | None, float | None]:
    row = queue._connection.execute(
        "SELECT claimed_by, claim_until FROM deliveries WHERE id = ?", (id,)
    ).fetchone()
    return row[0], row[1]


def test_each_open_gets_its_own_owner_unless_given(path: Path) -> None:
    with open_queue(path) as a, open_queue(path) as b, open_queue(path, owner="w1") as c:
        assert a.owner != b.owner
        assert a.owner.split("/")[-2] == str(os.getpid())
        assert c.owner == "w1"


def exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process (until reused, which is not now)
    return child.pid


def test_rows_of_an_exited_holder_are_claimable_before_the_lease_ends(path: Path) -> None:
    # A worker SIGKILLed mid-attempt: its pid is gone, so the next start (or another
    # worker) need not wait out the lease.
    dead = open_queue(path, owner=_new_owner(exited_pid()))
    alive = open_queue(path, owner=_new_owner(os.getpid()))
    elsewhere = open_queue(path, owner=f"other-host/1/{exited_pid()}/x")
    with open_queue(path) as survivor:
        survivor.enqueue([item(n) for n in range(3)])
        # (The dead one claims last: the others would take its row over at once.)
        (of_alive,) = alive.claim_due(T0, limit=1, lease_seconds=3600)
        (of_elsewhere,) = elsewhere.claim_due(T0, limit=1, lease_seconds=3600)
        (of_dead,) = dead.claim_due(T0, limit=1, lease_seconds=3600)
        assert elsewhere.claim_due(T0 + 1, limit=10) == [of_dead]
        elsewhere.release([of_dead.id])
        dead.claim_due(T0, limit=1, lease_seconds=3600)
        assert survivor.next_due_at(T0 + 1) == 0.0
        # Only the exited holder's row: a live one, or one this host cannot judge
        # (another host or container), waits for its lease.
        taken = survivor.claim_due(T0 + 1, limit=10, lease_seconds=7200)
        assert [d.id for d in taken] == [of_dead.id]
        assert survivor.next_due_at(T0 + 1) is None
        assert survivor.claim_due(T0 + 3600, limit=10) == []
        taken = survivor.claim_due(T0 + 3601, limit=10)
        assert sorted(d.id for d in taken) == sorted([of_alive.id, of_elsewhere.id])
    for queue in (dead, alive, elsewhere):
        queue.close()


def test_a_claim_is_a_lease_in_the_file(pair: tuple[WebhookQueue, WebhookQueue]) -> None:
    a, _ = pair
    a.enqueue([item(1)])
    (claimed,) = a.claim_due(T0, limit=10, lease_seconds=LEASE)
    assert lease_of(a, claimed.id) == ("worker-a", T0 + LEASE)
    assert a.counts() == QueueCounts(1, 0, 0)  # still pending on disk
    with pytest.raises(ValueError, match="lease_seconds"):
        a.claim_due(T0, limit=10, lease_seconds=0)


def test_two_objects_on_one_file_claim_disjoint_rows(
    pair: tuple[WebhookQueue, WebhookQueue],
) -> None:
    a, b = pair
    a.enqueue([item(n) for n in range(10)])
    first = a.claim_due(T0, limit=4, lease_seconds=LEASE)
    second = b.claim_due(T0, limit=10, lease_seconds=LEASE)
    assert len(first) == 4 and len(second) == 6
    assert {d.id for d in first}.isdisjoint(d.id for d in second)
    # Nothing is left for either while the leases are live, not even for its holder.
    assert a.claim_due(T0 + LEASE, limit=10) == []
    assert b.claim_due(T0 + LEASE, limit=10) == []
    assert a.next_due_at(T0) is None and b.next_due_at(T0 + LEASE) is None


def test_racing_claims_from_threads_never_share_a_row(
    pair: tuple[WebhookQueue, WebhookQueue],
) -> None:
    a, b = pair
    a.enqueue([item(n) for n in range(200)])
    got: list[int] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def worker(queue: WebhookQueue) -> None:
        try:
            while batch := queue.claim_due(T0, limit=3, lease_seconds=LEASE):
                with guard:
                    got.extend(d.id for d in batch)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(q,)) for q in (a, b, a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert len(got) == 200 and len(set(got)) == 200


def test_an_expired_lease_is_claimed_by_the_other(
    pair: tuple[WebhookQueue, WebhookQueue],
) -> None:
    a, b = pair
    a.enqueue([item(1)])
    (held,) = a.claim_due(T0, limit=10, lease_seconds=LEASE)
    # Live up to and including claim_until.
    assert b.claim_due(T0 + LEASE, limit=10) == []
    assert b.next_due_at(T0 + LEASE) is None
    # A dies (or stalls) without recording anything: after the lease B takes the row.
    assert b.next_due_at(T0 + LEASE + 1) == 0.0
    (taken,) = b.claim_due(T0 + LEASE + 1, limit=10, lease_seconds=LEASE)
    assert (taken.id, taken.idempotency_key) == (held.id, held.idempotency_key)
    assert lease_of(b, held.id) == ("worker-b", T0 + 2 * LEASE + 1)
    # A's late failures do not touch B's row; B's own outcome is recorded.
    assert a.mark_retry(held.id, next_attempt_at=T0 + 99, error="HTTP 503") is False
    assert a.mark_dead(held.id, now=T0 + 40, error="HTTP 400") is False
    a.release([held.id])
    assert lease_of(a, held.id) == ("worker-b", T0 + 2 * LEASE + 1)
    assert b.mark_retry(held.id, next_attempt_at=T0 + 99, error="HTTP 503") is True
    (row,) = b._connection.execute("SELECT attempts, next_attempt_at FROM deliveries").fetchall()
    assert row == (1, T0 + 99)


def test_a_late_success_is_recorded_and_the_holders_outcome_is_not(
    pair: tuple[WebhookQueue, WebhookQueue],
) -> None:
    a, b = pair
    a.enqueue([item(1)])
    (held,) = a.claim_due(T0, limit=10, lease_seconds=LEASE)
    b.claim_due(T0 + LEASE + 1, limit=10, lease_seconds=LEASE)
    # A's attempt was delivered after all: that is the truth, B's resend is a duplicate
    # the receiver drops by Idempotency-Key.
    assert a.mark_done(held.id, now=T0 + LEASE + 2) is True
    assert lease_of(a, held.id) == (None, None)
    assert b.mark_retry(held.id, next_attempt_at=T0 + 99, error="HTTP 503") is False
    assert b.mark_dead(held.id, now=T0 + 50, error="HTTP 400") is False
    assert b.mark_done(held.id, now=T0 + 50) is False
    assert a.counts() == QueueCounts(0, 1, 0)


def test_release_makes_rows_claimable_by_the_other_at_once(
    pair: tuple[WebhookQueue, WebhookQueue],
) -> None:
    a, b = pair
    a.enqueue([item(1), item(2), item(3)])
    first, second, third = a.claim_due(T0, limit=10, lease_seconds=LEASE)
    b.release([first.id])  # not B's: nothing happens
    assert b.claim_due(T0, limit=10) == []
    a.release([first.id])
    assert lease_of(a, first.id) == (None, None)
    assert b.next_due_at(T0) == 0.0
    assert [d.id for d in b.claim_due(T0, limit=10, lease_seconds=LEASE)] == [first.id]
    a.release_all()
    assert [d.id for d in b.claim_due(T0, limit=10)] == [second.id, third.id]
    assert lease_of(a, first.id) == ("worker-b", T0 + LEASE)  # B's claims are B's


def test_close_releases_the_claims(path: Path) -> None:
    a, b = open_queue(path), open_queue(path)
    a.enqueue([item(1), item(2)])
    assert len(a.claim_due(T0, limit=10)) == 2
    a.close()
    assert len(b.claim_due(T0, limit=10)) == 2
    b.close()


@pytest.mark.parametrize("outcome", ["done", "retry", "dead"])
def test_recording_an_outcome_clears_the_lease(
    pair: tuple[WebhookQueue, WebhookQueue], outcome: str
) -> None:
    a, b = pair
    a.enqueue([item(1)])
    (held,) = a.claim_due(T0, limit=10, lease_seconds=LEASE)
    if outcome == "done":
        recorded = a.mark_done(held.id, now=T0 + 1)
    elif outcome == "retry":
        recorded = a.mark_retry(held.id, next_attempt_at=T0 + 5, error="HTTP 503")
    else:
        recorded = a.mark_dead(held.id, now=T0 + 1, error="HTTP 400")
    assert recorded is True
    assert lease_of(a, held.id) == (None, None)
    if outcome == "retry":
        # Due again at its retry time, well before the old lease would have ended.
        assert b.next_due_at(T0 + 5) == T0 + 5
        (again,) = b.claim_due(T0 + 5, limit=10)
        assert again.attempts == 1
    else:
        assert b.claim_due(T0 + LEASE + 1, limit=10) == []
        # Finished: a second record changes nothing.
        assert a.mark_done(held.id, now=T0 + 2) is False
        assert a.mark_dead(held.id, now=T0 + 2, error="again") is False


def test_retried_dead_letters_come_back_unclaimed(
    pair: tuple[WebhookQueue, WebhookQueue],
) -> None:
    a, b = pair
    a.enqueue([item(1)])
    (held,) = a.claim_due(T0, limit=10)
    a.mark_dead(held.id, now=T0, error="HTTP 410")
    assert b.retry_dead(None, now=T0 + 1) == [held.id]
    assert lease_of(b, held.id) == (None, None)
    assert [d.id for d in a.claim_due(T0 + 1, limit=10)] == [held.id]


OLD_SCHEMA = """
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    age_from REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    finished_at REAL
);
CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX deliveries_finished ON deliveries (state, finished_at);
INSERT INTO deliveries (app_id, url, body, idempotency_key, created_at, age_from, state,
                        attempts, next_attempt_at)
    VALUES ('app1', 'https://a.example.com/h', x'7b7d', 'key-pending', 1.0, 1.0, 'pending', 2, 0.0);
INSERT INTO deliveries (app_id, url, body, idempotency_key, created_at, age_from, state,
                        attempts, next_attempt_at, last_error, finished_at)
    VALUES ('app1', 'https://a.example.com/h', x'7b7d', 'key-dead', 1.0, 1.0, 'dead', 5, 0.0,
            'HTTP 410', 2.0);
"""


def columns(path: Path) -> list[str]:
    connection = sqlite3.connect(path)
    try:
        return [str(row[1]) for row in connection.execute("PRAGMA table_info(deliveries)")]
    finally:
        connection.close()


def test_a_file_from_before_leases_opens_and_is_migrated(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.executescript(OLD_SCHEMA)
    connection.close()
    assert "claimed_by" not in columns(path)
    # Read-only listing works before any migration.
    assert [d.last_error for d in list_dead_letters(path)] == ["HTTP 410"]

    a, b = open_queue(path, owner="worker-a"), open_queue(path, owner="worker-b")
    try:
        assert columns(path)[-2:] == ["claimed_by", "claim_until"]
        assert a.counts() == QueueCounts(1, 0, 1)
        (held,) = a.claim_due(T0, limit=10, lease_seconds=LEASE)
        assert (held.idempotency_key, held.attempts, held.body) == ("key-pending", 2, b"{}")
        assert b.claim_due(T0, limit=10) == []
        assert a.mark_done(held.id, now=T0 + 1) is True
        assert [d.last_error for d in b.dead_letters()] == ["HTTP 410"]
    finally:
        a.close()
        b.close()
    # Opening a migrated file again changes nothing.
    with open_queue(path) as again:
        assert again.counts() == QueueCounts(0, 1, 1)
    assert columns(path).count("claimed_by") == 1


def test_the_dispatcher_lease_comfortably_exceeds_an_attempt() -> None:
    assert MIN_LEASE_SECONDS == DEFAULT_LEASE_SECONDS == 60.0
    assert lease_seconds(10) == 60.0  # the default timeout_seconds
    assert lease_seconds(0.2) == 60.0
    assert lease_seconds(45) == 135.0
