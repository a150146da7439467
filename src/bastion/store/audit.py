"""The audit log in SQLite, written by one thread so the event loop never waits on disk.

Writing: :meth:`AuditLog.record` puts the event on a bounded :class:`queue.Queue`
and returns at once. One writer thread takes events off the queue and inserts them
in batches (up to ``batch_size`` rows, or what arrived within ``batch_seconds``),
one transaction per batch. Retention runs in the same thread: on open, then every
``prune_every`` inserts or ``prune_seconds``, whichever comes first, it deletes rows
older than ``retention_days``, then, beyond ``max_rows``, the oldest rows of the
addresses that hold the most (:func:`~bastion.security.audit.fair_share`): a flood
from some addresses pushes out their own older rows, never the others' trail.
:meth:`AuditLog.close` flushes whatever is queued and joins the thread, so a clean
shutdown loses nothing.

Reading: :func:`query` opens the file read-only and needs no running server (the
``bastion audit`` command uses it).

Schema (WAL mode)::

    audit_events(id TEXT PRIMARY KEY, time REAL, type TEXT, severity TEXT, ip TEXT,
                 app_id TEXT, socket_id TEXT, user_id TEXT, message TEXT,
                 metadata TEXT)  -- metadata is a JSON object
    indexes on time, type, ip, (ip, time)
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, cast

from bastion.config import AuditSettings
from bastion.errors import BastionError
from bastion.security.audit import AuditEvent, MetadataValue, Severity, fair_share
from bastion.store import sqlite

__all__ = ["AuditLog", "AuditLogError", "query"]

log = logging.getLogger("bastion.audit")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS audit_events (
    id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    severity TEXT NOT NULL,
    ip TEXT,
    app_id TEXT,
    socket_id TEXT,
    user_id TEXT,
    message TEXT NOT NULL,
    metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (time);
CREATE INDEX IF NOT EXISTS audit_events_type ON audit_events (type);
CREATE INDEX IF NOT EXISTS audit_events_ip ON audit_events (ip);
CREATE INDEX IF NOT EXISTS audit_events_ip_time ON audit_events (ip, time);
"""

