"""SQLite plumbing shared by the stores: connections, write transactions, read-only reads.

Every store file is WAL-journalled (readers never block the writer, and a crash
never corrupts the file) and waits up to :data:`BUSY_SECONDS` for a lock held by
another process, such as the CLI touching a file a node has open.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = ["BUSY_SECONDS", "connect", "read_rows", "transaction"]

#: Seconds to wait for another connection's lock before failing.
BUSY_SECONDS = 5.0


def connect(
    path: str,
    *,
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    read_only: bool = False,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL, or read-only (never creating it).

    ``synchronous``: ``NORMAL`` may lose the last transaction on a power cut, never
    the file; ``FULL`` keeps every committed transaction.
    """
    if read_only:
        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        return sqlite3.connect(
            uri, uri=True, timeout=BUSY_SECONDS, check_same_thread=check_same_thread
        )
    connection = sqlite3.connect(
        path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=check_same_thread
    )
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={synchronous}")
    return connection


@contextlib.contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back if the body raises."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def read_rows(path: str | Path, sql: str, params: Sequence[Any] = ()) -> list[Any] | None:
    """Rows of ``sql`` from the file at ``path`` opened read-only; ``None`` if it is missing.

    Raises:
        sqlite3.Error: the file exists but cannot be read as expected.
    """
    file = Path(path)
    if not file.exists():
        return None
    connection = connect(str(file), read_only=True)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()
