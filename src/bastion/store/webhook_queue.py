"""The durable webhook queue in SQLite: every delivery is on disk before anyone relies on it.

A delivery is one HTTP POST of fixed body bytes to one endpoint URL. The producer
(:mod:`bastion.webhooks`) stores deliveries with :meth:`WebhookQueue.enqueue`; the
dispatcher claims due rows, attempts them and records each outcome; the CLI lists
and retries dead letters from another process while a node runs.

State machine of a row (``state`` column)::

    enqueue ──▶ pending ──2xx──────────────────────────▶ done ──retention──▶ (deleted)
                 │  ▲ └──5xx/429/network, young enough──┐
                 │  └──────────── next_attempt_at ◀─────┘
                 └──other 4xx/3xx, too old, app gone, refused──▶ dead ──retention──▶ (deleted)
                                                                  │
                 pending ◀──────── bastion webhooks retry ─────────┘

"In flight" is not a state on disk: a claimed row stays ``pending`` and this
object remembers its id until the attempt is recorded or released. A row that was
in flight when the process died is therefore simply pending at the next start
(at-least-once; the ``idempotency_key`` lets the receiver drop the duplicate), and
no recovery step can clobber rows another process is working on.

The methods are synchronous: the CLI calls them directly and a node through
:func:`asyncio.to_thread`. One connection guarded by a lock serves every thread;
other processes share the file through WAL and a busy timeout.

Schema (WAL, ``synchronous=FULL`` so an acknowledged enqueue survives power loss)::

    deliveries(id INTEGER PRIMARY KEY AUTOINCREMENT, app_id TEXT, url TEXT,
               body BLOB,                 -- emptied once delivered
               idempotency_key TEXT UNIQUE,
               created_at REAL,           -- queued at (Unix seconds)
               age_from REAL,             -- give-up age counts from here
               state TEXT,                -- pending | done | dead
               attempts INTEGER, next_attempt_at REAL,
               last_error TEXT, finished_at REAL)
    index on (state, next_attempt_at), index on (state, finished_at)
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bastion.errors import BastionError
from bastion.store import sqlite

__all__ = [
    "DeadLetter",
    "Delivery",
    "NewDelivery",
    "QueueCounts",
    "WebhookQueue",
    "WebhookQueueError",
    "list_dead_letters",
]

#: Seconds a connection waits on another writer's lock before giving up.
_DAY: Final = 86_400.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS deliveries (
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
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries (state, finished_at);
"""

_DEAD_COLUMNS: Final = "id, app_id, url, attempts, last_error, created_at, finished_at"


