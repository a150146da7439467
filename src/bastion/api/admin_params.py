"""Parameters and bodies of the admin API, validated strictly.

Every admin route reads its query and body through these helpers. A value that
does not fit raises :class:`BadRequest` naming the parameter (``parameter`` in
the 400 answer) and what it must be, never the value itself: it is the client's
text, and may be anything.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from bastion.security.audit import parse_time

__all__ = [
    "AUDIT_PARAMS",
    "PRINTABLE",
    "BadRequest",
    "address",
    "int_param",
    "json_body",
    "only",
    "query_params",
    "time_param",
    "word_param",
]

#: Text without control characters (a reason, a filter word).
PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]*")
#: The query parameters of ``GET audit-logs``.
AUDIT_PARAMS = frozenset({"since", "until", "type", "severity", "ip", "app", "limit", "offset"})
_DIGITS = re.compile(r"[0-9]{1,9}")


class BadRequest(Exception):
    """A parameter or body field is invalid; the message never echoes its value.

    Args:
        parameter: the parameter or field at fault (``query``, ``body``, a name).
        message: what it must be.
    """

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


def query_params(query: str) -> dict[str, str]:
    """The query's parameters; a repeated one, or more than 32, is refused."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, max_num_fields=32)
    except ValueError:
        raise BadRequest("query", "too many query parameters") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise BadRequest(name if name in AUDIT_PARAMS else "query", "repeated parameter")
        params[name] = value
    return params


def only(params: Mapping[str, str], allowed: Iterable[str]) -> None:
    """Refuse any parameter outside ``allowed``."""
    allowed = frozenset(allowed)
    for name in params:
        if name not in allowed:
            # Never echo an unknown name: it is the client's text.
            raise BadRequest("query", "unknown query parameter")


def time_param(params: Mapping[str, str], name: str, now: float) -> float | None:
    """A time: a duration back from ``now`` (``30m``), ISO 8601 or Unix seconds."""
    text = params.get(name)
    if text is None:
        return None
    try:
        return parse_time(text, now=now)
    except (ValueError, OverflowError):
        raise BadRequest(
            name, f"{name} must be a duration (30m, 1h), an ISO 8601 time or Unix seconds"
        ) from None


def int_param(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer from ``low`` to ``high`` (``default`` when absent)."""
    text = params.get(name)
    if text is None:
        return default
    if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
        raise BadRequest(name, f"{name} must be an integer from {low} to {high}")
    return int(text)


def word_param(params: Mapping[str, str], name: str) -> str | None:
    """1 to 200 printable characters."""
    text = params.get(name)
    if text is None:
        return None
    if not 1 <= len(text) <= 200 or not PRINTABLE.fullmatch(text):
        raise BadRequest(name, f"{name} must be 1 to 200 printable characters")
    return text


def address(value: object, name: str) -> str:
    """A strictly valid IP address (no CIDR, zone, spaces or leading zeros), canonical."""
    if not isinstance(value, str) or not 2 <= len(value) <= 45:
        raise BadRequest(name, f"{name} must be an IPv4 or IPv6 address")
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        raise BadRequest(name, f"{name} must be an IPv4 or IPv6 address") from None
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.scope_id is not None:
            raise BadRequest(name, f"{name} must be an IPv4 or IPv6 address")
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
    return str(parsed)


def json_body(body: bytes, *, required: Sequence[str], optional: Sequence[str]) -> dict[str, Any]:
    """A JSON object with every ``required`` field and no field outside both lists."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body", "the body must be a JSON object") from None
    if not isinstance(value, dict):
        raise BadRequest("body", "the body must be a JSON object")
    for name in value:
        if name not in required and name not in optional:
            raise BadRequest("body", "unknown field in the body")
    for name in required:
        if name not in value:
            raise BadRequest(name, f"{name} is required")
    return value
