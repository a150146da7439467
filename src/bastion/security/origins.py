"""Origin allow-lists: which browser origins may open a WebSocket or call the REST API.

Pure: no I/O, no clocks. An app's ``allowed_origins`` entries are parsed once into
an :class:`OriginPolicy`; :meth:`OriginPolicy.allows` then answers per request.

Entries (patterns):

* ``scheme://host[:port]``: one exact origin. Scheme and host compare
  case-insensitively; the default port of ``http``/``ws`` (80) and
  ``https``/``wss`` (443) is the same as no port; any other port must match.
* ``scheme://*.domain[:port]``: any subdomain of ``domain``, at any depth
  (``a.domain``, ``a.b.domain``), never ``domain`` itself, with the same scheme
  and the same (normalised) port.
* ``*``: every origin (development only).

An Origin header value is checked with the same grammar (no wildcard): one with
userinfo, a path, a query, whitespace, no scheme, or the opaque ``null`` is
malformed and refused whenever a list is set (unless ``*`` is on it).
A handshake with no Origin at all is allowed unless ``reject_missing_origin``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["OriginPolicy", "Pattern", "parse_origin", "parse_patterns"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = rf"{_LABEL}(?:\.{_LABEL})*"
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    rf"(?P<host>(?P<wild>\*\.)?{_HOSTNAME}|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?",
    # ASCII: with Unicode case folding [a-z] would also match the Kelvin sign (U+212A).
    re.IGNORECASE | re.ASCII,
)
_MAX_HOST = 253


@dataclass(frozen=True, slots=True)
class Pattern:
    """One parsed entry: ``host`` is lowercase; ``wildcard`` means ``*.host``."""

    scheme: str
    host: str
    port: int | None
    wildcard: bool = False


def _parse(text: str, *, allow_wildcard: bool) -> Pattern | None:
    # Strict on purpose: a browser serialises an origin canonically, so anything
    # else (spaces, a trailing slash, userinfo, a path) is not a browser's origin.
    match = _ORIGIN.fullmatch(text)
    if match is None:
        return None
    wildcard = match["wild"] is not None
    if wildcard and not allow_wildcard:
        return None
    scheme = match["scheme"].lower()
    host = match["host"].lower()
    if wildcard:
        host = host[2:]
    if len(host) > _MAX_HOST:
        return None
    port: int | None = None
    if match["port"] is not None:
        port = int(match["port"])
        if not 1 <= port <= 65535:
            return None
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    return Pattern(scheme, host, port, wildcard)


def parse_origin(origin: str) -> Pattern | None:
    """An Origin header value, normalised; ``None`` if it is malformed (or ``null``)."""
    return _parse(origin, allow_wildcard=False)


def parse_patterns(entries: Sequence[str]) -> list[Pattern | None]:
    """Parse ``allowed_origins`` entries; ``None`` stands for the ``*`` entry.

    Raises:
        ValueError: naming the first entry that is not a valid origin pattern.
    """
    parsed: list[Pattern | None] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"allowed_origins entry {entry!r} is not a string")
        if entry == "*":
            parsed.append(None)
            continue
        pattern = _parse(entry, allow_wildcard=True)
        if pattern is None:
            raise ValueError(
                f"allowed_origins entry {entry!r} is not an origin: expected "
                "scheme://host[:port], scheme://*.domain[:port] or *"
            )
        if pattern.wildcard and pattern.host.rsplit(".", 1)[-1].isdigit():
            # "*.0.0.1" would match the address 127.0.0.1: wildcards are for names.
            raise ValueError(f"allowed_origins entry {entry!r}: a wildcard needs a domain name")
        parsed.append(pattern)
    return parsed


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """One app's origin rules, built once from its settings.

    ``restricted`` is False when the app sets no list: every origin is allowed.
    """

    restricted: bool = False
    reject_missing: bool = False
    allow_any: bool = False
    exact: frozenset[tuple[str, str, int | None]] = frozenset()
    #: (scheme, "." + domain, port) for each wildcard entry.
    wildcards: tuple[tuple[str, str, int | None], ...] = ()

    @classmethod
    def build(cls, allowed: Sequence[str] | None, reject_missing: bool = False) -> OriginPolicy:
        """The policy for an app's ``allowed_origins`` and ``reject_missing_origin``.

        Raises:
            ValueError: an entry is not a valid pattern (see :func:`parse_patterns`).
        """
        if allowed is None:
            return cls()
        patterns = parse_patterns(allowed)
        exact = frozenset(
            (p.scheme, p.host, p.port) for p in patterns if p is not None and not p.wildcard
        )
        wildcards = tuple(
            dict.fromkeys(
                (p.scheme, "." + p.host, p.port) for p in patterns if p is not None and p.wildcard
            )
        )
        return cls(
            restricted=True,
            reject_missing=reject_missing,
            allow_any=any(p is None for p in patterns),
            exact=exact,
            wildcards=wildcards,
        )

    def allows(self, origin: str | None) -> bool:
        """Whether a request with this Origin header (``None``: absent) may proceed."""
        if not self.restricted:
            return True
        if origin is None:
            return not self.reject_missing
        if self.allow_any:
            return True
        return self.allows_cors(origin)

    def allows_cors(self, origin: str) -> bool:
        """Whether ``origin`` is a well-formed origin on the list (CORS may echo it)."""
        if not self.restricted:
            return False
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        if self.allow_any:
            return True
        key = (parsed.scheme, parsed.host, parsed.port)
        if key in self.exact:
            return True
        return any(
            parsed.scheme == scheme and parsed.port == port and parsed.host.endswith(suffix)
            for scheme, suffix, port in self.wildcards
        )
