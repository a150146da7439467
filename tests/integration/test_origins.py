"""Origin allow-lists against a live node: the handshake refusal and CORS on the REST API."""

from __future__ import annotations

import json

import pytest
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    DEFAULT_QUERY,
    OP_TEXT,
    OTHER_APP_ID,
    OTHER_APP_KEY,
    OTHER_APP_SECRET,
    HttpResult,
    RawWebSocket,
    http_request,
    signed_target,
)
from support.timeouts import within
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from bastion.api import cors
from bastion.server.runtime import Node

from .conftest import LogCheck, MakeNode

ALLOWED = ["https://app.example.com", "https://*.example.com"]
PATH = f"/app/{APP_KEY}?{DEFAULT_QUERY}"
OTHER_PATH = f"/app/{OTHER_APP_KEY}?{DEFAULT_QUERY}"
SPOOFS = [
    "https://evil-example.com",
    "https://example.com.evil.net",
    "https://app.example.com.evil.net",
    "https://example.com",
    "http://app.example.com",
    "https://app.example.com:8443",
    "https://evil.net",
    "null",
    "https://app.example.com/",
    "https://user@app.example.com",
]


@pytest.fixture
async def origin_node(make_node: MakeNode) -> Node:
    """The default app restricted to ALLOWED; the other app has no list."""
    return await make_node(app={"allowed_origins": ALLOWED})


async def handshake(
    node: Node, origin: str | None, path: str = PATH, raws: list[RawWebSocket] | None = None
) -> tuple[int, dict[str, str], RawWebSocket]:
    raw = await RawWebSocket.connect(node.port)
    if raws is not None:
        raws.append(raw)
    extra = () if origin is None else (f"Origin: {origin}",)
    status, headers = await raw.handshake(path, extra_headers=extra)
    return status, headers, raw


async def assert_established(raw: RawWebSocket) -> None:
    frame = await raw.read_frame()
    assert frame.opcode == OP_TEXT
    assert frame.json()["event"] == "pusher:connection_established"


async def assert_refused_before_upgrade(
    node: Node, status: int, headers: dict[str, str], raw: RawWebSocket
) -> None:
    assert status == 403
    assert "upgrade" not in headers
    assert "sec-websocket-accept" not in headers
    body = await raw.read_eof()
    assert json.loads(body)["reason"] == "origin_refused"
    assert node.hub.connections == 0


# --- the WebSocket handshake -------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com",
        "https://a.example.com",
        "https://a.b.example.com",
        "HTTPS://App.Example.COM:443",
    ],
)
async def test_allowed_origin_connects(
    origin_node: Node, raw_sockets: list[RawWebSocket], origin: str
) -> None:
    status, _, raw = await handshake(origin_node, origin, raws=raw_sockets)
    assert status == 101
    await assert_established(raw)
    assert origin_node.metrics.refusal_count("origin_refused") == 0


@pytest.mark.parametrize("origin", SPOOFS)
async def test_foreign_origin_is_refused_before_upgrade(
    origin_node: Node, raw_sockets: list[RawWebSocket], logs: LogCheck, origin: str
) -> None:
    status, headers, raw = await handshake(origin_node, origin, raws=raw_sockets)
    await assert_refused_before_upgrade(origin_node, status, headers, raw)
    assert origin_node.metrics.refusal_count("origin_refused") == 1
    assert origin_node.metrics.refusals[("origin_refused", APP_ID)] == 1
    logs.assert_refusal_logged("origin_refused")
    logs.assert_clean()


async def test_two_origin_headers_are_refused(
    origin_node: Node, raw_sockets: list[RawWebSocket]
) -> None:
    raw = await RawWebSocket.connect(origin_node.port)
    raw_sockets.append(raw)
    status, headers = await raw.handshake(
        PATH, extra_headers=("Origin: https://app.example.com", "Origin: https://evil.net")
    )
    await assert_refused_before_upgrade(origin_node, status, headers, raw)


async def test_no_origin_connects_by_default(
    origin_node: Node, raw_sockets: list[RawWebSocket]
) -> None:
    status, _, raw = await handshake(origin_node, None, raws=raw_sockets)
    assert status == 101
    await assert_established(raw)


async def test_no_origin_refused_when_the_app_opts_in(
    make_node: MakeNode, raw_sockets: list[RawWebSocket]
) -> None:
    node = await make_node(app={"allowed_origins": ALLOWED, "reject_missing_origin": True})
    status, headers, raw = await handshake(node, None, raws=raw_sockets)
    await assert_refused_before_upgrade(node, status, headers, raw)
    assert node.metrics.refusal_count("origin_refused") == 1
    status, _, raw = await handshake(node, "https://app.example.com", raws=raw_sockets)
    assert status == 101
    await assert_established(raw)


@pytest.mark.parametrize("origin", [None, "https://evil.net", "null", "garbage"])
async def test_app_without_a_list_accepts_any_origin(
    origin_node: Node, raw_sockets: list[RawWebSocket], origin: str | None
) -> None:
    status, _, raw = await handshake(origin_node, origin, path=OTHER_PATH, raws=raw_sockets)
    assert status == 101
    await assert_established(raw)
    assert origin_node.metrics.refusal_count("origin_refused") == 0


