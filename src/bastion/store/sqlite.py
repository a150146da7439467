"""SQLite plumbing shared by the stores: connections, write transactions, read-only reads.

Every store file is WAL-journalled (readers never block the writer, and a crash
never corrupts the file) and waits up to :data:`BUSY_SECONDS` for a lock held by
another process, such as the CLI touching a file a node has open.

The files hold IP addresses, user ids, channel names and webhook bodies, so they
are owner-only (:data:`FILE_MODE`, ``0600``): a writable open creates a missing
file with that mode whatever the umask, and SQLite gives the ``-wal``, ``-shm``
and ``-journal`` files it creates later the database file's mode. A file that
already exists with group or other permission bits (made by an older version,
or by hand) is tightened, with its journal files, when this process owns it;
otherwise it is left alone and a warning is logged once per file. Neither ever
stops the open. Read-only opens create and change nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

__all__ = [
    "BUSY_SECONDS",
    "FILE_MODE",
    "connect",
    "open_prepared",
    "read_rows",
    "retry_locked",
    "transaction",
]

_T = TypeVar("_T")

log = logging.getLogger("bastion.store")

#: Seconds to wait for another connection's lock before failing.
BUSY_SECONDS = 5.0
#: Permission bits of every store file and its journal files: owner read/write.
FILE_MODE: Final = 0o600
#: The files SQLite keeps beside a database.
_JOURNAL_SUFFIXES: Final = ("-wal", "-shm", "-journal")
#: Files already warned about (wide, and someone else's): once per file per process.
_warned: set[str] = set()
_warned_lock = threading.Lock()


def _private_files(path: str) -> None:
    """Create ``path`` owner-only when missing; tighten it and its journal files.

    Never raises: a path SQLite cannot open either is left for :func:`sqlite3.connect`
    to report, and a file whose mode cannot be changed only costs a warning.
    """
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        pass
    except OSError:
        return
    else:
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits from the owner too
        finally:
            os.close(fd)
    tightened: list[str] = []
    left: list[str] = []
    for name in (path, *(path + suffix for suffix in _JOURNAL_SUFFIXES)):
        outcome = _tighten(name)
        if outcome is not None:
            done, note = outcome
            (tightened if done else left).append(f"{name} ({note})")
    if tightened:
        log.info("store files made owner-only (%04o): %s", FILE_MODE, "; ".join(tightened))
    if left:
        with _warned_lock:
            if path in _warned:
                return
            _warned.add(path)
        log.warning(
            "store files readable beyond their owner, left as they are: %s; make them %04o",
            "; ".join(left),
            FILE_MODE,
        )


def _tighten(name: str) -> tuple[bool, str] | None:
    """Drop group and other bits from ``name`` if this process owns it.

    Returns:
        ``None`` when there was nothing to do, else whether the file was tightened
        and a note naming its former mode (and, when left alone, why).
    """
    try:
        info = os.stat(name)
    except OSError:
        return None  # absent (journal files come and go), or not ours to look at
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISREG(info.st_mode) or not mode & 0o077:
        return None
    if info.st_uid != os.geteuid():
        return False, f"mode {mode:04o}, owned by uid {info.st_uid}, not by this process"
    try:
        os.chmod(name, mode & 0o700)
    except OSError as error:
        return False, f"mode {mode:04o}, cannot change it: {error.strerror}"
    return True, f"was {mode:04o}"


def retry_locked(
    action: Callable[[], _T],
    *,
    seconds: float = BUSY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> _T:
    """Run ``action``; while SQLite answers "locked" or "busy", again after a pause.

    For opening a file that other processes open at the same moment (the workers of
    ``bastion serve --workers N`` start together): SQLite does not call its busy
    handler for every lock it meets while a new file is set up (the switch to WAL,
    the first schema), so two openers can see "database is locked" at once. Any
    other error is raised at once; after ``seconds`` the last one is.
    """
    deadline = clock() + seconds
    pause = 0.01
    while True:
        try:
            return action()
        except sqlite3.OperationalError as error:
            text = str(error)
            if ("locked" not in text and "busy" not in text) or clock() >= deadline:
                raise
        sleep(pause)
        pause = min(pause * 2, 0.2)


def open_prepared(
    open_file: Callable[[], sqlite3.Connection],
    prepare: Callable[[sqlite3.Connection], object],
) -> sqlite3.Connection:
    """Open a file and ``prepare`` it (schema, migration), retried while it is locked.

    The connection is closed if preparing fails; see :func:`retry_locked` for why
    opening is retried (the workers of one node open the same files at once).
    """

    def attempt() -> sqlite3.Connection:
        connection = open_file()
        try:
            prepare(connection)
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    return retry_locked(attempt)


def connect(
    path: str,
    *,
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    read_only: bool = False,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL, or read-only (never creating it).

    A writable open makes the file and its journal files owner-only first (see the
    module docstring).

    ``synchronous``: ``NORMAL`` may lose the last transaction on a power cut, never
    the file; ``FULL`` keeps every committed transaction.
    """
    if read_only:
        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        return sqlite3.connect(
            uri, uri=True, timeout=BUSY_SECONDS, check_same_thread=check_same_thread
        )
    _private_files(path)
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
