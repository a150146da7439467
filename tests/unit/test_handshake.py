"""The opening handshake: the same verdicts as the ``websockets`` library gave.

Bastion answers the handshake itself (:mod:`bastion.protocol.handshake`) instead
of building a ``websockets`` server protocol per connection. Each verdict must stay
the library's: the same status for the same headers, and the same
``Sec-WebSocket-Accept`` for a valid key.
"""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol

from bastion.protocol.handshake import Accepted, Failed, accept_value, check_handshake

_KEY = base64.b64encode(bytes(range(16))).decode()
_GOOD = [
    ("Host", "127.0.0.1"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", _KEY),
    ("Sec-WebSocket-Version", "13"),
]


def _library(headers: list[tuple[str, str]]) -> tuple[int, str | None]:
    protocol = ServerProtocol()
    response = protocol.accept(Request("/app/key", Headers(headers)))
    return response.status_code, response.headers.get("Sec-WebSocket-Accept")


def _ours(headers: list[tuple[str, str]]) -> tuple[int, str | None]:
    answer = check_handshake(headers)
    if isinstance(answer, Failed):
        return answer.status, None
    head = answer.response.decode("latin-1")
    assert head.startswith("HTTP/1.1 101 Switching Protocols\r\n")
    assert head.endswith("\r\n\r\n")
    fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:-2])
    assert fields["Upgrade"] == "websocket"
    assert fields["Connection"] == "Upgrade"
    return 101, fields["Sec-WebSocket-Accept"]


def test_rfc_6455_sample_key() -> None:
    # RFC 6455 §1.3's worked example.
    assert accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_valid_handshake_is_accepted_as_the_library_accepts_it() -> None:
    assert _ours(_GOOD) == _library(_GOOD)
    assert _ours(_GOOD)[0] == 101


def test_header_names_and_connection_tokens_are_case_insensitive() -> None:
    headers = [
        ("host", "x"),
        ("upgrade", "WebSocket"),
        ("connection", "keep-alive, UPGRADE"),
        ("sec-websocket-key", _KEY),
        ("sec-websocket-version", "13"),
    ]
    assert isinstance(check_handshake(headers), Accepted)
    assert _ours(headers) == _library(headers)


def _without(name: str) -> list[tuple[str, str]]:
    return [(key, value) for key, value in _GOOD if key != name]


def _replacing(name: str, value: str) -> list[tuple[str, str]]:
    return [*_without(name), (name, value)]


def test_a_missing_connection_upgrade_is_426_with_the_upgrade_header() -> None:
    answer = check_handshake(_replacing("Connection", "keep-alive"))
    assert isinstance(answer, Failed)
    assert answer.status == 426
    assert b"\r\nUpgrade: websocket\r\n" in answer.response
    assert answer.response.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")


def test_a_missing_or_foreign_upgrade_is_426() -> None:
    for headers in (_without("Upgrade"), _replacing("Upgrade", "h2c")):
        answer = check_handshake(headers)
        assert isinstance(answer, Failed) and answer.status == 426
        assert _library(headers)[0] == 426


def test_a_missing_repeated_or_malformed_key_is_400() -> None:
    cases = [
        _without("Sec-WebSocket-Key"),
        [*_GOOD, ("Sec-WebSocket-Key", _KEY)],
        _replacing("Sec-WebSocket-Key", "not base64!"),
        _replacing("Sec-WebSocket-Key", base64.b64encode(b"x" * 15).decode()),
        _replacing("Sec-WebSocket-Key", "é" * 24),
    ]
    for headers in cases:
        answer = check_handshake(headers)
        assert isinstance(answer, Failed), headers
        assert answer.status == 400
        assert answer.response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        length = int(answer.response.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert len(answer.response.split(b"\r\n\r\n", 1)[1]) == length
        assert _library(headers)[0] == 400


_TOKEN = st.sampled_from(
    ["upgrade", "Upgrade", "keep-alive", "websocket", "WebSocket", "h2c/1", "a b", "x@y", "", " "]
)
_VALUE = st.lists(_TOKEN, max_size=3).map(", ".join)
_KEYS = st.one_of(
    st.binary(min_size=0, max_size=20).map(lambda raw: base64.b64encode(raw).decode()),
    st.text(alphabet="ABCabc+/=!", max_size=26),
)


@given(
    connection=st.lists(_VALUE, max_size=2),
    upgrade=st.lists(_VALUE, max_size=2),
    keys=st.lists(_KEYS, max_size=2),
)
def test_every_verdict_is_the_librarys(
    connection: list[str], upgrade: list[str], keys: list[str]
) -> None:
    # Values arrive as the HTTP parser (httptools) hands them over: without leading whitespace.
    headers = [("Host", "x"), ("Sec-WebSocket-Version", "13")]
    headers += [("Connection", value.lstrip()) for value in connection]
    headers += [("Upgrade", value.lstrip()) for value in upgrade]
    headers += [("Sec-WebSocket-Key", value) for value in keys]
    assert _ours(headers) == _library(headers)