_INSERT: Final = (
    "INSERT OR IGNORE INTO audit_events"
    " (id, time, type, severity, ip, app_id, socket_id, user_id, message, metadata)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS: Final = "id, time, type, severity, ip, app_id, socket_id, user_id, message, metadata"

#: Seconds a connection waits on another writer's lock before giving up.

_STOP: Final = object()


class AuditLogError(BastionError):
    """The audit log file cannot be opened or read (the message names the path)."""


def _connect(path: str) -> sqlite3.Connection:
    # NORMAL: a power cut may lose the last batch, never corrupt the file.
    return sqlite.connect(path)


def _row(event: AuditEvent) -> tuple[object, ...]:
    return (
        event.id,
        event.time,
        event.type,
        event.severity,
        event.ip,
        event.app_id,
        event.socket_id,
        event.user_id,
        event.message,
        json.dumps(event.metadata, sort_keys=True, separators=(",", ":")),
    )


#: Deletes every row beyond the newest ``?`` of its address (rows without one: a group).
_DELETE_BEYOND_SHARE: Final = """
DELETE FROM audit_events WHERE rowid IN (
  SELECT rowid FROM (
    SELECT rowid, row_number() OVER (PARTITION BY ip ORDER BY time DESC, rowid DESC) AS newer
    FROM audit_events
  ) WHERE newer > ?
)
"""


def prune(connection: sqlite3.Connection, *, now: float, retention_days: int, max_rows: int) -> int:
    """Delete rows older than ``retention_days``; then, beyond ``max_rows``, the oldest
    rows of the addresses that hold the most.

    Each address keeps its newest ``level`` rows, ``level`` being the largest the
    cap allows (:func:`~bastion.security.audit.fair_share`); an address with fewer
    keeps them all, and the rows without an address (configuration, webhooks)
    count as one address. Only when there are more addresses than ``max_rows``
    are the oldest rows deleted whoever they belong to.

    Returns:
        How many rows were deleted.
    """
    with sqlite.transaction(connection):
        cutoff = now - retention_days * 86_400
        deleted = connection.execute("DELETE FROM audit_events WHERE time < ?", (cutoff,)).rowcount
        (count,) = connection.execute("SELECT count(*) FROM audit_events").fetchone()
        if int(count) > max_rows:
            groups = connection.execute("SELECT count(*) FROM audit_events GROUP BY ip")
            level = fair_share((int(size) for (size,) in groups), max_rows)
            if level > 0:
                deleted += connection.execute(_DELETE_BEYOND_SHARE, (level,)).rowcount
            else:
                deleted += connection.execute(
                    "DELETE FROM audit_events WHERE rowid IN"
                    " (SELECT rowid FROM audit_events ORDER BY time, rowid LIMIT ?)",
                    (int(count) - max_rows,),
                ).rowcount
    return int(deleted)


class AuditLog:
    """Persists audit events to SQLite from one writer thread.

    :meth:`record` never blocks the caller (the event loop). The queue is bounded
    (``queue_size``) because an unbounded one would let a flood of refusals grow
    memory without limit while the disk falls behind. **This queue is the one point
    where audit events can be lost:** when it is full, the event is dropped and
    counted in :attr:`dropped`, and a WARNING is logged at most once per second.
    We accept that loss rather than stall every connection on disk I/O, which
    would turn an attack on the audit log into a denial of service. Everything
    that made it onto the queue is written, including at :meth:`close`.

    Args:
        path: the SQLite file (created with its schema if missing).
        retention_days: rows older than this are deleted.
        max_rows: rows kept at most (see :func:`prune`).
        queue_size: events waiting to be written, at most.
        batch_size: rows per transaction, at most.
        batch_seconds: how long the writer gathers a batch once an event arrives.
        prune_every: run retention after this many inserts ...
        prune_seconds: ... or after this many seconds, whichever comes first.
        clock: Unix seconds (retention cutoff).

    Raises:
        AuditLogError: the file cannot be opened or is not an audit log.
    """

    def __init__(
        self,
        path: str,
        *,
        retention_days: int = 30,
        max_rows: int = 1_000_000,
        queue_size: int = 100_000,
        batch_size: int = 500,
        batch_seconds: float = 0.2,
        prune_every: int = 10_000,
        prune_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.batch_size = batch_size
        self.batch_seconds = batch_seconds
        self.prune_every = prune_every
        self.prune_seconds = prune_seconds
        self.clock = clock
        #: Events refused because the queue was full (or the log was closed).
        self.dropped = 0
        #: Events lost because SQLite failed to write their batch.
        self.failed = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._last_drop_warning = -1.0

        def prepare(connection: sqlite3.Connection) -> None:
            connection.executescript(_SCHEMA)
            prune(connection, now=clock(), retention_days=retention_days, max_rows=max_rows)

        try:
            sqlite.open_prepared(lambda: _connect(path), prepare).close()
        except sqlite3.Error as exc:
            raise AuditLogError(f"cannot open the audit log {path!r}: {exc}") from None
        self._thread = threading.Thread(target=self._run, name="bastion-audit", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> AuditLog:
        """An audit log as ``[audit]`` configures it."""
        return cls(
            settings.path, retention_days=settings.retention_days, max_rows=settings.max_rows
        )

    def record(self, event: AuditEvent) -> None:
        """Queue ``event`` for writing; never blocks (see the class note on drops)."""
        if self._closed:
            self._drop("the audit log is closed")
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._drop("the audit queue is full")

    def _drop(self, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_warning >= 1.0:
            self._last_drop_warning = now
            log.warning("audit event dropped: %s (%d dropped so far)", why, self.dropped)

    def close(self, timeout: float | None = None) -> bool:
        """Write everything queued, stop the writer thread, wait up to ``timeout``.

        Returns:
            True when the writer finished (everything queued was written or failed).
        """
        if not self._closed:
            self._closed = True
            try:
                # Blocks only while the writer frees room; it is draining the queue.
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the writer thread --------------------------------------------------------

    def _run(self) -> None:
        connection = _connect(self.path)
        try:
            self._write_until_stopped(connection)
        finally:
            connection.close()

    def _write_until_stopped(self, connection: sqlite3.Connection) -> None:
        inserted_since_prune = 0
        last_prune = time.monotonic()
        stopping = False
        while not stopping:
            batch: list[AuditEvent] = []
            try:
                item = self._queue.get(timeout=self.prune_seconds)
            except queue.Empty:
                item = None
            if item is _STOP:
                stopping = True
            elif item is not None:
                batch.append(cast(AuditEvent, item))
                stopping = self._gather(batch)
            if batch:
                self._write(connection, batch)
                inserted_since_prune += len(batch)
            due = time.monotonic() - last_prune >= self.prune_seconds
            if inserted_since_prune >= self.prune_every or due:
                self._prune(connection)
                inserted_since_prune = 0
                last_prune = time.monotonic()

    def _gather(self, batch: list[AuditEvent]) -> bool:
        """Fill ``batch`` for up to ``batch_seconds``; True when the stop marker came."""
        deadline = time.monotonic() + self.batch_seconds
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            batch.append(cast(AuditEvent, item))
        return False

    def _write(self, connection: sqlite3.Connection, batch: list[AuditEvent]) -> None:
        try:
            with sqlite.transaction(connection):
                connection.executemany(_INSERT, [_row(event) for event in batch])
        except sqlite3.Error as exc:
            self.failed += len(batch)
            log.warning("audit batch of %d events not written: %s", len(batch), exc)

    def _prune(self, connection: sqlite3.Connection) -> None:
        try:
            prune(
                connection,
                now=self.clock(),
                retention_days=self.retention_days,
                max_rows=self.max_rows,
            )
        except sqlite3.Error as exc:
            log.warning("audit retention did not run: %s", exc)


def _event(row: tuple[Any, ...]) -> AuditEvent:
    metadata = json.loads(row[9]) if row[9] else {}
    return AuditEvent(
        id=row[0],
        time=float(row[1]),
        type=row[2],
        severity=cast(Severity, row[3]),
        ip=row[4],
        app_id=row[5],
        socket_id=row[6],
        user_id=row[7],
        message=row[8],
        metadata=cast(dict[str, MetadataValue], metadata),
    )


def query(
    db_path: str | Path,
    *,
    since: float | None = None,
    until: float | None = None,
    type: str | None = None,
    severity: str | None = None,
    ip: str | None = None,
    app_id: str | None = None,
    limit: int = 100,
) -> list[AuditEvent]:
    """Events matching every given filter, newest first, at most ``limit``.

    ``since`` is inclusive and ``until`` exclusive (Unix seconds). Opens the file
    read-only; works whether or not a server is writing it.

    Raises:
        AuditLogError: the file does not exist or is not an audit log.
    """
    path = Path(db_path)
    if not path.is_file():
        raise AuditLogError(f"no audit log at {str(path)!r}")
    clauses: list[str] = []
    params: list[object] = []
    for clause, value in (
        ("time >= ?", since),
        ("time < ?", until),
        ("type = ?", type),
        ("severity = ?", severity),
        ("ip = ?", ip),
        ("app_id = ?", app_id),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT {_COLUMNS} FROM audit_events{where} ORDER BY time DESC, rowid DESC LIMIT ?"  # noqa: S608 - clauses are constants
    params.append(max(limit, 0))
    try:
        rows = sqlite.read_rows(path, sql, params) or []
    except sqlite3.Error as exc:
        raise AuditLogError(f"cannot read the audit log {str(path)!r}: {exc}") from None
    return [_event(row) for row in rows]
