"""The store files (audit log, webhook queue, blocks) and their WAL files are owner-only.

Real SQLite files under ``tmp_path``, real writes, then ``os.stat`` on the database,
its ``-wal`` and its ``-shm`` while a connection still holds them open (SQLite
deletes both when the last connection closes cleanly).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from bastion.security.audit import AuditEvent
from bastion.security.reputation import Block
from bastion.store import sqlite
from bastion.store.audit import AuditLog, query
from bastion.store.blocks import BlockStore
from bastion.store.webhook_queue import NewDelivery, WebhookQueue

T0 = 1_700_000_000.0


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def modes(db: Path) -> dict[str, int]:
    """The permission bits of the database and its two WAL files (which must exist)."""
    return {suffix: mode(f"{db}{suffix}") for suffix in ("", "-wal", "-shm")}


PRIVATE = {"": 0o600, "-wal": 0o600, "-shm": 0o600}


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """A typical and a wide-open umask: the files must not depend on it."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


@contextmanager
def blocks_written(db: Path) -> Iterator[None]:
    store = BlockStore(db)
    try:
        block = Block(ip="192.0.2.1", until=T0 + 60, reason="x", source="manual", created=T0)
        assert store.block(block, now=T0)
        yield
    finally:
        store.close()


@contextmanager
def queue_written(db: Path) -> Iterator[None]:
    queue = WebhookQueue.open(str(db), max_pending=10, retention_days=7)
    try:
        item = NewDelivery(
            app_id="1",
            url="https://hooks.example.com/h",
            body=b"{}",
            idempotency_key=uuid.uuid4().hex,
            created_at=T0,
        )
        assert queue.enqueue([item]) == 1
        yield
    finally:
        queue.close()


@contextmanager
def audit_written(db: Path) -> Iterator[None]:
    log = AuditLog(str(db), clock=lambda: T0)
    # A reader keeps the WAL files in place once the writer thread has closed.
    reader = sqlite3.connect(db)
    try:
        event = AuditEvent(
            id=uuid.uuid4().hex,
            time=T0,
            type="auth_signature",
            severity="warning",
            ip="192.0.2.1",
            app_id="1",
            socket_id=None,
            user_id=None,
            message="m",
        )
        log.record(event)
        assert log.close(10)  # everything queued is written
        assert [e.id for e in query(db, since=0, limit=10)] == [event.id]
        reader.execute("SELECT count(*) FROM sqlite_master").fetchall()
        yield
    finally:
        reader.close()


STORES: dict[str, Callable[[Path], AbstractContextManager[None]]] = {
    "blocks": blocks_written,
    "webhook_queue": queue_written,
    "audit": audit_written,
}


@pytest.mark.parametrize("store", sorted(STORES))
def test_a_new_store_file_and_its_wal_files_are_owner_only(
    tmp_path: Path, umask: int, store: str
) -> None:
    db = tmp_path / f"{store}.sqlite3"
    with STORES[store](db):
        assert modes(db) == PRIVATE


def test_the_helper_creates_the_file_owner_only(tmp_path: Path, umask: int) -> None:
    db = tmp_path / "plain.sqlite3"
    connection = sqlite.connect(str(db))
    try:
        with sqlite.transaction(connection):
            connection.execute("CREATE TABLE t (x)")
            connection.execute("INSERT INTO t VALUES (1)")
        assert modes(db) == PRIVATE
    finally:
        connection.close()


def _wide_database(db: Path, wide: int) -> sqlite3.Connection:
    """A WAL database left by an older version: all three files ``wide``, still open."""
    previous = os.umask(0)
    try:
        old = sqlite3.connect(db, isolation_level=None)
        old.execute("PRAGMA journal_mode=WAL")
        old.execute("CREATE TABLE t (x)")
        old.execute("INSERT INTO t VALUES (1)")
    finally:
        os.umask(previous)
    for suffix in ("", "-wal", "-shm"):
        os.chmod(f"{db}{suffix}", wide)
    return old


@pytest.mark.parametrize("wide", [0o644, 0o666, 0o640, 0o604], ids=oct)
def test_an_existing_wide_file_we_own_is_tightened_with_its_wal_files(
    tmp_path: Path, wide: int, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "old.sqlite3"
    old = _wide_database(db, wide)
    try:
        assert modes(db) == {"": wide, "-wal": wide, "-shm": wide}
        with caplog.at_level(logging.INFO, logger="bastion.store"):
            connection = sqlite.connect(str(db))
        try:
            assert connection.execute("SELECT x FROM t").fetchall() == [(1,)]
            assert modes(db) == PRIVATE
        finally:
            connection.close()
    finally:
        old.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(db) in r.getMessage() for r in caplog.records)  # the change is logged


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_a_wide_file_of_another_owner_is_left_alone_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "theirs.sqlite3"
    old = _wide_database(db, 0o644)
    try:
        for suffix in ("", "-wal", "-shm"):
            os.chown(f"{db}{suffix}", 65534, 65534)
        with caplog.at_level(logging.WARNING, logger="bastion.store"):
            for _ in range(3):  # never fails, warns once per file
                sqlite.connect(str(db)).close()
        assert mode(db) == 0o644
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert str(db) in warnings[0].getMessage() and "0644" in warnings[0].getMessage()
    finally:
        old.close()


def test_read_only_opens_never_create_or_change_a_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite3"
    assert sqlite.read_rows(missing, "SELECT 1") is None
    assert not missing.exists()
    db = tmp_path / "ro.sqlite3"
    old = _wide_database(db, 0o644)
    old.close()
    assert sqlite.read_rows(db, "SELECT x FROM t") == [(1,)]
    assert mode(db) == 0o644
