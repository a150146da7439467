"""The durable webhook queue: enqueue bound, claims, the state machine, dead letters, pruning.

Claims shared between queue objects (leases) are in ``test_webhook_queue_leases.py``.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from bastion.store.webhook_queue import (
    NewDelivery,
    QueueCounts,
    WebhookQueue,
    WebhookQueueError,
    list_dead_letters,
)

T0 = 1_700_000_000.0
URL = "https://hooks.example.com/pusher"


def item(n: int = 0, *, url: str = URL, app_id: str = "app1", at: float = T0) -> NewDelivery:
    return NewDelivery(
        app_id=app_id,
        url=url,
        body=b'{"time_ms":1,"events":[{"name":"channel_occupied","channel":"c%d"}]}' % n,
        idempotency_key=uuid.uuid4().hex,
        created_at=at,
    )


def open_queue(path: Path, max_pending: int = 100, retention_days: int = 7) -> WebhookQueue:
    return WebhookQueue.open(str(path), max_pending=max_pending, retention_days=retention_days)


@pytest.fixture
def queue(tmp_path: Path) -> WebhookQueue:
    return open_queue(tmp_path / "queue.sqlite3")


def test_open_sets_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    with open_queue(path) as queue:
        assert queue.counts() == QueueCounts(0, 0, 0)
        (mode,) = queue._connection.execute("PRAGMA journal_mode").fetchone()
        (sync,) = queue._connection.execute("PRAGMA synchronous").fetchone()
    assert mode == "wal" and sync == 2  # FULL


def test_bad_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(WebhookQueueError, match="nowhere"):
        open_queue(tmp_path / "nowhere" / "queue.sqlite3")
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(WebhookQueueError, match="garbage"):
        open_queue(garbage)


def test_enqueue_claim_done_round_trip(queue: WebhookQueue, tmp_path: Path) -> None:
    stored = item(1)
    assert queue.enqueue([stored]) == 1
    assert queue.enqueue([]) == 0
    (claimed,) = queue.claim_due(T0, limit=10)
    assert (claimed.app_id, claimed.url, claimed.body) == (stored.app_id, URL, stored.body)
    assert claimed.idempotency_key == stored.idempotency_key
    assert (claimed.created_at, claimed.age_from, claimed.attempts) == (T0, T0, 0)
    # Claimed: not handed out twice within a run.
    assert queue.claim_due(T0, limit=10) == []
    assert queue.next_due_at(T0) is None
    queue.mark_done(claimed.id, now=T0 + 1)
    assert queue.counts() == QueueCounts(0, 1, 0)
    (body,) = queue._connection.execute("SELECT body FROM deliveries").fetchone()
    assert body == b""  # a delivered body is not kept


def test_enqueue_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    with open_queue(path) as queue:
        queue.enqueue([item(1), item(2)])
    with open_queue(path) as again:
        assert len(again.claim_due(T0, limit=10)) == 2


def test_max_pending_drops_the_rest(tmp_path: Path) -> None:
    with open_queue(tmp_path / "queue.sqlite3", max_pending=3) as queue:
        assert queue.enqueue([item(1), item(2)]) == 2
        assert queue.enqueue([item(3), item(4), item(5)]) == 1
        assert queue.enqueue([item(6)]) == 0
        assert queue.counts().pending == 3
        # Done and dead rows do not count against the bound.
        (first, *_) = queue.claim_due(T0, limit=1)
        queue.mark_done(first.id, now=T0)
        assert queue.enqueue([item(7), item(8)]) == 1


def test_retry_schedules_and_counts_attempts(queue: WebhookQueue) -> None:
    queue.enqueue([item(1)])
    (claimed,) = queue.claim_due(T0, limit=10)
    queue.mark_retry(claimed.id, next_attempt_at=T0 + 5, error="HTTP 503")
    assert queue.claim_due(T0 + 4.9, limit=10) == []
    assert queue.next_due_at(T0) == T0 + 5
    (again,) = queue.claim_due(T0 + 5, limit=10)
    assert again.attempts == 1 and again.id == claimed.id


def test_claim_skips_full_endpoints_and_orders_by_due_time(queue: WebhookQueue) -> None:
    other = "http://other.example.com/hook"
    queue.enqueue([item(1), item(2, url=other), item(3)])
    claimed = queue.claim_due(T0, limit=10, skip_urls=[URL])
    assert [d.url for d in claimed] == [other]
    assert queue.next_due_at(T0, skip_urls=[URL]) is None
    assert queue.next_due_at(T0) == 0.0
    assert [d.url for d in queue.claim_due(T0, limit=1)] == [URL]


def test_release_makes_rows_claimable_again(queue: WebhookQueue) -> None:
    queue.enqueue([item(1), item(2)])
    first, second = queue.claim_due(T0, limit=10)
    queue.release([first.id])
    assert [d.id for d in queue.claim_due(T0, limit=10)] == [first.id]
    queue.release_all()
    assert {d.id for d in queue.claim_due(T0, limit=10)} == {first.id, second.id}


def test_rows_in_flight_at_a_crash_are_pending_at_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    queue = open_queue(path)
    queue.enqueue([item(1)])
    (claimed,) = queue.claim_due(T0, limit=10, lease_seconds=60)
    # No mark: the process "dies" here. A new run hands the row out once the lease ends.
    with open_queue(path) as again:
        assert again.claim_due(T0 + 60, limit=10) == []
        (resumed,) = again.claim_due(T0 + 60.5, limit=10)
        assert resumed.idempotency_key == claimed.idempotency_key
    queue.close()


def test_dead_letters_list_and_retry(queue: WebhookQueue, tmp_path: Path) -> None:
    queue.enqueue([item(1), item(2, app_id="app2"), item(3)])
    a, b, c = queue.claim_due(T0, limit=10)
    queue.mark_dead(a.id, now=T0 + 10, error="HTTP 400 (not retried)")
    queue.mark_dead(b.id, now=T0 + 20, error="app is no longer configured", attempted=False)
    queue.mark_done(c.id, now=T0 + 1)
    letters = queue.dead_letters()
    assert [(d.id, d.app_id, d.attempts, d.died_at) for d in letters] == [
        (b.id, "app2", 0, T0 + 20),
        (a.id, "app1", 1, T0 + 10),
    ]
    assert letters[1].last_error == "HTTP 400 (not retried)"
    assert list_dead_letters(tmp_path / "queue.sqlite3") == letters
    assert list_dead_letters(tmp_path / "queue.sqlite3", limit=1) == letters[:1]
    assert list_dead_letters(tmp_path / "missing.sqlite3") == []
    # Only dead letters move; unknown and done ids are ignored.
    assert queue.retry_dead([a.id, c.id, 999], now=T0 + 100) == [a.id]
    assert queue.counts() == QueueCounts(1, 1, 1)
    (retried,) = queue.claim_due(T0 + 100, limit=10)
    assert retried.id == a.id and retried.age_from == T0 + 100 and retried.created_at == T0
    assert queue.retry_dead(None, now=T0 + 200) == [b.id]
    assert queue.dead_letters() == []


def test_prune_keeps_pending_and_recent(tmp_path: Path) -> None:
    with open_queue(tmp_path / "queue.sqlite3", retention_days=1) as queue:
        queue.enqueue([item(n) for n in range(4)])
        a, b, c, _ = queue.claim_due(T0, limit=10)
        queue.mark_done(a.id, now=T0)
        queue.mark_dead(b.id, now=T0, error="x")
        queue.mark_done(c.id, now=T0 + 86_400)
        queue.release_all()
        assert queue.prune(now=T0 + 86_400.5) == 2
        assert queue.counts() == QueueCounts(1, 1, 0)


def test_another_process_connection_can_retry_while_open(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    node = open_queue(path)
    node.enqueue([item(1)])
    (claimed,) = node.claim_due(T0, limit=10)
    node.mark_dead(claimed.id, now=T0, error="HTTP 410 (not retried)")
    with open_queue(path) as cli:
        assert cli.retry_dead(None, now=T0 + 1) == [claimed.id]
    assert [d.id for d in node.claim_due(T0 + 1, limit=10)] == [claimed.id]
    node.close()


def test_threads_share_one_queue(queue: WebhookQueue) -> None:
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            for n in range(20):
                queue.enqueue([item(n)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=producer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors
    assert queue.counts().pending == 80
    assert len({d.id for d in queue.claim_due(T0, limit=1000)}) == 80


def test_closed_queue_raises(queue: WebhookQueue) -> None:
    queue.close()
    with pytest.raises(WebhookQueueError):
        queue.counts()
    with pytest.raises(WebhookQueueError):
        queue.enqueue([item(1)])