def open_with_origin(uri: str, origin: str) -> connect:
    return connect(uri, origin=Origin(origin), proxy=None, compression=None, open_timeout=None)


async def test_a_real_client_sees_the_403(origin_node: Node) -> None:
    uri = f"ws://127.0.0.1:{origin_node.port}{PATH}"
    with pytest.raises(InvalidStatus) as refused:
        await within(open_with_origin(uri, "https://evil-example.com"))
    assert refused.value.response.status_code == 403
    async with await within(open_with_origin(uri, "https://app.example.com")) as ws:
        first = json.loads(await within(ws.recv()))
        assert first["event"] == "pusher:connection_established"


# --- CORS on the REST API ----------------------------------------------------------------


async def get_channels(
    node: Node,
    origin: str | None,
    app_id: str = APP_ID,
    key: str = APP_KEY,
    secret: str = APP_SECRET,
) -> HttpResult:
    target = signed_target("GET", f"/apps/{app_id}/channels", key=key, secret=secret)
    headers = () if origin is None else (f"Origin: {origin}",)
    return await http_request(node.port, "GET", target, headers=headers)


async def preflight(node: Node, origin: str | None, app_id: str = APP_ID) -> HttpResult:
    headers = [
        "Access-Control-Request-Method: POST",
        "Access-Control-Request-Headers: content-type",
    ]
    if origin is not None:
        headers.append(f"Origin: {origin}")
    return await http_request(node.port, "OPTIONS", f"/apps/{app_id}/events", headers=headers)


def cors_headers(result: HttpResult) -> dict[str, str]:
    return {name: value for name, value in result.headers.items() if name.startswith("access-")}


@pytest.mark.parametrize("origin", ["https://app.example.com", "https://a.example.com"])
async def test_allowed_rest_request_gets_cors_headers(origin_node: Node, origin: str) -> None:
    result = await get_channels(origin_node, origin)
    assert result.status == 200, result.body
    assert cors_headers(result) == {"access-control-allow-origin": origin}
    assert result.headers["vary"] == "Origin"


async def test_cors_headers_on_a_refused_rest_request_too(origin_node: Node) -> None:
    # The signature check is unchanged; the browser may still read why it failed.
    result = await get_channels(origin_node, "https://app.example.com", secret="wrong")
    assert result.status == 401
    assert result.headers["access-control-allow-origin"] == "https://app.example.com"


@pytest.mark.parametrize("origin", [None, *SPOOFS])
async def test_foreign_rest_request_gets_no_allow_origin(
    origin_node: Node, origin: str | None
) -> None:
    result = await get_channels(origin_node, origin)
    # Signed requests are authorised by their signature, not by Origin.
    assert result.status == 200
    assert cors_headers(result) == {}
    assert result.headers["vary"] == "Origin"
    assert origin_node.metrics.refusal_count("origin_refused") == 0


async def test_app_without_a_list_gets_no_cors_headers(origin_node: Node) -> None:
    result = await get_channels(
        origin_node,
        "https://app.example.com",
        app_id=OTHER_APP_ID,
        key=OTHER_APP_KEY,
        secret=OTHER_APP_SECRET,
    )
    assert result.status == 200
    assert cors_headers(result) == {}
    assert "vary" not in result.headers


async def test_allowed_preflight(origin_node: Node) -> None:
    result = await preflight(origin_node, "https://a.example.com")
    assert result.status == 204
    assert result.body == b""
    assert "content-length" not in result.headers
    assert cors_headers(result) == {
        "access-control-allow-origin": "https://a.example.com",
        "access-control-allow-methods": "GET, POST",
        "access-control-allow-headers": "Content-Type",
        "access-control-max-age": "600",
    }
    assert result.headers["vary"] == "Origin"


@pytest.mark.parametrize("origin", SPOOFS)
async def test_foreign_preflight_is_refused(origin_node: Node, logs: LogCheck, origin: str) -> None:
    result = await preflight(origin_node, origin)
    assert result.status == 403
    assert result.json()["reason"] == "origin_refused"
    assert cors_headers(result) == {}
    assert origin_node.metrics.refusal_count("origin_refused") == 1
    logs.assert_refusal_logged("origin_refused")
    logs.assert_clean()


async def test_preflight_for_an_app_without_a_list(origin_node: Node) -> None:
    result = await preflight(origin_node, "https://app.example.com", app_id=OTHER_APP_ID)
    assert result.status == 204
    assert cors_headers(result) == {}
    assert "vary" not in result.headers


async def test_preflight_without_origin_allows_nothing(origin_node: Node) -> None:
    result = await preflight(origin_node, None)
    assert result.status == 204
    assert cors_headers(result) == {}
    assert origin_node.metrics.refusal_count("origin_refused") == 0


async def test_policy_is_built_once_per_app(origin_node: Node) -> None:
    app = origin_node.hub.apps_by_id[APP_ID]
    await get_channels(origin_node, "https://app.example.com")
    first = cors.origin_policy(app)
    await get_channels(origin_node, "https://app.example.com")
    assert cors.origin_policy(app) is first
