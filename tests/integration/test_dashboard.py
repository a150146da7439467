"""The operator dashboard at ``/dashboard`` on a real in-process node.

The page is served only while the admin API is on and only to a TCP peer in
``[admin] allow_from``; anyone else gets exactly the unknown path's 404. Every
answer carries the strict headers, and the shipped HTML has no inline code and no
secret. (The page driven in a real browser: tests/interop/test_dashboard_chromium.py.)
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from support.clients import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    OTHER_APP_ID,
    OTHER_APP_KEY,
    OTHER_APP_SECRET,
    HttpResult,
    http_request,
)

from bastion.config import settings_from_mapping
from bastion.server.runtime import Node

from .conftest import Connect, RunNode

TOKEN = "dashboard-admin-token-0123456789abcdefghij"
BEARER = f"Authorization: Bearer {TOKEN}"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
ASSETS = {
    "/dashboard": "text/html; charset=utf-8",
    "/dashboard/": "text/html; charset=utf-8",
    "/dashboard/app.js": "text/javascript; charset=utf-8",
    "/dashboard/app.css": "text/css; charset=utf-8",
}


async def start(run_node: RunNode, state: Path, admin: dict[str, Any]) -> Node:
    """A node with two apps; its audit log and blocks file are ``state``-prefixed files."""
    settings = settings_from_mapping(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "audit": {"path": f"{state}-audit.sqlite3"},
            "admin": admin,
            "security": {"reputation": {"store_path": f"{state}-blocks.sqlite3"}},
            "apps": [
                {"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET},
                {"id": OTHER_APP_ID, "key": OTHER_APP_KEY, "secret": OTHER_APP_SECRET},
            ],
        },
        environ={},
    )
    return await run_node(settings)


@pytest.fixture
async def node(run_node: RunNode, tmp_path: Path) -> Node:
    return await start(run_node, tmp_path / "on", {"token": TOKEN})


def assert_dashboard_headers(result: HttpResult) -> None:
    assert result.headers["content-security-policy"] == CSP
    assert result.headers["x-content-type-options"] == "nosniff"
    assert result.headers["referrer-policy"] == "no-referrer"
    assert result.headers["x-frame-options"] == "DENY"
    assert result.headers["cache-control"] == "no-store"


async def test_the_page_and_its_assets_are_served_with_strict_headers(node: Node) -> None:
    for path, content_type in ASSETS.items():
        result = await http_request(node.port, "GET", path)
        assert result.status == 200, path
        assert result.headers["content-type"] == content_type
        assert_dashboard_headers(result)
        assert result.body, path
        assert int(result.headers["content-length"]) == len(result.body)
    page = (await http_request(node.port, "GET", "/dashboard")).body.decode()
    assert "/dashboard/app.js" in page and "/dashboard/app.css" in page


async def test_head_answers_the_headers_without_a_body(node: Node) -> None:
    for path, content_type in ASSETS.items():
        result = await http_request(node.port, "HEAD", path)
        assert (result.status, result.body) == (200, b""), path
        assert result.headers["content-type"] == content_type
        assert_dashboard_headers(result)


async def test_other_methods_are_405_with_the_same_headers(node: Node) -> None:
    for method in ("POST", "PUT", "DELETE"):
        result = await http_request(node.port, method, "/dashboard", b"{}")
        assert result.status == 405, method
        assert result.headers["allow"] == "GET, HEAD"
        assert result.json()["reason"] == "method_not_allowed"
        assert_dashboard_headers(result)
    assert node.metrics.refusals[("method_not_allowed", "")] == 3


async def unknown_path(node: Node) -> HttpResult:
    return await http_request(node.port, "GET", "/no-such-page")


async def test_404_like_an_unknown_path_when_the_admin_api_is_off(
    run_node: RunNode, tmp_path: Path
) -> None:
    node = await start(run_node, tmp_path / "off", {})
    expected = await unknown_path(node)
    assert expected.status == 404
    for path in ASSETS:
        for method in ("GET", "POST"):
            result = await http_request(node.port, method, path, headers=(BEARER,))
            assert (result.status, result.body) == (404, expected.body), (method, path)
            assert "content-security-policy" not in result.headers


async def test_404_for_a_peer_outside_allow_from(run_node: RunNode, tmp_path: Path) -> None:
    node = await start(
        run_node, tmp_path / "elsewhere", {"token": TOKEN, "allow_from": ["10.0.0.0/8"]}
    )
    expected = await unknown_path(node)
    for path in ASSETS:
        result = await http_request(node.port, "GET", path, headers=(BEARER,))
        assert (result.status, result.body) == (404, expected.body), path
        assert "content-security-policy" not in result.headers


async def test_nothing_else_is_served_under_the_prefix(node: Node) -> None:
    expected = await unknown_path(node)
    for path in ("/dashboard/index.html", "/dashboard/__init__.py", "/dashboard/../app.js"):
        result = await http_request(node.port, "GET", path)
        assert (result.status, result.body) == (404, expected.body), path


class _Markup(HTMLParser):
    """Collects what would make the page run code that is not app.js."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.links: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        for name, value in attrs:
            if name.startswith("on") or name == "style":
                self.inline.append(f"{tag} {name}")
            if value is not None and value.strip().lower().startswith("javascript:"):
                self.inline.append(f"{tag} {name}")
        if tag == "style":
            self.inline.append("style element")
        if tag == "script":
            self.scripts.append(attributes)
            self._in_script = True
        if tag == "link":
            self.links.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("script body")


async def test_the_page_has_no_inline_code_and_no_secret(node: Node) -> None:
    page = await http_request(node.port, "GET", "/dashboard")
    markup = _Markup()
    markup.feed(page.body.decode())
    assert markup.inline == []
    assert [script["src"] for script in markup.scripts] == ["/dashboard/app.js"]
    assert [(link["rel"], link["href"]) for link in markup.links] == [
        ("icon", "data:,"),  # no favicon request: it would be a 404 refusal per page load
        ("stylesheet", "/dashboard/app.css"),
    ]
    for path in ASSETS:
        body = (await http_request(node.port, "GET", path)).body.decode()
        assert TOKEN not in body
        # Nothing external (the SVG namespace is a name, never fetched).
        body = body.replace("'http://www.w3.org/2000/svg'", "")
        assert "http://" not in body and "https://" not in body, path


def test_the_script_inserts_data_as_text_and_keeps_the_token_in_the_session() -> None:
    script = resources.files("bastion.api.dashboard").joinpath("app.js").read_text()
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert forbidden not in script, forbidden
    assert "localStorage" not in script and "document.cookie" not in script
    assert "sessionStorage.setItem" in script
    assert "'Bearer '" in script


async def test_the_dashboard_data_has_each_apps_counters(node: Node, connect: Connect) -> None:
    await connect(node)
    refused = await http_request(node.port, "GET", "/api/security/dashboard")
    assert refused.status == 401
    result = await http_request(node.port, "GET", "/api/security/dashboard", headers=(BEARER,))
    data = json.loads(result.body)
    assert data["apps"][APP_ID]["connections"] == 1
    assert data["apps"][APP_ID]["connections_opened"] == 1
    assert data["apps"][APP_ID]["messages_in"] >= 0
    assert data["apps"][OTHER_APP_ID] == {
        "connections": 0,
        "connections_opened": 0,
        "messages_in": 0,
        "events_published": 0,
        "refusals": 0,
    }
    assert data["counters"]["refusals"] == 1  # the 401 above
    assert {"reason": "admin_unauthorized", "count": 1} in data["top_refusals"]