class WebhookQueueError(BastionError):
    """The queue file cannot be opened, read or written (the message names the path)."""


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A delivery to store.

    Attributes:
        app_id: the app whose webhook this is (signs it at send time).
        url: the endpoint.
        body: the exact bytes to POST (the JSON payload).
        idempotency_key: unique per delivery (uuid4 hex), sent as a header on every attempt.
        created_at: Unix seconds it was queued.
    """

    app_id: str
    url: str
    body: bytes
    idempotency_key: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Delivery:
    """A pending delivery handed to the dispatcher.

    Attributes:
        id: the row id (what the CLI shows and retries).
        app_id: the app.
        url: the endpoint.
        body: the bytes to POST.
        idempotency_key: the receiver's dedupe key.
        created_at: Unix seconds it was queued.
        age_from: Unix seconds the give-up age counts from.
        attempts: attempts made before this one.
    """

    id: int
    app_id: str
    url: str
    body: bytes
    idempotency_key: str
    created_at: float
    age_from: float
    attempts: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery that was given up, as the CLI lists it (no body)."""

    id: int
    app_id: str
    url: str
    attempts: int
    last_error: str | None
    created_at: float
    died_at: float


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Rows per state."""

    pending: int
    done: int
    dead: int


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    return DeadLetter(
        id=int(row[0]),
        app_id=row[1],
        url=row[2],
        attempts=int(row[3]),
        last_error=row[4],
        created_at=float(row[5]),
        died_at=float(row[6]) if row[6] is not None else float(row[5]),
    )


def _connect(path: str) -> sqlite3.Connection:
    # FULL, not NORMAL: an enqueue that returned must survive power loss, because the
    # producer forgets the events once they are stored.
    return sqlite.connect(path, synchronous="FULL", check_same_thread=False)


class WebhookQueue:
    """The queue file, open for reading and writing. Build it with :meth:`open`.

    Args:
        path: the SQLite file.
        connection: an open connection with the schema in place.
        max_pending: pending rows kept at most; :meth:`enqueue` drops the rest.
        retention_days: done rows and dead letters older than this are pruned.
    """

    def __init__(
        self, path: str, connection: sqlite3.Connection, *, max_pending: int, retention_days: int
    ) -> None:
        self.path = path
        self.max_pending = max_pending
        self.retention_days = retention_days
        self._connection = connection
        self._lock = threading.Lock()
        #: Ids handed out by :meth:`claim_due` and not yet recorded or released.
        self._claimed: set[int] = set()

    @classmethod
    def open(cls, path: str, *, max_pending: int, retention_days: int) -> WebhookQueue:
        """Open (creating if needed) the queue file at ``path``.

        Raises:
            WebhookQueueError: the file cannot be opened or is not a queue file.
        """
        try:
            connection = _connect(path)
            try:
                connection.executescript(_SCHEMA)
            except sqlite3.Error:
                connection.close()
                raise
        except sqlite3.Error as exc:
            raise WebhookQueueError(f"cannot open the webhook queue {path!r}: {exc}") from None
        return cls(path, connection, max_pending=max_pending, retention_days=retention_days)

    def close(self) -> None:
        """Close the file (further calls raise :class:`WebhookQueueError`)."""
        with self._lock:
            self._connection.close()
            self._claimed.clear()

    def __enter__(self) -> WebhookQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # Caller holds self._lock.
        try:
            with sqlite.transaction(self._connection) as connection:
                yield connection
        except sqlite3.Error as exc:
            raise WebhookQueueError(
                f"cannot write the webhook queue {self.path!r}: {exc}"
            ) from None

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        # Caller holds self._lock.
        try:
            return self._connection.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise WebhookQueueError(f"cannot read the webhook queue {self.path!r}: {exc}") from None

    # --- producer ---------------------------------------------------------------------

    def enqueue(self, items: Sequence[NewDelivery]) -> int:
        """Store ``items`` in one transaction, as far as ``max_pending`` allows.

        Returns:
            How many were stored (the first ones); the rest were dropped because the
            queue holds ``max_pending`` pending rows.
        """
        if not items:
            return 0
        with self._lock, self._write() as connection:
            (pending,) = connection.execute(
                "SELECT COUNT(*) FROM deliveries WHERE state = 'pending'"
            ).fetchone()
            room = max(0, self.max_pending - int(pending))
            kept = list(items[:room])
            connection.executemany(
                "INSERT INTO deliveries (app_id, url, body, idempotency_key, created_at,"
                " age_from, state, attempts, next_attempt_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?)",
                [
                    (d.app_id, d.url, d.body, d.idempotency_key, d.created_at, d.created_at, 0.0)
                    for d in kept
                ],
            )
        return len(kept)

    # --- dispatcher -------------------------------------------------------------------

    def claim_due(self, now: float, *, limit: int, skip_urls: Iterable[str] = ()) -> list[Delivery]:
        """Pending rows due at ``now`` and not already claimed, oldest due first.

        The rows returned are claimed: they are not handed out again by this object
        until :meth:`mark_done`, :meth:`mark_retry`, :meth:`mark_dead` or
        :meth:`release` names them.

        Args:
            now: Unix seconds.
            limit: at most this many rows.
            skip_urls: endpoints that have no free slot (their rows are left alone).
        """
        with self._lock:
            rows = self._read(
                "SELECT id, app_id, url, body, idempotency_key, created_at, age_from, attempts"
                " FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?"
                " AND id NOT IN (SELECT value FROM json_each(?))"
                " AND url NOT IN (SELECT value FROM json_each(?))"
                " ORDER BY next_attempt_at, id LIMIT ?",
                (now, json.dumps(sorted(self._claimed)), json.dumps(sorted(skip_urls)), limit),
            )
            deliveries = [
                Delivery(
                    id=int(r[0]),
                    app_id=r[1],
                    url=r[2],
                    body=bytes(r[3]),
                    idempotency_key=r[4],
                    created_at=float(r[5]),
                    age_from=float(r[6]),
                    attempts=int(r[7]),
                )
                for r in rows
            ]
            self._claimed.update(d.id for d in deliveries)
        return deliveries

    def next_due_at(self, *, skip_urls: Iterable[str] = ()) -> float | None:
        """Unix seconds of the earliest next attempt among unclaimed pending rows."""
        with self._lock:
            rows = self._read(
                "SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'pending'"
                " AND id NOT IN (SELECT value FROM json_each(?))"
                " AND url NOT IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted(self._claimed)), json.dumps(sorted(skip_urls))),
            )
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None

    def release(self, ids: Iterable[int]) -> None:
        """Forget the claims on ``ids`` without recording anything (they stay pending)."""
        with self._lock:
            self._claimed.difference_update(ids)

    def release_all(self) -> None:
        """Forget every claim (a stopped dispatcher's rows are pending for the next start)."""
        with self._lock:
            self._claimed.clear()

    def mark_done(self, id: int, *, now: float) -> None:
        """Record a delivered attempt; the body is emptied (it is no longer needed)."""
        with self._lock:
            self._claimed.discard(id)
            with self._write() as connection:
                connection.execute(
                    "UPDATE deliveries SET state = 'done', attempts = attempts + 1,"
                    " body = x'', last_error = NULL, finished_at = ? WHERE id = ?",
                    (now, id),
                )

    def mark_retry(self, id: int, *, next_attempt_at: float, error: str) -> None:
        """Record a failed attempt that will be retried at ``next_attempt_at``."""
        with self._lock:
            self._claimed.discard(id)
            with self._write() as connection:
                connection.execute(
                    "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?,"
                    " last_error = ? WHERE id = ? AND state = 'pending'",
                    (next_attempt_at, error, id),
                )

    def mark_dead(self, id: int, *, now: float, error: str, attempted: bool = True) -> None:
        """Move a delivery to the dead letters.

        Args:
            id: the row.
            now: Unix seconds (the time of death).
            error: why, as the CLI shows it.
            attempted: whether a request was sent this time (counts an attempt).
        """
        with self._lock:
            self._claimed.discard(id)
            with self._write() as connection:
                connection.execute(
                    "UPDATE deliveries SET state = 'dead', attempts = attempts + ?,"
                    " last_error = ?, finished_at = ? WHERE id = ?",
                    (1 if attempted else 0, error, now, id),
                )

    # --- operators --------------------------------------------------------------------

    def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The dead letters, most recently given up first."""
        with self._lock:
            rows = self._read(
                f"SELECT {_DEAD_COLUMNS} FROM deliveries WHERE state = 'dead'"  # noqa: S608
                " ORDER BY finished_at DESC, id DESC LIMIT ?",
                (limit,),
            )
        return [_dead_letter(row) for row in rows]

    def retry_dead(self, ids: Iterable[int] | None, *, now: float) -> list[int]:
        """Move dead letters back to pending, due at once, with a fresh give-up age.

        Args:
            ids: the rows to retry; ``None`` for every dead letter.
            now: Unix seconds.

        Returns:
            The ids that were dead letters and are pending again.
        """
        with self._lock, self._write() as connection:
            if ids is None:
                rows = connection.execute(
                    "SELECT id FROM deliveries WHERE state = 'dead' ORDER BY id"
                ).fetchall()
            else:
                rows = connection.execute(
                    "SELECT id FROM deliveries WHERE state = 'dead'"
                    " AND id IN (SELECT value FROM json_each(?)) ORDER BY id",
                    (json.dumps(sorted(set(ids))),),
                ).fetchall()
            moved = [int(row[0]) for row in rows]
            connection.execute(
                "UPDATE deliveries SET state = 'pending', next_attempt_at = ?, age_from = ?,"
                " finished_at = NULL WHERE id IN (SELECT value FROM json_each(?))",
                (now, now, json.dumps(moved)),
            )
        return moved

    def counts(self) -> QueueCounts:
        """Rows per state."""
        with self._lock:
            rows = self._read("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
        found = {state: int(count) for state, count in rows}
        return QueueCounts(found.get("pending", 0), found.get("done", 0), found.get("dead", 0))

    def prune(self, *, now: float) -> int:
        """Delete done rows and dead letters finished more than ``retention_days`` ago.

        Returns:
            How many rows were deleted.
        """
        cutoff = now - self.retention_days * _DAY
        with self._lock, self._write() as connection:
            deleted = connection.execute(
                "DELETE FROM deliveries WHERE state IN ('done', 'dead') AND finished_at < ?",
                (cutoff,),
            ).rowcount
        return int(deleted)


def list_dead_letters(path: str | Path, *, limit: int = 100) -> list[DeadLetter]:
    """The dead letters in the file at ``path``, read-only; none when it is missing.

    Raises:
        WebhookQueueError: the file exists but is not a readable queue file.
    """
    try:
        rows = sqlite.read_rows(
            path,
            f"SELECT {_DEAD_COLUMNS} FROM deliveries WHERE state = 'dead'"  # noqa: S608
            " ORDER BY finished_at DESC, id DESC LIMIT ?",
            (limit,),
        )
    except sqlite3.Error as exc:
        raise WebhookQueueError(f"cannot read the webhook queue {str(path)!r}: {exc}") from None
    if rows is None:
        return []
    return [_dead_letter(row) for row in rows]
