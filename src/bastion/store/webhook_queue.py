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

"In flight" is not a state either: a claimed row stays ``pending`` and carries a
lease in the file (``claimed_by`` = the claiming queue object's owner id,
``claim_until`` = when the lease ends). :meth:`WebhookQueue.claim_due` takes rows
whose lease is absent or over inside one ``BEGIN IMMEDIATE`` transaction, so several
processes on one file (``bastion serve --workers N``) never hold the same row at
once. Recording an outcome or :meth:`~WebhookQueue.release` clears the lease; a
process that dies holding rows simply lets the leases run out, after which any
worker (or the next start) sends them again (at-least-once; the
``idempotency_key`` lets the receiver drop the duplicate). Sooner when the dead
holder can be seen to be dead: the default owner id names the host, pid namespace
and pid, and a holder on this host and namespace whose pid no longer exists (a
SIGKILLed node) loses its rows at once. Any other holder (another container, a
reused pid, an owner id given by the caller) is never judged; its lease decides.
No recovery step runs at open, so nothing can clobber rows another process is
working on.

Outcomes recorded after a lease ran out (it is sized well above one attempt, so
this needs a stalled process or a clock jump): a delivered row (2xx) is recorded
``done`` whoever holds it now, since that is the truth and the other holder's
resend is absorbed by the ``idempotency_key``; a retry or a dead letter is only
recorded while no other owner holds the row, otherwise the holder's attempt
decides. Either way the row is never lost: it is ``done``, ``dead``, or pending
with a lease that ends.

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
               last_error TEXT, finished_at REAL,
               claimed_by TEXT,           -- owner id of the lease, NULL when unclaimed
               claim_until REAL)          -- the lease ends at (Unix seconds)
    index on (state, next_attempt_at), index on (state, finished_at),
    partial index on (claimed_by) where claimed
Files written before leases existed get the two columns added when opened.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bastion.errors import BastionError
from bastion.store import sqlite

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "DeadLetter",
    "Delivery",
    "NewDelivery",
    "QueueCounts",
    "WebhookQueue",
    "WebhookQueueError",
    "list_dead_letters",
]

_DAY: Final = 86_400.0

#: Seconds a claim lasts unless the caller says otherwise (the dispatcher sizes it
#: from its per-attempt timeout).
DEFAULT_LEASE_SECONDS: Final = 60.0

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
    finished_at REAL,
    claimed_by TEXT,
    claim_until REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries (state, finished_at);
