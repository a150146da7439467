"""Per-address admission and HTTP limits on a real node (issue #3, items 2 and 3).

Every test connects from 127.0.0.1; other client addresses are named by
``X-Forwarded-For`` through ``trusted_proxies = ["127.0.0.1/32"]``. Limits are
small with a negligible refill rate, so what is allowed is decided by counts,
never by timing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import pytest
from support.clients import (
    APP_ID,
    APP_KEY,
    DEFAULT_QUERY,
    OTHER_APP_ID,
    OTHER_APP_KEY,
    OTHER_APP_SECRET,
    RawWebSocket,
    hmac_hex,
    http_request,
    open_client,
    rest,
    signed_target,
)
from support.timeouts import DEFAULT_WAIT, within

from bastion.security.admission import ConnectionCounter
from bastion.server.refusals import RefusalRecord
from bastion.server.runtime import Node

from .conftest import Connect, LogCheck, MakeNode

PATH = f"/app/{APP_KEY}?{DEFAULT_QUERY}"
SLOW = 0.001  # tokens per second: nothing refills during a test
TRUST_LOOPBACK = {"trusted_proxies": ["127.0.0.1/32"]}
#: ``[security.reputation]`` without the default loopback exemption.
NO_EXEMPT = {"never_block": []}
CHANNELS = f"/apps/{APP_ID}/channels"


class Upgrade:
    """The answer to one handshake: status, headers, body (non-101), the socket."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, raw: RawWebSocket):
        self.status = status
        self.headers = headers
        self.body = body
        self.raw = raw

    def json(self) -> Any:
        return json.loads(self.body)


async def upgrade(
    port: int,
    sockets: list[RawWebSocket],
    path: str = PATH,
    headers: Sequence[str] = (),
) -> Upgrade:
    """Send one upgrade request; read the 101's first frame or the refusal's body."""
    raw = await RawWebSocket.connect(port)
    sockets.append(raw)
    status, head = await raw.handshake(path, extra_headers=headers)
    body = b""
    if status == 101:
        first = await raw.read_json()
        assert first["event"] == "pusher:connection_established", first
    else:
        body = await within(raw.reader.readexactly(int(head.get("content-length", "0"))))
    return Upgrade(status, head, body, raw)


def xff(address: str) -> list[str]:
    return [f"X-Forwarded-For: {address}"]


def assert_429(answer: Any, slug: str, *, at_least: int = 1) -> None:
    """A 429 with the JSON error body and an integer Retry-After >= ``at_least``."""
    assert answer.status == 429, (answer.status, answer.body)
    assert answer.json()["reason"] == slug
    retry_after = answer.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= at_least


def capture(node: Node) -> list[RefusalRecord]:
    records: list[RefusalRecord] = []
    node.refusals.listeners.append(records.append)
    return records


