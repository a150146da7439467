"""Blocked addresses in SQLite, shared by the nodes and ``bastion block``/``unblock``/``blocks``.

One row per address, updated in place. Every write (a block, a replacement, an
unblock) stamps the row with the next value of a monotonically increasing change
counter, so a reader asks "what changed since change N" with one indexed query
(:meth:`BlockStore.changes`) instead of re-reading the table. An unblock keeps its
row (``active = 0``) for :data:`KEEP_SECONDS` so every node sees it; rows that have
been inactive or expired for longer are pruned.

The methods are synchronous: the CLI calls them directly and a node through
:func:`asyncio.to_thread`. One connection guarded by a lock serves every thread.

Schema (WAL mode)::

    blocks(ip TEXT PRIMARY KEY, until REAL, reason TEXT, source TEXT,  -- auto|manual
           created REAL, active INTEGER, changed REAL, change_id INTEGER)
    meta(key TEXT PRIMARY KEY, value INTEGER)  -- 'change_id': the last one issued
    index on change_id
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from bastion.errors import BastionError
from bastion.security.reputation import Block, BlockSource
from bastion.store import sqlite

__all__ = ["KEEP_SECONDS", "BlockChange", "BlockStore", "BlockStoreError", "list_active"]

#: Seconds an unblocked or expired row is kept so that every node reads the change.
KEEP_SECONDS: Final = 86_400.0

#: Seconds a connection waits on another writer's lock before giving up.

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS blocks (
    ip TEXT PRIMARY KEY,
    until REAL NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('auto', 'manual')),
    created REAL NOT NULL,
    active INTEGER NOT NULL,
    changed REAL NOT NULL,
    change_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS blocks_change_id ON blocks (change_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('change_id', 0);
"""

_COLUMNS: Final = "ip, until, reason, source, created, active, change_id"


class BlockStoreError(BastionError):
    """The blocks file cannot be opened, read or written (the message names the path)."""


@dataclass(frozen=True, slots=True)
class BlockChange:
    """The state of one address after a change.

    Attributes:
        change_id: the change's number (strictly increasing across the file).
        ip: the address.
        block: the block now recorded (check :meth:`Block.active`: it may have
            expired since), or ``None`` when the address was unblocked.
    """

    change_id: int
    ip: str
    block: Block | None


def _block(row: tuple[Any, ...]) -> Block:
    return Block(
        ip=row[0],
        until=float(row[1]),
        reason=row[2],
        source=cast(BlockSource, row[3]),
        created=float(row[4]),
    )


def _connect(path: str) -> sqlite3.Connection:
    # NORMAL: a power cut may lose the last write, never corrupt the file.
    return sqlite.connect(path, check_same_thread=False)


