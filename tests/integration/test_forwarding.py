"""``[security] forwarded_header``: the one header a trusted proxy names the client in.

Every test connects from 127.0.0.1, trusted as a proxy; the headers it sends play
the proxy's (and the client's) part.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from support.clients import APP_KEY, DEFAULT_QUERY, RawWebSocket
from support.timeouts import within

from bastion.server.refusals import RefusalRecord
from bastion.server.runtime import Node

from .conftest import MakeNode

TRUST_LOOPBACK = {"trusted_proxies": ["127.0.0.1/32"]}
PATH = f"/app/{APP_KEY}?{DEFAULT_QUERY}"


def capture(node: Node) -> list[RefusalRecord]:
    records: list[RefusalRecord] = []
    node.refusals.listeners.append(records.append)
    return records


def xff(address: str) -> list[str]:
    return [f"X-Forwarded-For: {address}"]


async def upgrade_status(
    port: int, sockets: list[RawWebSocket], path: str, headers: Sequence[str] = ()
) -> tuple[int, dict[str, Any] | None]:
    """The status of one handshake, and the JSON body of a refusal."""
    raw = await RawWebSocket.connect(port)
    sockets.append(raw)
    status, head = await raw.handshake(path, extra_headers=headers)
    if status == 101:
        return status, None
    body = await within(raw.reader.readexactly(int(head.get("content-length", "0"))))
    return status, json.loads(body)


async def test_behind_an_rfc_7239_proxy_a_client_written_xff_changes_nothing(
    make_node: MakeNode, raw_sockets: list[RawWebSocket]
) -> None:
    node = await make_node(
        security={
            "max_connections_per_ip": 1,
            "forwarded_header": "forwarded",
            **TRUST_LOOPBACK,
        }
    )
    records = capture(node)
    # The proxy sets Forwarded; the client adds an X-Forwarded-For of its choice each time.
    first = ["Forwarded: for=198.51.100.30", "X-Forwarded-For: 192.0.2.1"]
    assert (await upgrade_status(node.port, raw_sockets, PATH, first))[0] == 101
    second = ["Forwarded: for=198.51.100.30", "X-Forwarded-For: 192.0.2.2"]
    status, body = await upgrade_status(node.port, raw_sockets, PATH, second)
    assert (status, body and body["reason"]) == (429, "ip_connection_limit")
    # The refusal (and its reputation points) went to the client, not to a victim it named.
    assert [(r.reason.value.slug, r.ip) for r in records] == [
        ("ip_connection_limit", "198.51.100.30")
    ]
    assert node.ctx.admission.connections.count("192.0.2.1") == 0


async def test_by_default_a_forwarded_header_is_not_read(
    make_node: MakeNode, raw_sockets: list[RawWebSocket]
) -> None:
    node = await make_node(security={"max_connections_per_ip": 1, **TRUST_LOOPBACK})
    # Only X-Forwarded-For names the client: a Forwarded header buys no slot of its own.
    assert (await upgrade_status(node.port, raw_sockets, PATH))[0] == 101
    claim = ["Forwarded: for=198.51.100.31"]
    status, body = await upgrade_status(node.port, raw_sockets, PATH, claim)
    assert (status, body and body["reason"]) == (429, "ip_connection_limit")
    assert node.ctx.admission.connections.count("198.51.100.31") == 0
    named = await upgrade_status(node.port, raw_sockets, PATH, xff("198.51.100.31"))
    assert named[0] == 101


async def test_the_forwarding_header_changes_on_a_live_reload(
    make_node: MakeNode, raw_sockets: list[RawWebSocket]
) -> None:
    node = await make_node(security={"max_connections_per_ip": 1, **TRUST_LOOPBACK})
    security = node.settings.security.model_copy(update={"forwarded_header": "forwarded"})
    assert node.apply_config(node.settings.model_copy(update={"security": security})).changed
    assert (await upgrade_status(node.port, raw_sockets, PATH))[0] == 101
    # The loopback proxy holds its one slot; the client Forwarded names has its own.
    named = ["Forwarded: for=198.51.100.32", "X-Forwarded-For: 198.51.100.33"]
    assert (await upgrade_status(node.port, raw_sockets, PATH, named))[0] == 101
    assert node.ctx.admission.connections.count("198.51.100.32") == 1
