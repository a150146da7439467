"""No test leaves state files in the working directory (run last, see conftest.py).

A node whose audit log, webhook queue or blocks file is not given a path writes it
next to where it was started: tests give every node a temporary directory, and a
forgotten one would litter the checkout (and share state between runs).
"""

from __future__ import annotations

from pathlib import Path

from conftest import STARTING_FILES

_STATE_SUFFIXES = (".sqlite3", ".sqlite3-wal", ".sqlite3-shm", ".sqlite3-journal")


def test_no_state_file_was_left_in_the_working_directory() -> None:
    left = sorted(
        entry.name
        for entry in Path.cwd().iterdir()
        if entry.is_file()
        and entry.name not in STARTING_FILES
        and entry.name.endswith(_STATE_SUFFIXES)
    )
    assert left == [], f"tests wrote state files into {Path.cwd()}: {left}"
