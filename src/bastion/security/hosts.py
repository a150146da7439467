"""Whether a request's ``Host`` names this server: the DNS-rebinding guard.

A page on ``evil.example`` whose name is re-pointed at 127.0.0.1 makes the
browser of anyone on this host send same-origin requests to Bastion's loopback
port, with ``Host: evil.example``. Endpoints that let a caller in by its address
alone (``/metrics`` without a token, the dashboard page, the admin API) therefore
also require the ``Host`` header to name this server:

* an IP address literal (``127.0.0.1``, ``[::1]``, ``10.0.0.5``): a browser only
  sends one when the user typed it, and no page on another origin can read the
  answer;
* ``localhost`` (RFC 6761: resolved to loopback by the host itself, never
  through DNS an attacker controls);
* the configured ``[server] host``, or a name the operator lists
  (``allowed_hosts``).

Each with or without a ``:port``, case-insensitive, a trailing dot ignored. A
request without ``Host`` (HTTP/1.0 tools; never a browser) passes; one with
several is refused as ambiguous.

Pure: header values in, a decision out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

__all__ = ["HostPolicy", "host_name"]

_PORT = re.compile(r":[0-9]{1,5}")


def host_name(value: str) -> str | None:
    """The host part of a ``Host`` value, lower case, without port or trailing dot.

    An IPv6 literal keeps its brackets. ``None`` for an empty or malformed value.
    """
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        rest = text[end + 1 :]
        if rest and not _PORT.fullmatch(rest):
            return None
        return text[: end + 1]
    name, colon, port = text.partition(":")
    if colon and not _PORT.fullmatch(colon + port):
        return None
    name = name.removesuffix(".")
    return name or None


def _is_ip_literal(name: str) -> bool:
    text = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if text != name and "." in text and ":" not in text:
        return False  # "[192.0.2.1]" is not a valid Host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    # A bare IPv6 address must be bracketed in Host (RFC 3986).
    return isinstance(address, ipaddress.IPv4Address) or text != name


class HostPolicy:
    """The ``Host`` values that name this server.

    Args:
        server_host: ``[server] host`` (an address or a name).
        allowed_hosts: further names the operator reaches the node by.
    """

    __slots__ = ("names",)

    def __init__(self, server_host: str, allowed_hosts: Iterable[str] = ()) -> None:
        names = {"localhost"}
        for value in (server_host, *allowed_hosts):
            name = host_name(value)
            if name is not None:
                names.add(name)
        self.names = frozenset(names)

    def names_this_server(self, name: str) -> bool:
        """Whether one host name (as :func:`host_name` returns it) names this server."""
        return name in self.names or _is_ip_literal(name)

    def allows(self, values: Sequence[str]) -> bool:
        """Whether a request with these ``Host`` header values may be answered.

        Args:
            values: every ``Host`` header value of the request, in order.
        """
        if not values:
            return True
        if len(values) != 1:
            return False
        name = host_name(values[0])
        return name is not None and self.names_this_server(name)
