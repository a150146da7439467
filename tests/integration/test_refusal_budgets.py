"""Refusals are not free (issue #11, item 1): budgets per connection, a bounded trail.

On a real node over real sockets:

* the message budget (``max_messages_per_second``) covers every frame a client
  sends, before it is decoded; past it, ``pusher:error`` 4301 ``message_rate``;
* the refusal budget (``refusals_per_connection``) closes a connection whose
  frames keep being refused with 4100 ``refusal_limit``;
* a flood of refused frames from one address writes a bounded number of audit
  rows and log lines (with exact counts), gets the address blocked, and cannot
  push other addresses' older rows out of the audit log.

The flooding address is named by ``X-Forwarded-For`` through ``trusted_proxies``
(loopback itself is in ``never_block``). Waits are bounded by :mod:`.timeouts`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    DEFAULT_QUERY,
    OTHER_APP_ID,
    OTHER_APP_KEY,
    OTHER_APP_SECRET,
    RawFrame,
    RawWebSocket,
    build_frame,
)
from support.timeouts import scaled, within

from bastion.config import settings_from_mapping
from bastion.security.audit import AuditEvent
from bastion.server.runtime import Node
from bastion.store.audit import AuditLog, query

from .conftest import TEST_SECURITY, LogCheck, MakeNode, RunNode

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
PATH = f"/app/{APP_KEY}?{DEFAULT_QUERY}"
PING = json.dumps({"event": "pusher:ping", "data": {}}).encode()
#: Refused on arrival: neither a system event nor a ``client-`` name.
BAD = b'{"event":"x"}'


def text_frames(payload: bytes, count: int) -> bytes:
    return b"".join(build_frame(OP_TEXT, payload) for _ in range(count))


def events(frames: list[RawFrame]) -> list[Any]:
    return [frame.json() for frame in frames if frame.opcode == OP_TEXT]


def codes(frames: list[RawFrame], event: str) -> list[int | None]:
    return [message["data"].get("code") for message in events(frames) if message["event"] == event]


async def test_a_burst_of_pings_is_answered_only_up_to_the_message_burst(
    make_node: MakeNode,
) -> None:
    node = await make_node()  # defaults: 50 messages/s, burst 100 (105: see below); 20 refusals
    # The burst in force fits a reconnect to every channel: 100 channels + 5.
    burst = node.settings.apps[0].message_burst
    assert burst == 105
    raw = await RawWebSocket.open(node.port)
    started = time.monotonic()
    raw.write(text_frames(PING, 2000))  # one burst: 2,000 pings
    code, frames = await raw.read_close()
    elapsed = time.monotonic() - started
    answered = [message for message in events(frames) if message["event"] == "pusher:pong"]
    # At most the burst, plus what the bucket refilled while the burst was read.
    assert burst <= len(answered) <= burst + math.ceil(50 * elapsed)
    rate_errors = codes(frames, "pusher:error")
    assert rate_errors[:-1] == [4301] * (len(rate_errors) - 1)
    assert 20 <= len(rate_errors) - 1 <= 20 + math.ceil(0.2 * elapsed)
    assert rate_errors[-1] == 4100 and code == 4100  # closed: refusal_limit
    assert node.metrics.refusals[("refusal_limit", APP_ID)] == 1
    assert node.metrics.refusals[("message_rate", APP_ID)] == len(rate_errors)
    await raw.close()


async def test_every_kind_of_frame_spends_the_message_budget(make_node: MakeNode) -> None:
    # The burst in force is never below a reconnect's frames (channel cap + 5).
    node = await make_node(
        app={
            "max_messages_per_second": {"rate": 0.001, "burst": 6},
            "max_channels_per_connection": 1,
        }
    )
    raw = await RawWebSocket.open(node.port)
    subscribe = {"event": "pusher:subscribe", "data": {"channel": "a"}}
    raw.send_text(PING)  # 1
    raw.send_text(json.dumps(subscribe))  # 2
    raw.send_text(json.dumps({"event": "pusher:unsubscribe", "data": {"channel": "a"}}))  # 3
    raw.send_frame(OP_PING, b"ws")  # 4: a WebSocket ping (the library answers it)
    raw.send_text(BAD)  # 5: refused, 4300
    raw.send_frame(OP_TEXT, PING[:10], fin=False)  # 6: a fragment counts ...
    raw.send_frame(OP_CONT, PING[10:])  # ... and so does the next: over the budget
    raw.send_frame(OP_PONG, b"")  # over the budget too
    raw.send_text(PING)
    seen = [await raw.read_frame() for _ in range(7)]
    # The WebSocket pong may come before or after the text frames read with its ping.
    assert [frame.opcode for frame in seen].count(OP_PONG) == 1
    answers = events(seen)
    assert [message["event"] for message in answers] == [
        "pusher:pong",
        "pusher_internal:subscription_succeeded",
        *["pusher:error"] * 4,
    ]
    assert [message["data"]["code"] for message in answers[2:]] == [4300, 4301, 4301, 4301]
    assert node.metrics.refusals[("message_rate", APP_ID)] == 3
    assert node.metrics.messages_in[APP_ID] == 4  # the dropped ones were never decoded
    await raw.close()


async def test_a_connection_whose_frames_keep_being_refused_is_closed(
    make_node: MakeNode,
) -> None:
    node = await make_node()
    raw = await RawWebSocket.open(node.port)
    raw.write(text_frames(BAD, 30))
    code, frames = await raw.read_close()
    errors = codes(frames, "pusher:error")
    # Twenty refusals are answered; the next one is answered with the close.
    assert errors == [4300] * 20 + [4100] and code == 4100
    last = events(frames)[-1]["data"]["message"]
    assert "Too many refused messages" in last
    assert node.metrics.refusals[("client_event_name", APP_ID)] == 21
    assert node.metrics.refusals[("refusal_limit", APP_ID)] == 1

    # The budget is the app's setting; the other app keeps the default.
    small = await make_node(app={"refusals_per_connection": {"rate": 0.001, "burst": 3}})
    raw = await RawWebSocket.open(small.port)
    raw.write(text_frames(BAD, 10))
    code, frames = await raw.read_close()
    assert codes(frames, "pusher:error") == [4300] * 3 + [4100] and code == 4100
    other = await RawWebSocket.open(small.port, f"/app/{OTHER_APP_KEY}?{DEFAULT_QUERY}")
    other.write(text_frames(BAD, 5))
    for _ in range(5):
        assert (await other.read_json())["data"]["code"] == 4300
    await raw.close()
    await other.close()


# --- a flood from one address ----------------------------------------------------------

ATTACKER = "203.0.113.7"
DAY = 86_400.0


def old_row(n: int, *, type: str, ip: str, age: float, severity: str = "warning") -> AuditEvent:
    return AuditEvent(
        id=f"old{n:029d}",
        time=time.time() - age,
        type=type,
        severity=severity,  # type: ignore[arg-type]
        ip=ip,
        app_id=APP_ID,
        socket_id=None,
        user_id=None,
        message=f"an earlier {type}",
    )


def flood_settings(tmp_path: Path, max_rows: int) -> Any:
    return settings_from_mapping(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "audit": {"path": str(tmp_path / "audit.sqlite3"), "max_rows": max_rows},
            "security": {
                **TEST_SECURITY,
                "trusted_proxies": ["127.0.0.1/32"],
                "reputation": {"store_path": str(tmp_path / "blocks.sqlite3")},
            },
            "apps": [
                {"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET},
                {"id": OTHER_APP_ID, "key": OTHER_APP_KEY, "secret": OTHER_APP_SECRET},
            ],
        },
        environ={},
    )


async def flood(node: Node, frames_per_connection: int) -> tuple[int, int]:
    """Connect as ATTACKER and flood until refused at the handshake; (connections, frames)."""
    for connections in range(10):
        raw = await RawWebSocket.connect(node.port)
        status, _ = await raw.handshake(PATH, extra_headers=[f"X-Forwarded-For: {ATTACKER}"])
        if status != 101:
            assert status == 403  # blocked (a trusted proxy names the address)
            await raw.close()
            return connections, frames_per_connection * connections
        assert (await raw.read_json())["event"] == "pusher:connection_established"
        raw.write(text_frames(BAD, frames_per_connection))
        code, _ = await raw.read_close()
        assert code in (4100, 1006)  # refusal_limit, or blocked meanwhile (also 4100)
        await raw.close()
    raise AssertionError("the flooding address was never blocked")


async def test_a_flood_of_refused_frames_leaves_a_bounded_trail_and_blocks_the_address(
    tmp_path: Path, run_node: RunNode, logs: LogCheck
) -> None:
    db = tmp_path / "audit.sqlite3"
    # Earlier evidence: other addresses' warnings, and the attacker's own older rows.
    earlier = AuditLog(str(db))
    kept = [
        old_row(1, type="ip_blocked_auto", ip="198.51.100.9", age=3 * DAY),
        old_row(2, type="auth_signature", ip="198.51.100.10", age=2 * DAY),
        old_row(3, type="subscribe_auth_invalid", ip="198.51.100.11", age=DAY),
    ]
    own = [old_row(10 + n, type="malformed_json", ip=ATTACKER, age=DAY + n) for n in range(40)]
    for row in [*kept, *own]:
        earlier.record(row)
    assert earlier.close(scaled(10))
    max_rows = 40

    node = await run_node(flood_settings(tmp_path, max_rows))
    connections, sent = await within(flood(node, 1000), 30)  # 1,000 bad frames a connection
    assert connections <= 4  # 31 points a connection (21 refusals + refusal_limit) vs 100
    refused = node.metrics.refusals[("client_event_name", APP_ID)]
    assert 21 * (connections - 1) < refused <= 21 * connections
    await node.stop()  # writes the open aggregates and flushes the audit log

    rows = query(db, ip=ATTACKER, limit=10_000)
    new = [row for row in rows if not row.id.startswith("old")]
    assert len(new) <= 8, [(row.type, row.metadata.get("count")) for row in new]
    by_type: dict[str, int] = {}
    for row in new:
        count = row.metadata.get("count", 1)
        assert isinstance(count, int)
        by_type[row.type] = by_type.get(row.type, 0) + count
    # Aggregated, yet exact: every refusal is counted in the audit log.
    assert by_type["client_event_name"] == refused
    assert by_type["refusal_limit"] == node.metrics.refusals[("refusal_limit", APP_ID)]
    assert by_type["ip_blocked_auto"] == 1
    lines = [r for r in logs.caplog.records if r.name == "bastion.refusals"]
    assert len([r for r in lines if f"ip={ATTACKER} " in r.getMessage()]) <= 8
    assert sent == 1000 * connections and sent > 20 * len(new)

    # The next start prunes to max_rows: the attacker's rows make room, nobody else's.
    AuditLog.from_settings(node.settings.audit).close(scaled(10))
    remaining = query(db, limit=10_000)
    assert len(remaining) <= max_rows
    ids = {row.id for row in remaining}
    assert {row.id for row in kept} <= ids
    assert any(row.type == "ip_blocked_auto" and row.ip == ATTACKER for row in remaining)
    logs.assert_clean()
