"""The WebSocket opening handshake (RFC 6455 §4.2): check the request, answer it.

Pure: the request's headers in, the answer's bytes out. The listener's gates have
already checked the path, the method and ``Sec-WebSocket-Version`` (426 naming 13);
this checks what remains, as the ``websockets`` library did before (the same
statuses): ``Connection`` must list ``upgrade`` and ``Upgrade`` must be exactly
``websocket`` (else **426** with ``Upgrade: websocket``; either header malformed
is **400**), and there must be one ``Sec-WebSocket-Key`` that is base64 of 16
bytes (else **400**). No extension and
no subprotocol is ever negotiated (permessage-deflate stays off).

It runs for every connection, so the answer is built directly: the 101 carries
``Upgrade``, ``Connection`` and ``Sec-WebSocket-Accept`` (no ``Date``: a 1xx needs
none, and no ``Server``: nothing to tell a scanner).
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import re
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["Accepted", "Failed", "accept_value", "check_handshake"]

#: RFC 6455 §1.3.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Accepted(NamedTuple):
    """A valid handshake: the 101 response to write."""

    response: bytes


class Failed(NamedTuple):
    """An invalid handshake: its status, why (for the log), and the response to write."""

    status: int
    reason: str
    response: bytes


#: An empty SHA-1, copied for each key: making one by name looks the digest up in
#: OpenSSL's method store every time (2-3 % of a reconnect storm's CPU), a copy
#: does not.
_SHA1 = hashlib.sha1(usedforsecurity=False)


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for ``key`` (RFC 6455 §4.2.2)."""
    sha1 = _SHA1.copy()
    sha1.update(key.encode("ascii") + _GUID)
    return binascii.b2a_base64(sha1.digest(), newline=False).decode("ascii")


#: RFC 9110 §5.6.2 ``token``; an ``Upgrade`` element may name a version after ``/``.
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_PROTOCOL = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+(?:/[-!#$%&'*+.^_`|~0-9a-zA-Z]+)?")


@functools.lru_cache(maxsize=64)
def _elements(value: str, item: re.Pattern[str]) -> tuple[str, ...] | None:
    """The lower-cased list elements of one header value; None if it is malformed.

    RFC 9110 §5.6.1: ``1#element``, separated by commas with optional whitespace;
    empty elements are ignored, but a header must hold at least one. Remembered
    (boundedly): clients send the same few values on every connection.
    """
    elements = [element.strip(" \t") for element in value.split(",")]
    elements = [element for element in elements if element]
    if not elements or not all(item.fullmatch(element) for element in elements):
        return None
    return tuple(element.lower() for element in elements)


def _all_elements(values: list[str], item: re.Pattern[str]) -> list[str] | None:
    """The elements of every value of one header, in order; None if one is malformed."""
    found: list[str] = []
    for value in values:
        elements = _elements(value, item)
        if elements is None:
            return None
        found.extend(elements)
    return found


def _failed(status: int, reason: str, extra: str = "") -> Failed:
    body = f"Failed to open a WebSocket connection: {reason}.\n".encode()
    phrase = "Upgrade Required" if status == 426 else "Bad Request"
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return Failed(status, reason, head.encode("latin-1") + body)


def check_handshake(headers: Sequence[tuple[str, str]]) -> Accepted | Failed:
    """Check an upgrade request's handshake headers and make the answer."""
    connections: list[str] = []
    upgrades: list[str] = []
    keys: list[str] = []
    for name, value in headers:
        name = name.lower()
        if name == "connection":
            connections.append(value)
        elif name == "upgrade":
            upgrades.append(value)
        elif name == "sec-websocket-key":
            keys.append(value)
    connection = _all_elements(connections, _TOKEN)
    if connection is None:
        return _failed(400, "malformed Connection header")
    if "upgrade" not in connection:
        return _failed(426, "invalid Connection header", "Upgrade: websocket\r\n")
    upgrade = _all_elements(upgrades, _PROTOCOL)
    if upgrade is None:
        return _failed(400, "malformed Upgrade header")
    if upgrade != ["websocket"]:
        return _failed(426, "invalid Upgrade header", "Upgrade: websocket\r\n")
    if len(keys) != 1:
        return _failed(400, "missing or repeated Sec-WebSocket-Key header")
    key = keys[0].strip()
    try:
        # What base64.b64decode(validate=True) does, without its argument coercion.
        raw = binascii.a2b_base64(key.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        return _failed(400, "invalid Sec-WebSocket-Key header")
    return Accepted(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_value(key).encode("ascii") + b"\r\n\r\n"
    )