class BlockStore:
    """The blocks file, open for reading and writing.

    Args:
        path: the SQLite file (created with its schema if missing).

    Raises:
        BlockStoreError: the file cannot be opened or is not a blocks file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()

        try:
            self._connection = sqlite.open_prepared(
                lambda: _connect(self.path), lambda connection: connection.executescript(_SCHEMA)
            )
        except sqlite3.Error as exc:
            raise BlockStoreError(f"cannot open the blocks file {self.path!r}: {exc}") from None

    def close(self) -> None:
        """Close the file (further calls raise :class:`BlockStoreError`)."""
        with self._lock:
            self._connection.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with sqlite.transaction(self._connection) as connection:
                    yield connection
            except sqlite3.Error as exc:
                raise BlockStoreError(
                    f"cannot write the blocks file {self.path!r}: {exc}"
                ) from None

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._connection.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise BlockStoreError(f"cannot read the blocks file {self.path!r}: {exc}") from None

    @staticmethod
    def _next_change(connection: sqlite3.Connection) -> int:
        connection.execute("UPDATE meta SET value = value + 1 WHERE key = 'change_id'")
        (change_id,) = connection.execute(
            "SELECT value FROM meta WHERE key = 'change_id'"
        ).fetchone()
        return int(change_id)

    def block(self, block: Block, *, now: float) -> bool:
        """Record ``block``, replacing the address's row unless an existing block wins.

        An operator's block always replaces; an automatic one only when it ends
        later than the block in force (it must never shorten one).

        Returns:
            True when ``block`` is now the one recorded.
        """
        with self._write() as connection:
            row = connection.execute(
                f"SELECT {_COLUMNS} FROM blocks WHERE ip = ?",  # noqa: S608 - constant columns
                (block.ip,),
            ).fetchone()
            if row is not None and row[5] and block.source == "auto":
                current = _block(row)
                if current.active(now) and current.until >= block.until:
                    return False
            change_id = self._next_change(connection)
            connection.execute(
                "INSERT INTO blocks"
                " (ip, until, reason, source, created, active, changed, change_id)"
                " VALUES (?, ?, ?, ?, ?, 1, ?, ?)"
                " ON CONFLICT (ip) DO UPDATE SET until = excluded.until,"
                " reason = excluded.reason, source = excluded.source,"
                " created = excluded.created, active = 1, changed = excluded.changed,"
                " change_id = excluded.change_id",
                (block.ip, block.until, block.reason, block.source, block.created, now, change_id),
            )
        return True

    def unblock(self, ip: str, *, now: float) -> Block | None:
        """Lift the block of ``ip``.

        Returns:
            The block that was in force, or ``None`` when there was none (nothing
            is written then).
        """
        with self._write() as connection:
            row = connection.execute(
                f"SELECT {_COLUMNS} FROM blocks WHERE ip = ? AND active = 1",  # noqa: S608
                (ip,),
            ).fetchone()
            if row is None:
                return None
            previous = _block(row)
            change_id = self._next_change(connection)
            connection.execute(
                "UPDATE blocks SET active = 0, changed = ?, change_id = ? WHERE ip = ?",
                (now, change_id, ip),
            )
        return previous if previous.active(now) else None

    def get(self, ip: str, *, now: float) -> Block | None:
        """The block in force for ``ip`` at ``now``, if any."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM blocks WHERE ip = ? AND active = 1 AND until > ?",  # noqa: S608
            (ip, now),
        )
        return _block(rows[0]) if rows else None

    def active(self, *, now: float) -> list[Block]:
        """Every block in force at ``now``, soonest to end first."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM blocks WHERE active = 1 AND until > ?"  # noqa: S608
            " ORDER BY until, ip",
            (now,),
        )
        return [_block(row) for row in rows]

    def last_change_id(self) -> int:
        """The number of the latest change (0 for a new file)."""
        rows = self._read("SELECT value FROM meta WHERE key = 'change_id'")
        return int(rows[0][0]) if rows else 0

    def changes(self, since: int, *, limit: int = 10_000) -> list[BlockChange]:
        """The current state of every address changed after change ``since``, in order.

        A reader keeps the last ``change_id`` it saw and passes it next time. An
        address changed twice appears once, with its latest state. At most
        ``limit`` rows (the reader asks again from the last one it got).
        """
        rows = self._read(
            f"SELECT {_COLUMNS} FROM blocks WHERE change_id > ?"  # noqa: S608
            " ORDER BY change_id LIMIT ?",
            (since, limit),
        )
        return [BlockChange(int(row[6]), row[0], _block(row) if row[5] else None) for row in rows]

    def prune(self, *, now: float, keep_seconds: float = KEEP_SECONDS) -> int:
        """Delete rows unblocked or expired more than ``keep_seconds`` ago.

        Returns:
            How many rows were deleted.
        """
        cutoff = now - keep_seconds
        with self._write() as connection:
            deleted = connection.execute(
                "DELETE FROM blocks WHERE (active = 0 AND changed < ?) OR until < ?",
                (cutoff, cutoff),
            ).rowcount
        return int(deleted)


def list_active(path: str | Path, *, now: float) -> list[Block]:
    """The blocks in force in the file at ``path``, read-only; none when it is missing.

    Raises:
        BlockStoreError: the file exists but is not a readable blocks file.
    """
    try:
        rows = sqlite.read_rows(
            path,
            f"SELECT {_COLUMNS} FROM blocks WHERE active = 1 AND until > ?"  # noqa: S608
            " ORDER BY until, ip",
            (now,),
        )
    except sqlite3.Error as exc:
        raise BlockStoreError(f"cannot read the blocks file {str(path)!r}: {exc}") from None
    if rows is None:
        return []
    return [_block(row) for row in rows]