class WatchedCounter(ConnectionCounter):
    """The node's per-address counter, telling the test each time a slot is released."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.released = asyncio.Event()

    def release(self, ip: str) -> None:
        super().release(ip)
        self.released.set()


def watch(node: Node) -> WatchedCounter:
    """Swap in a watched counter (before any connection is admitted)."""
    counter = WatchedCounter(node.ctx.admission.connections.limit)
    node.ctx.admission.connections = counter
    return counter


async def until_held(counter: WatchedCounter, count: int, ip: str = "127.0.0.1") -> None:
    """Wait (bounded) until ``ip`` holds ``count`` slots: the client cannot see a release."""

    async def wait() -> None:
        while counter.count(ip) != count:
            counter.released.clear()
            await counter.released.wait()

    await within(wait(), DEFAULT_WAIT)


def held(node: Node, ip: str = "127.0.0.1") -> int:
    return node.ctx.admission.connections.count(ip)


# --- WebSocket admission ----------------------------------------------------------------


async def test_concurrent_cap_per_address_and_release_on_close(
    make_node: MakeNode, raw_sockets: list[RawWebSocket], logs: LogCheck
) -> None:
    node = await make_node(security={"max_connections_per_ip": 3})
    counter = watch(node)
    records = capture(node)
    opened = [await upgrade(node.port, raw_sockets) for _ in range(3)]
    assert [answer.status for answer in opened] == [101] * 3
    refused = await upgrade(node.port, raw_sockets)
    assert_429(refused, "ip_connection_limit")
    assert [(r.reason.value.slug, r.ip, r.app_id) for r in records] == [
        ("ip_connection_limit", "127.0.0.1", APP_ID)
    ]
    # A clean close frees the slot: the server's close (EOF) comes after it let go.
    await opened[0].raw.close()
    await until_held(counter, 2)
    assert (await upgrade(node.port, raw_sockets)).status == 101
    # So does a client that just vanishes.
    opened[1].raw.writer.transport.abort()
    await until_held(counter, 2)
    assert (await upgrade(node.port, raw_sockets)).status == 101
    logs.assert_refusal_logged("ip_connection_limit")
    logs.assert_clean()


async def test_upgrade_refused_after_the_101_gives_its_slot_back(
    make_node: MakeNode, raw_sockets: list[RawWebSocket]
) -> None:
    node = await make_node(security={"max_connections_per_ip": 1})
    counter = watch(node)
    for path in ("/app/no-such-key?protocol=7", f"/app/{APP_KEY}?protocol=99"):
        raw = await RawWebSocket.connect(node.port)
        raw_sockets.append(raw)
        status, _ = await raw.handshake(path)
        assert status == 101
        code, _ = await raw.read_close()
        assert code in (4001, 4007)
        await raw.read_eof()
        await until_held(counter, 0)
    # A handshake the WebSocket library refuses (no key) after admission, too.
    answer = await http_request(
        node.port, "GET", PATH, headers=["Upgrade: websocket", "Connection: Upgrade"]
    )
    assert answer.status == 400
    await until_held(counter, 0)
    assert (await upgrade(node.port, raw_sockets)).status == 101
    assert held(node) == 1


async def test_new_connection_burst_then_429_with_retry_after(
    make_node: MakeNode, raw_sockets: list[RawWebSocket], connect: Connect
) -> None:
    node = await make_node(
        security={"new_connections_per_ip": {"rate": SLOW, "burst": 3}, **TRUST_LOOPBACK}
    )
    counter = watch(node)
    for _ in range(3):
        answer = await upgrade(node.port, raw_sockets)
        assert answer.status == 101
        await answer.raw.close()
    refused = await upgrade(node.port, raw_sockets)
    # Retry-After is the bucket's real wait: one token at 0.001/s.
    assert_429(refused, "connection_rate", at_least=900)
    # Closing connections does not give new-connection tokens back.
    await until_held(counter, 0)
    assert (await upgrade(node.port, raw_sockets)).status == 429
    # Another client behind the trusted proxy has its own bucket.
    assert (await upgrade(node.port, raw_sockets, headers=xff("198.51.100.7"))).status == 101


async def test_trusted_proxy_gives_each_forwarded_address_its_own_cap(
    make_node: MakeNode, raw_sockets: list[RawWebSocket]
) -> None:
    node = await make_node(security={"max_connections_per_ip": 1, **TRUST_LOOPBACK})
    records = capture(node)
    assert (await upgrade(node.port, raw_sockets, headers=xff("198.51.100.1"))).status == 101
    assert_429(
        await upgrade(node.port, raw_sockets, headers=xff("198.51.100.1")), "ip_connection_limit"
    )
    assert (await upgrade(node.port, raw_sockets, headers=xff("198.51.100.2"))).status == 101
    assert (await upgrade(node.port, raw_sockets)).status == 101  # the proxy itself
    assert held(node, "198.51.100.1") == held(node, "198.51.100.2") == 1
    assert [r.ip for r in records] == ["198.51.100.1"]


async def test_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    make_node: MakeNode, raw_sockets: list[RawWebSocket], logs: LogCheck
) -> None:
    node = await make_node(
        security={
            "max_connections_per_ip": 1,
            "rest_requests_per_ip": {"rate": SLOW, "burst": 1},
        }
    )
    records = capture(node)
    first = await upgrade(node.port, raw_sockets, headers=xff("198.51.100.1"))
    assert first.status == 101
    spoofed = ["X-Forwarded-For: 198.51.100.2", "Forwarded: for=198.51.100.3"]
    assert_429(await upgrade(node.port, raw_sockets, headers=spoofed), "ip_connection_limit")
    assert held(node) == 1 and len(node.ctx.admission.connections) == 1
    assert (await http_request(node.port, "GET", CHANNELS, headers=xff("198.51.100.4"))).status
    assert_429(
        await http_request(node.port, "GET", CHANNELS, headers=xff("198.51.100.5")),
        "ip_rate_limited",
    )
    assert {r.ip for r in records} == {"127.0.0.1"}
    for slug in ("ip_connection_limit", "ip_rate_limited"):
        assert all("ip=127.0.0.1 " in r.getMessage() for r in logs.refusals(slug))


async def test_query_token_refused_before_the_upgrade_unless_allowed(
    make_node: MakeNode, raw_sockets: list[RawWebSocket], logs: LogCheck
) -> None:
    secret_token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2VjcmV0LXNpZ25hdHVyZQ"
    node = await make_node(
        extra_apps=(
            {
                "id": "jwt-app",
                "key": "jwt-key",
                "secret": "jwt-secret",
                "jwt": {
                    "algorithms": ["HS256"],
                    "secret": "a-long-enough-shared-jwt-secret-0123456789",
                    "allow_query_token": True,
                },
            },
        )
    )
    records = capture(node)
    refused = await upgrade(node.port, raw_sockets, path=f"{PATH}&token={secret_token}")
    assert refused.status == 400
    assert refused.json()["reason"] == "query_token_refused"
    assert [(r.reason.value.slug, r.app_id) for r in records] == [("query_token_refused", APP_ID)]
    # Refused before admission: no slot was taken.
    assert held(node) == 0
    allowed = await upgrade(
        node.port, raw_sockets, path=f"/app/jwt-key?{DEFAULT_QUERY}&token={secret_token}"
    )
    assert allowed.status == 101
    # A blank token is no token.
    assert (await upgrade(node.port, raw_sockets, path=f"{PATH}&token=")).status == 101
    assert all(secret_token not in record.getMessage() for record in logs.caplog.records)
    logs.assert_clean()


# --- HTTP limits ---------------------------------------------------------------------------


async def test_rest_flood_from_one_address_gets_429_and_health_stays_open(
    make_node: MakeNode, logs: LogCheck
) -> None:
    node = await make_node(security={"rest_requests_per_ip": {"rate": SLOW, "burst": 3}})
    records = capture(node)
    for _ in range(3):
        assert (await rest(node.port, "GET", CHANNELS)).status == 200
    limited = await rest(node.port, "GET", CHANNELS)
    assert_429(limited, "ip_rate_limited", at_least=900)
    # Counted before routing and signature: even nonsense is refused the same way.
    assert (await http_request(node.port, "GET", "/nowhere")).status == 429
    for path in ("/", "/up", "/healthz"):
        assert (await http_request(node.port, "GET", path)).status == 200
    assert [(r.reason.value.slug, r.ip) for r in records] == [
        ("ip_rate_limited", "127.0.0.1"),
        ("ip_rate_limited", "127.0.0.1"),
    ]
    assert records[0].app_id == APP_ID
    logs.assert_clean()


async def test_per_app_rest_limit_counts_only_verified_calls(make_node: MakeNode) -> None:
    node = await make_node(app={"rest_requests": {"rate": SLOW, "burst": 2}})
    bad = await rest(node.port, "GET", CHANNELS, secret="wrong-secret")
    assert bad.status == 401  # did not spend the app's budget
    assert (await rest(node.port, "GET", CHANNELS)).status == 200
    assert (await rest(node.port, "POST", f"/apps/{APP_ID}/events", _event())).status == 200
    limited = await rest(node.port, "GET", CHANNELS)
    assert_429(limited, "app_rate_limited", at_least=900)
    other = await rest(
        node.port, "GET", f"/apps/{OTHER_APP_ID}/channels", key=OTHER_APP_KEY,
        secret=OTHER_APP_SECRET,
    )  # fmt: skip
    assert other.status == 200


def _event() -> dict[str, Any]:
    return {"name": "e", "channel": "c", "data": "{}"}


async def test_bad_rest_signatures_lock_the_address_out_until_refill(
    make_node: MakeNode, raw_sockets: list[RawWebSocket], logs: LogCheck
) -> None:
    node = await make_node(
        security={"auth_failures_per_ip": {"rate": SLOW, "burst": 3}, **TRUST_LOOPBACK}
    )
    records = capture(node)
    guesser = xff("198.51.100.8")

    async def call(**signing: Any) -> Any:
        target = signed_target("GET", CHANNELS, **signing)
        return await http_request(node.port, "GET", target, headers=guesser)

    failures = [
        await call(secret="guess"),
        await call(timestamp=time.time() - 3600),
        await http_request(node.port, "GET", CHANNELS, headers=guesser),  # auth_missing
    ]
    assert [answer.status for answer in failures] == [401, 401, 401]
    # Spent: even a correct signature waits...
    assert_429(await call(), "auth_failure_limit", at_least=900)
    # ...but connecting is no authentication attempt: the address still connects.
    assert (await upgrade(node.port, raw_sockets, headers=guesser)).status == 101
    # Health checks and other addresses are not affected.
    assert (await http_request(node.port, "GET", "/up", headers=guesser)).status == 200
    assert (await rest(node.port, "GET", CHANNELS)).status == 200
    slugs = [r.reason.value.slug for r in records]
    assert slugs == ["auth_signature", "auth_timestamp", "auth_missing", "auth_failure_limit"]
    # Refill is the only way out: move the bucket's clock forward instead of waiting.
    assert node.ctx.auth_failures.peek("198.51.100.8", time.time() + 1001) == 0.0
    logs.assert_refusal_logged("auth_failure_limit")


async def test_websocket_auth_failures_past_the_budget_close_with_4100(
    make_node: MakeNode, raw_sockets: list[RawWebSocket]
) -> None:
    # Loopback is out of never_block here, so the test's own address has a budget.
    node = await make_node(
        security={"auth_failures_per_ip": {"rate": SLOW, "burst": 2}, "reputation": NO_EXEMPT}
    )
    client = await open_client(node.port)
    bad_auth = f"{APP_KEY}:{hmac_hex('not-the-secret', 'x')}"
    for index in range(2):
        reply = await client.subscribe(f"private-guess-{index}", auth=bad_auth)
        assert reply["event"] == "pusher:subscription_error", reply
    # A missing auth is a client bug, not a guess: it spends nothing.
    reply = await client.subscribe("private-no-auth")
    assert reply["event"] == "pusher:subscription_error"
    await client.barrier()
    # The budget is spent: the next attempt closes the connection (reconnect with back-off).
    await client.send(
        {"event": "pusher:subscribe", "data": {"channel": "private-guess-3", "auth": bad_auth}}
    )
    closed = await client.closed()
    assert closed.code == 4100
    assert closed.frames[-1]["event"] == "pusher:error"
    assert closed.frames[-1]["data"]["code"] == 4100
    # The address may still connect; its authentication attempts wait for the refill.
    assert (await upgrade(node.port, raw_sockets)).status == 101


# --- blocked addresses ------------------------------------------------------------------------


class FakeBlockList:
    """A blocklist that blocks the given addresses and remembers what it was asked."""

    def __init__(self, *blocked: str) -> None:
        self.blocked = set(blocked)
        self.asked: list[str] = []

    def check(self, ip: str, now: float) -> bool:
        self.asked.append(ip)
        return ip in self.blocked


async def test_blocked_peer_is_dropped_at_accept_without_an_answer(make_node: MakeNode) -> None:
    node = await make_node()
    node.ctx.blocklist = FakeBlockList("127.0.0.1")
    records = capture(node)
    raw = await RawWebSocket.connect(node.port)
    try:
        assert await raw.read_eof() == b""
    finally:
        await raw.close()
    assert records == []  # the blocklist counts its own refusals


async def test_address_named_by_a_trusted_proxy_and_blocked_gets_403(
    make_node: MakeNode, raw_sockets: list[RawWebSocket]
) -> None:
    node = await make_node(security=TRUST_LOOPBACK)
    blocklist = FakeBlockList("198.51.100.66")
    node.ctx.blocklist = blocklist
    records = capture(node)
    refused = await upgrade(node.port, raw_sockets, headers=xff("198.51.100.66"))
    assert refused.status == 403
    assert refused.json()["reason"] == "ip_blocked"
    answer = await http_request(node.port, "GET", CHANNELS, headers=xff("198.51.100.66"))
    assert answer.status == 403
    assert (await upgrade(node.port, raw_sockets, headers=xff("198.51.100.67"))).status == 101
    assert records == []
    assert held(node, "198.51.100.66") == 0
    assert "198.51.100.67" in blocklist.asked


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_keep_alive_requests_are_resolved_one_by_one(
    make_node: MakeNode, method: str
) -> None:
    node = await make_node(
        security={"rest_requests_per_ip": {"rate": SLOW, "burst": 1}, **TRUST_LOOPBACK}
    )
    reader, writer = await within(asyncio.open_connection("127.0.0.1", node.port))
    try:
        requests = b""
        for address in ("198.51.100.1", "198.51.100.2", "198.51.100.1"):
            requests += (
                f"{method} /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                f"X-Forwarded-For: {address}\r\n\r\n"
            ).encode()
        writer.write(requests)
        statuses = []
        for _ in range(3):
            head = await within(reader.readuntil(b"\r\n\r\n"))
            statuses.append(int(head.split(b" ")[1]))
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await within(reader.readexactly(length))
    finally:
        writer.close()
    assert statuses == [404, 404, 429]
