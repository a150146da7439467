"""TLS served by the node itself (``[server.tls]``): wss://, https://, and what it refuses.

A throw-away CA and a server certificate for 127.0.0.1 / localhost are made at test
time with ``cryptography``; clients trust that CA only. Everything runs on loopback
with OS-chosen ports, and every wait is scaled (``timeouts.py``).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pusher
import pytest
from support.clients import APP_ID, APP_KEY, APP_SECRET, DEFAULT_QUERY, signed_target
from support.pki import Pki, make_pki
from support.timeouts import scaled, within
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from bastion.server.runtime import Node
from bastion.server.tls import TlsError

from .conftest import LogCheck, RunNode, node_settings

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def tls_settings(pki: Pki, state_dir: Path, **server: Any) -> Any:
    """Test-node settings serving TLS with ``pki``'s certificate."""
    tls = {"cert": str(pki.cert), "key": str(pki.key), **server.pop("tls", {})}
    return node_settings({"tls": tls, **server}, state_dir=state_dir)


async def _wss_hello(port: int, context: ssl.SSLContext, host: str = "127.0.0.1") -> Any:
    url = f"wss://{host}:{port}/app/{APP_KEY}?{DEFAULT_QUERY}"
    async with ws_connect(url, ssl=context, open_timeout=scaled(5)) as ws:
        return json.loads(await within(ws.recv()))


def _https(pki: Pki, port: int, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", port, timeout=scaled(5), context=pki.client_context()
    )
    try:
        headers = {"Content-Type": "application/json"} if body else {}
        connection.request(method, target, body=body or None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while chunk := await reader.read(4096):
        data += chunk
    return data


# --- serving -------------------------------------------------------------------------------


async def test_wss_and_https_serve_on_one_port(pki: Pki, tmp_path: Path, run_node: RunNode) -> None:
    node = await run_node(tls_settings(pki, tmp_path))
    context = pki.client_context()
    url = f"wss://localhost:{node.port}/app/{APP_KEY}?{DEFAULT_QUERY}"
    async with ws_connect(url, ssl=context, open_timeout=scaled(5)) as ws:
        hello = json.loads(await within(ws.recv()))
        assert hello["event"] == "pusher:connection_established"
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "news"}}))
        subscribed = json.loads(await within(ws.recv()))
        assert subscribed["event"] == "pusher_internal:subscription_succeeded"

        body = json.dumps({"name": "headline", "channel": "news", "data": '{"n":1}'}).encode()
        target = signed_target("POST", f"/apps/{APP_ID}/events", body=body)
        status, answer = await asyncio.to_thread(_https, pki, node.port, "POST", target, body)
        assert (status, json.loads(answer)) == (200, {})

        event = json.loads(await within(ws.recv()))
        assert (event["event"], event["channel"], event["data"]) == ("headline", "news", '{"n":1}')
    # Plain (unsigned) endpoints answer over https too.
    status, _ = await asyncio.to_thread(_https, pki, node.port, "GET", "/healthz")
    assert status == 200


async def test_the_official_sdk_triggers_over_https(
    pki: Pki, tmp_path: Path, run_node: RunNode
) -> None:
    node = await run_node(tls_settings(pki, tmp_path))
    sdk = _https_sdk(pki, node.port)
    url = f"wss://127.0.0.1:{node.port}/app/{APP_KEY}?{DEFAULT_QUERY}"
    async with ws_connect(url, ssl=pki.client_context(), open_timeout=scaled(5)) as ws:
        await within(ws.recv())
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "sdk"}}))
        await within(ws.recv())
        await asyncio.to_thread(sdk.trigger, "sdk", "from-sdk", {"ok": True})
        event = json.loads(await within(ws.recv()))
        assert (event["event"], json.loads(event["data"])) == ("from-sdk", {"ok": True})


