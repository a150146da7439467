"""Opening a file other processes open at the same moment: retried while SQLite says locked."""

from __future__ import annotations

import sqlite3

import pytest

from bastion.store.sqlite import retry_locked


class Clock:
    """A clock the pauses move, so nothing here sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def failing(errors: list[Exception], result: str = "opened"):
    def action() -> str:
        if errors:
            raise errors.pop(0)
        return result

    return action


def test_locked_and_busy_are_tried_again_until_the_open_succeeds() -> None:
    clock = Clock()
    errors: list[Exception] = [
        sqlite3.OperationalError("database is locked"),
        sqlite3.OperationalError("database is busy"),
        sqlite3.OperationalError("database is locked"),
    ]
    assert retry_locked(failing(errors), sleep=clock.sleep, clock=clock) == "opened"
    assert clock.pauses == [0.01, 0.02, 0.04]


def test_any_other_error_is_raised_at_once() -> None:
    clock = Clock()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        retry_locked(
            failing([sqlite3.OperationalError("no such table: x")]), sleep=clock.sleep, clock=clock
        )
    with pytest.raises(sqlite3.DatabaseError):
        retry_locked(
            failing([sqlite3.DatabaseError("file is not a database")]),
            sleep=clock.sleep,
            clock=clock,
        )
    assert clock.pauses == []


def test_a_lock_that_outlasts_the_bound_is_raised() -> None:
    clock = Clock()
    errors = [sqlite3.OperationalError("database is locked") for _ in range(1000)]
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        retry_locked(failing(errors), seconds=1.0, sleep=clock.sleep, clock=clock)
    assert 1.0 <= clock.now < 1.0 + 0.2 + 1e-9
    assert max(clock.pauses) == 0.2
