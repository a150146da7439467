"""Schemathesis against the admin API's SERVED OpenAPI document, on a real node.

The node runs in a thread with its own event loop: schemathesis calls it with a
blocking HTTP client, which would stall a node sharing the test's loop. The
document is fetched with the token (it is behind it like every admin route),
loaded with ``schemathesis.openapi.from_dict`` and every GET operation is driven
with a bounded, derandomised number of examples; each answer is checked for a
documented status code, content type, headers and body schema, and never a 5xx.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from support.clients import APP_ID, APP_KEY, APP_SECRET

from bastion.config import settings_from_mapping
from bastion.server.runtime import Node

TOKEN = "admin-token-0123456789abcdefghijklmnopq"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS: list[Any] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
GET_ROUTES = {
    "/api/security/openapi.json",
    "/api/security/health",
    "/api/security/metrics",
    "/api/security/audit-logs",
    "/api/security/dashboard",
    "/api/security/report",
    "/api/security/config",
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A node on its own loop in a thread; yields its base URL."""
    state: Path = tmp_path_factory.mktemp("admin-openapi")
    node_settings = settings_from_mapping(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "audit": {"path": str(state / "audit.sqlite3")},
            "admin": {"token": TOKEN},
            "security": {"reputation": {"store_path": str(state / "blocks.sqlite3")}},
            "apps": [{"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET}],
        },
        environ={},
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="admin-openapi-node", daemon=True)
    thread.start()

    async def start() -> Node:
        node = Node(node_settings, loop)
        await node.start()
        return node

    node = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        yield f"http://127.0.0.1:{node.port}"
    finally:
        asyncio.run_coroutine_threadsafe(node.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture(scope="module")
def served_schema(base_url: str) -> Any:
    response = requests.get(f"{base_url}/api/security/openapi.json", headers=AUTH, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    return schemathesis.openapi.from_dict(response.json())


def test_the_document_needs_the_token(base_url: str) -> None:
    response = requests.get(f"{base_url}/api/security/openapi.json", timeout=10)
    assert response.status_code == 401
    assert response.json()["reason"] == "admin_unauthorized"


@pytest.mark.parametrize("path", sorted(GET_ROUTES))
def test_get_route_conforms_to_the_served_document(
    base_url: str, served_schema: Any, path: str
) -> None:
    operation = served_schema[path]["GET"]

    @settings(
        max_examples=25,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, headers=AUTH, timeout=10)
        case.validate_response(response, checks=CHECKS)

    check()


def test_a_wrong_document_is_caught(base_url: str) -> None:
    """The checks bite: a document that says ``ready`` is a string fails against the node."""
    document = requests.get(f"{base_url}/api/security/openapi.json", headers=AUTH, timeout=10)
    spec = document.json()
    spec["components"]["schemas"]["Readiness"]["properties"]["ready"] = {"type": "string"}
    operation = schemathesis.openapi.from_dict(spec)["/api/security/health"]["GET"]
    case = operation.Case()
    response = case.call(base_url=base_url, headers=AUTH, timeout=10)
    with pytest.raises(FailureGroup):
        case.validate_response(response, checks=CHECKS)