async def test_a_client_that_does_not_trust_the_ca_fails_the_handshake(
    pki: Pki, tmp_path: Path, run_node: RunNode, logs: LogCheck
) -> None:
    node = await run_node(tls_settings(pki, tmp_path))
    with pytest.raises(ssl.SSLCertVerificationError):
        await _wss_hello(node.port, ssl.create_default_context(cafile=None, cadata=None))
    # ...and the node still serves a client that does.
    assert (await _wss_hello(node.port, pki.client_context()))["event"] == (
        "pusher:connection_established"
    )
    # Failed handshakes are not server errors: nothing above WARNING, no trace.
    logs.assert_clean()


def _https_sdk(pki: Pki, port: int) -> pusher.Pusher:
    """The official PyPI SDK over https, trusting the test CA only."""
    sdk = pusher.Pusher(
        app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host="127.0.0.1", port=port, ssl=True
    )
    backend = sdk._pusher_client.http
    backend.session.trust_env = False  # loopback only: no environment proxy
    # The SDK passes its bundled CA file as ``verify`` on every request: the test CA
    # replaces it (nothing else is trusted).
    backend.options["verify"] = str(pki.ca)
    return sdk


async def test_a_slow_consumer_over_tls_is_cut_with_4100(
    pki: Pki, tmp_path: Path, run_node: RunNode
) -> None:
    # Over TLS the bytes wait in the TLS layer's buffer, not the socket's: the
    # write-buffer limit must still see them.
    node = await run_node(tls_settings(pki, tmp_path, max_write_buffer_kb=64))
    sdk = _https_sdk(pki, node.port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await within(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", node.port)))
    url = f"wss://127.0.0.1:{node.port}/app/{APP_KEY}?{DEFAULT_QUERY}"
    # max_queue=1: the client stops reading the socket once one frame waits unread.
    async with ws_connect(
        url, sock=sock, ssl=pki.client_context(), open_timeout=scaled(5), max_queue=1
    ) as slow:
        await within(slow.recv())
        await slow.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "hose"}}))
        await within(slow.recv())
        payload = "x" * 9000
        for sequence in range(2000):  # bounded: loopback kernel buffers hold a few MB
            await asyncio.to_thread(sdk.trigger, "hose", "big", f"{sequence}:{payload}")
            if node.metrics.refusal_count("slow_consumer"):
                break
        assert node.metrics.refusal_count("slow_consumer") == 1
        assert node.metrics.connections_closed[(APP_ID, 4100)] == 1
        # The slow client finds the close at the end of its stream.
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await within(slow.recv())
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4100


# --- refusals ------------------------------------------------------------------------------


