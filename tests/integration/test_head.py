"""HEAD answers on a real in-process node: the GET's headers, no body (RFC 9110 9.3.2).

A body after a HEAD's headers would be read as the start of the next answer on a
kept-alive connection; the tests pipeline a HEAD and a GET on one socket.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.clients import APP_ID, http_request
from support.timeouts import within

from bastion.config import AdminSettings

from .conftest import RunNode, node_settings

ADMIN_TOKEN = "head-admin-token-0123456789abcdefghijklm"


async def read_answer(reader: asyncio.StreamReader, *, head: bool) -> tuple[bytes, bytes]:
    """One answer off a kept-alive connection: its head, then its body (none for a HEAD)."""
    raw = await within(reader.readuntil(b"\r\n\r\n"))
    fields = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in raw.split(b"\r\n")[1:])
    }
    length = int(fields.get(b"content-length", b"0"))
    body = b"" if head else await within(reader.readexactly(length))
    return raw, body


@pytest.mark.parametrize(
    ("path", "as_get"),
    [
        ("/healthz", True),
        ("/dashboard", True),
        ("/readyz", False),  # GET only: a 405 with its JSON error
        (f"/apps/{APP_ID}/channels", False),
    ],
)
async def test_head_then_get_on_one_connection_stay_in_step(
    run_node: RunNode, tmp_path: Path, path: str, as_get: bool
) -> None:
    settings = node_settings(state_dir=tmp_path)  # /dashboard needs the admin API on
    admin = AdminSettings.model_validate({"token": ADMIN_TOKEN})
    node = await run_node(settings.model_copy(update={"admin": admin}))
    full = await http_request(node.port, "GET", path)
    reader, writer = await within(asyncio.open_connection("127.0.0.1", node.port))
    try:
        writer.write(
            f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        head, _ = await read_answer(reader, head=True)
        second, body = await read_answer(reader, head=False)
        rest_of_stream = await within(reader.read())
    finally:
        writer.close()
    # No body bytes after the HEAD's headers: the next answer is read where it starts.
    assert second.startswith(b"HTTP/1.1 200 "), second
    assert (body, rest_of_stream) == (b"OK", b"")
    if as_get:
        # The headers a GET gets, its Content-Length included.
        assert head.startswith(f"HTTP/1.1 {full.status} ".encode()), head
        assert f"Content-Length: {len(full.body)}\r\n".encode() in head