"""

#: Columns added after the first release: (name, declaration), added on open if missing.
_LEASE_COLUMNS: Final = (("claimed_by", "TEXT"), ("claim_until", "REAL"))


def _process_tag() -> str:
    """``host/pid-namespace`` of this process: where a pid in an owner id means something."""
    return f"{socket.gethostname()}/{_pid_namespace()}"


@functools.cache
def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


def _new_owner(pid: int | None = None) -> str:
    """A fresh owner id: ``host/pid-namespace/pid/random`` (see :func:`_holder_is_gone`)."""
    return f"{_process_tag()}/{os.getpid() if pid is None else pid}/{uuid.uuid4().hex}"


def _holder_is_gone(owner: str) -> bool:
    """Whether ``owner`` names a process that has certainly exited.

    Only for owners made by :func:`_new_owner` on this host and in this pid namespace,
    on POSIX: anything else (a given owner id, another container, another OS) is
    never judged and waits for its lease to end. A reused pid looks alive: the lease
    then decides too.
    """
    tag, _, rest = owner.rpartition("/")[0].rpartition("/")
    if os.name != "posix" or tag != _process_tag() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, as another user
        return False
    return False


#: Small (only rows in flight): finds an owner's claims for release_all.
_CLAIM_INDEX: Final = (
    "CREATE INDEX IF NOT EXISTS deliveries_claimed ON deliveries (claimed_by)"
    " WHERE claimed_by IS NOT NULL"
)

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


def _prepare(connection: sqlite3.Connection) -> None:
    """Create the schema, or bring a file written by an older release up to date."""
    connection.executescript(_SCHEMA)
    # One write transaction, so two processes opening an old file at once cannot
    # both add a column (the second sees it and does nothing).
    with sqlite.transaction(connection):
        present = {str(row[1]) for row in connection.execute("PRAGMA table_info(deliveries)")}
        for name, declaration in _LEASE_COLUMNS:
            if name not in present:
                connection.execute(f"ALTER TABLE deliveries ADD COLUMN {name} {declaration}")
        connection.execute(_CLAIM_INDEX)


class WebhookQueue:
    """The queue file, open for reading and writing. Build it with :meth:`open`.

    Args:
        path: the SQLite file.
        connection: an open connection with the schema in place.
        max_pending: pending rows kept at most; :meth:`enqueue` drops the rest.
        retention_days: done rows and dead letters older than this are pruned.
        owner: this object's id in the ``claimed_by`` column; two objects on one
            file must not share one. By default ``host/pid-namespace/pid/random``,
            which lets others on this host see when this process has exited.
    """

    def __init__(
        self,
        path: str,
        connection: sqlite3.Connection,
        *,
        max_pending: int,
        retention_days: int,
        owner: str | None = None,
    ) -> None:
        self.path = path
        self.max_pending = max_pending
        self.retention_days = retention_days
        self.owner = owner if owner is not None else _new_owner()
        self._connection = connection
        self._lock = threading.Lock()
        #: Ids this object claimed and has not recorded or released yet. Only spares
        #: :meth:`release` and :meth:`release_all` a write when nothing is held; who
        #: holds a row is decided by the file.
        self._held: set[int] = set()

    @classmethod
    def open(
        cls, path: str, *, max_pending: int, retention_days: int, owner: str | None = None
    ) -> WebhookQueue:
        """Open (creating or migrating if needed) the queue file at ``path``.

        Raises:
            WebhookQueueError: the file cannot be opened or is not a queue file.
        """

        try:
            connection = sqlite.open_prepared(lambda: _connect(path), _prepare)
        except sqlite3.Error as exc:
            raise WebhookQueueError(f"cannot open the webhook queue {path!r}: {exc}") from None
        return cls(
            path, connection, max_pending=max_pending, retention_days=retention_days, owner=owner
        )

    def close(self) -> None:
        """Release this object's claims (best effort) and close the file.

        Further calls raise :class:`WebhookQueueError`.
        """
        with self._lock:
            if self._held:
                # A failure here only delays those rows until their leases end.
                with contextlib.suppress(sqlite3.Error):
                    self._connection.execute(
                        "UPDATE deliveries SET claimed_by = NULL, claim_until = NULL"
                        " WHERE claimed_by = ?",
                        (self.owner,),
                    )
            self._held.clear()
            self._connection.close()

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

    def _gone_holders(self, connection: sqlite3.Connection, now: float) -> str:
        """JSON list of the other owners with a live lease whose process has exited.

        Their rows are claimable before the lease ends (a crashed worker's rows go
        out at the next start, not a lease later). Caller holds self._lock.
        """
        rows = connection.execute(
            "SELECT DISTINCT claimed_by FROM deliveries"
            " WHERE claimed_by IS NOT NULL AND claim_until >= ?",
            (now,),
        ).fetchall()
        holders = {str(row[0]) for row in rows} - {self.owner}
        return json.dumps(sorted(h for h in holders if _holder_is_gone(h)))

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

    def claim_due(
        self,
        now: float,
        *,
        limit: int,
        skip_urls: Iterable[str] = (),
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> list[Delivery]:
        """Claim pending rows due at ``now`` that nobody holds, oldest due first.

        In one write transaction the rows are selected and leased to this object's
        owner until ``now + lease_seconds``: no queue object on this file (in this
        process or another) is handed them again before :meth:`mark_done`,
        :meth:`mark_retry`, :meth:`mark_dead` or :meth:`release` clears the lease, or
        the lease ends. A row whose lease ended (its holder died or stalled), or
        whose holder is a process on this host that has exited, is claimed like an
        unclaimed one.

        Args:
            now: Unix seconds.
            limit: at most this many rows.
            skip_urls: endpoints that have no free slot (their rows are left alone).
            lease_seconds: how long the claim lasts; must comfortably exceed one
                attempt and the recording of its outcome.

        Raises:
            ValueError: ``lease_seconds`` is not positive.
        """
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, not {lease_seconds!r}")
        skip = json.dumps(sorted(skip_urls))
        with self._lock:
            # Fast path: most polls find nothing to claim, and a read takes no write
            # lock. Only a candidate makes it worth one (and it is checked again there).
            try:
                if not self._claimable(self._connection, now, skip, 1):
                    return []
            except sqlite3.Error as exc:
                raise WebhookQueueError(
                    f"cannot read the webhook queue {self.path!r}: {exc}"
                ) from None
            with self._write() as connection:
                rows = self._claimable(connection, now, skip, limit)
                if rows:
                    connection.execute(
                        "UPDATE deliveries SET claimed_by = ?, claim_until = ?"
                        " WHERE id IN (SELECT value FROM json_each(?))",
                        (self.owner, now + lease_seconds, json.dumps([r[0] for r in rows])),
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
            self._held.update(d.id for d in deliveries)
        return deliveries

    def _claimable(
        self, connection: sqlite3.Connection, now: float, skip: str, limit: int
    ) -> list[tuple[Any, ...]]:
        """Rows :meth:`claim_due` may take at ``now``, oldest due first. Caller holds the lock."""
        gone = self._gone_holders(connection, now)
        return connection.execute(
            "SELECT id, app_id, url, body, idempotency_key, created_at, age_from, attempts"
            " FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?"
            " AND (claim_until IS NULL OR claim_until < ?"  # no live lease, anyone's,
            " OR claimed_by IN (SELECT value FROM json_each(?)))"  # or a dead holder
            " AND url NOT IN (SELECT value FROM json_each(?))"
            " ORDER BY next_attempt_at, id LIMIT ?",
            (now, now, gone, skip, limit),
        ).fetchall()

    def next_due_at(self, now: float, *, skip_urls: Iterable[str] = ()) -> float | None:
        """Unix seconds of the earliest next attempt among pending rows nobody holds at ``now``.

        Rows under a live lease (anyone's) are left out: their holder records them.
        Rows of a holder that has exited count, as in :meth:`claim_due`.
        """
        with self._lock:
            try:
                gone = self._gone_holders(self._connection, now)
            except sqlite3.Error as exc:
                raise WebhookQueueError(
                    f"cannot read the webhook queue {self.path!r}: {exc}"
                ) from None
            rows = self._read(
                "SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'pending'"
                " AND (claim_until IS NULL OR claim_until < ?"
                " OR claimed_by IN (SELECT value FROM json_each(?)))"
                " AND url NOT IN (SELECT value FROM json_each(?))",
                (now, gone, json.dumps(sorted(skip_urls))),
            )
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None

    def release(self, ids: Iterable[int]) -> None:
        """Clear this owner's claims on ``ids`` without recording anything.

        They are pending and claimable at once; ids this owner does not hold (any
        more) are left alone.
        """
        with self._lock:
            mine = sorted(self._held.intersection(ids))
            if not mine:
                return
            self._held.difference_update(mine)
            with self._write() as connection:
                connection.execute(
                    "UPDATE deliveries SET claimed_by = NULL, claim_until = NULL"
                    " WHERE claimed_by = ? AND id IN (SELECT value FROM json_each(?))",
                    (self.owner, json.dumps(mine)),
                )

    def release_all(self) -> None:
        """Clear every claim of this owner (a stopping dispatcher's rows, for others now)."""
        with self._lock:
            if not self._held:
                return
            self._held.clear()
            with self._write() as connection:
                connection.execute(
                    "UPDATE deliveries SET claimed_by = NULL, claim_until = NULL"
                    " WHERE claimed_by = ?",
                    (self.owner,),
                )

    def mark_done(self, id: int, *, now: float) -> bool:
        """Record a delivered attempt; the body is emptied (it is no longer needed).

        Recorded while the row is pending, whoever holds it now: it was delivered.
        Another holder's resend is absorbed by the idempotency key, and its own
        outcome is then not recorded (the row is no longer pending).

        Returns:
            Whether the row was recorded (``False``: it was already done or dead).
        """
        with self._lock:
            self._held.discard(id)
            with self._write() as connection:
                changed = connection.execute(
                    "UPDATE deliveries SET state = 'done', attempts = attempts + 1,"
                    " body = x'', last_error = NULL, finished_at = ?,"
                    " claimed_by = NULL, claim_until = NULL"
                    " WHERE id = ? AND state = 'pending'",
                    (now, id),
                ).rowcount
        return changed > 0

    def mark_retry(self, id: int, *, next_attempt_at: float, error: str) -> bool:
        """Record a failed attempt that will be retried at ``next_attempt_at``.

        Only while the row is pending and no other owner holds it (this owner's lease,
        even an ended one, or none); otherwise the holder's attempt decides.

        Returns:
            Whether the row was recorded.
        """
        with self._lock:
            self._held.discard(id)
            with self._write() as connection:
                changed = connection.execute(
                    "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?,"
                    " last_error = ?, claimed_by = NULL, claim_until = NULL"
                    " WHERE id = ? AND state = 'pending'"
                    " AND (claimed_by IS NULL OR claimed_by = ?)",
                    (next_attempt_at, error, id, self.owner),
                ).rowcount
        return changed > 0

    def mark_dead(self, id: int, *, now: float, error: str, attempted: bool = True) -> bool:
        """Move a delivery to the dead letters.

        Only while the row is pending and no other owner holds it, like
        :meth:`mark_retry`: a row another worker is sending stays with that worker.

        Args:
            id: the row.
            now: Unix seconds (the time of death).
            error: why, as the CLI shows it.
            attempted: whether a request was sent this time (counts an attempt).

        Returns:
            Whether the row was recorded.
        """
        with self._lock:
            self._held.discard(id)
            with self._write() as connection:
                changed = connection.execute(
                    "UPDATE deliveries SET state = 'dead', attempts = attempts + ?,"
                    " last_error = ?, finished_at = ?, claimed_by = NULL, claim_until = NULL"
                    " WHERE id = ? AND state = 'pending'"
                    " AND (claimed_by IS NULL OR claimed_by = ?)",
                    (1 if attempted else 0, error, now, id, self.owner),
                ).rowcount
        return changed > 0

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
                " finished_at = NULL, claimed_by = NULL, claim_until = NULL"
                " WHERE id IN (SELECT value FROM json_each(?))",
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
