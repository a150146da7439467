"""docs/decisions/0015-front-door.md states the front door's order; the code is held to it.

The route table of a node with every route on (metrics, admin API, dashboard) must
list the routes, their gates and their refusal rules as the decision record's
table does, and the upgrade's gate tuples must list the gates the record names,
in the same order. The tables are Markdown rows whose second cell is a backticked
name.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.api.dashboard import SECURITY_HEADERS
from bastion.api.http import NO_STORE
from bastion.api.routes import FrontDoor
from bastion.config import settings_from_mapping
from bastion.server.runtime import Node
from bastion.server.upgrade import AFTER_101, BEFORE_101

RECORD = Path(__file__).resolve().parents[2] / "docs" / "decisions" / "0015-front-door.md"


def section(heading: str) -> list[list[str]]:
    """The table rows (cells) under ``heading``, up to the next heading of its level."""
    text = RECORD.read_text(encoding="utf-8")
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    end = text.find("\n" + level + " ", start + len(heading))
    rows = []
    for line in text[start : end if end >= 0 else None].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1 and cells[1].startswith("`"):
            rows.append(cells)
    return rows


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


@pytest.fixture
def door() -> Iterator[FrontDoor]:
    loop = asyncio.new_event_loop()
    settings = settings_from_mapping(
        {
            "audit": {"enabled": False},
            "admin": {"token": "order-admin-token-0123456789abcdefghijk"},
            "apps": [{"id": "1", "key": "k", "secret": "s"}],
        },
        environ={},
    )
    try:
        node = Node(settings, loop)
        assert isinstance(node.ctx.door, FrontDoor)
        yield node.ctx.door
    finally:
        loop.close()


def test_the_route_table_is_the_one_the_record_states(door: FrontDoor) -> None:
    rows = section("### The route table")
    assert [names(row[1])[0] for row in rows] == [route.name for route in door.routes]
    for row, route in zip(rows, door.routes, strict=True):
        assert names(row[3]) == [gate.name for gate in route.gates], route.name
        on_refusal = row[4]
        assert ("spends the address bucket" in on_refusal) is route.refusals_spend_bucket
        assert ("no-store" in on_refusal) is (route.refusal_headers == NO_STORE)
        assert ("security headers" in on_refusal) is (route.refusal_headers == SECURITY_HEADERS)


def test_the_upgrade_gates_are_the_ones_the_record_states() -> None:
    before, after = section("### The upgrade's gates")[:7], section("### The upgrade's gates")[7:]
    assert [names(row[1])[0] for row in before] == [gate.__name__ for gate in BEFORE_101]
    assert [names(row[1])[0] for row in after] == [check.__name__ for check in AFTER_101]