async def test_plain_http_on_the_tls_port_gets_no_http_answer(
    pki: Pki, tmp_path: Path, run_node: RunNode, logs: LogCheck
) -> None:
    node = await run_node(tls_settings(pki, tmp_path))
    for request in (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        try:
            writer.write(request)
            await writer.drain()
            answer = await within(_read_to_eof(reader))
        except ConnectionResetError:
            answer = b""
        finally:
            writer.close()
        assert b"HTTP/" not in answer
        assert b"101" not in answer and b"pusher" not in answer
    assert (await _wss_hello(node.port, pki.client_context()))["event"] == (
        "pusher:connection_established"
    )
    # Failed handshakes are not server errors: nothing above WARNING, no trace.
    logs.assert_clean()


async def test_a_stalled_tls_handshake_is_closed_after_handshake_timeout(
    pki: Pki, tmp_path: Path, run_node: RunNode, logs: LogCheck
) -> None:
    node = await run_node(tls_settings(pki, tmp_path, handshake_timeout=0.3))
    started = time.monotonic()  # before the connection: the server's timer starts later
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        # Never a ClientHello: the server must give the socket up on its own, within
        # 5 s (scaled) ...
        answer = await within(_read_to_eof(reader), seconds=5)
    except ConnectionResetError:
        answer = b""
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    assert answer == b""
    assert elapsed >= 0.2  # ... and not before handshake_timeout (0.3 s)
    assert (await _wss_hello(node.port, pki.client_context()))["event"] == (
        "pusher:connection_established"
    )
    # Failed handshakes are not server errors: nothing above WARNING, no trace.
    logs.assert_clean()


async def test_min_version_tls13_refuses_a_tls12_only_client(
    pki: Pki, tmp_path: Path, run_node: RunNode, logs: LogCheck
) -> None:
    node = await run_node(tls_settings(pki, tmp_path, tls={"min_version": "TLSv1.3"}))
    tls12_only = pki.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    # An alert (SSLError) or a reset, depending on timing: never a connection.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _wss_hello(node.port, tls12_only)
    tls13 = pki.client_context(minimum_version=ssl.TLSVersion.TLSv1_3)
    assert (await _wss_hello(node.port, tls13))["event"] == "pusher:connection_established"
    # Failed handshakes are not server errors: nothing above WARNING, no trace.
    logs.assert_clean()


async def test_default_min_version_accepts_a_tls12_client(
    pki: Pki, tmp_path: Path, run_node: RunNode
) -> None:
    node = await run_node(tls_settings(pki, tmp_path))
    tls12_only = pki.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    assert (await _wss_hello(node.port, tls12_only))["event"] == "pusher:connection_established"


# --- start-up failures ---------------------------------------------------------------------


async def test_a_missing_certificate_fails_start_before_anything_is_opened(
    pki: Pki, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    missing = tmp_path / "nowhere.pem"
    settings = tls_settings(pki, state, tls={"cert": str(missing)})
    node = Node(settings, asyncio.get_running_loop())
    with pytest.raises(TlsError, match=r"nowhere\.pem"):
        await node.start()
    assert list(state.iterdir()) == []  # no audit log, no blocks file


async def test_a_key_that_does_not_match_fails_start_naming_the_key(
    pki: Pki, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other")
    settings = tls_settings(pki, tmp_path, tls={"key": str(other.key)})
    node = Node(settings, asyncio.get_running_loop())
    with pytest.raises(TlsError, match=r"other/server\.key.*does not match") as failure:
        await node.start()
    assert "PRIVATE KEY" not in str(failure.value)


def _serve(config: Path, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for name in list(env):
        if name.startswith("BASTION_") and name != "BASTION_TEST_TIMEOUT_SCALE":
            del env[name]
    return subprocess.Popen(
        [sys.executable, "-m", "bastion", "serve", "--config", str(config)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _config(pki: Pki, tmp_path: Path, key: Path) -> Path:
    config = tmp_path / "bastion.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0

[server.tls]
cert = {json.dumps(str(pki.cert))}
key = {json.dumps(str(key))}

[audit]
path = {json.dumps(str(tmp_path / "audit.sqlite3"))}

[security.reputation]
store_path = {json.dumps(str(tmp_path / "blocks.sqlite3"))}

[[apps]]
id = "{APP_ID}"
key = "{APP_KEY}"
secret = "{APP_SECRET}"
""",
        encoding="utf-8",
    )
    return config


def test_bastion_serve_exits_1_naming_the_key_file_never_its_content(
    pki: Pki, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    wrong = make_pki(other).key
    process = _serve(_config(pki, tmp_path, wrong), tmp_path)
    try:
        stdout, stderr = process.communicate(timeout=scaled(30))
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, (stdout, stderr)
    assert str(wrong) in stderr and "does not match" in stderr
    assert "listening" not in stdout
    assert "Traceback" not in stderr
    secret_lines = wrong.read_text().splitlines()[1:-1]
    assert not any(line in stderr + stdout for line in secret_lines)


def test_bastion_serve_announces_https(pki: Pki, tmp_path: Path) -> None:
    process = _serve(_config(pki, tmp_path, pki.key), tmp_path)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # bounded by the pytest timeout
        assert line.startswith("bastion listening on https://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        status, _ = _https(pki, port, "GET", "/healthz")
        assert status == 200
    finally:
        process.terminate()
        try:
            process.communicate(timeout=scaled(15))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
    assert process.returncode == 0
