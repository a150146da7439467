"""HTTP vocabulary: the request the front door reads, the answers it writes, refusals.

Everything that answers HTTP speaks these few types, whatever it serves:

* :class:`HttpRequest`: one parsed request, as the listener
  (:mod:`bastion.server.http`) hands it to the route table: method, path (still
  URL-encoded), query string, headers, body, the client's address and the
  operator address (:attr:`~bastion.security.proxies.ClientAddress.operator_ip`),
  and ``now``, the Unix time every limit and signature window of this request
  reads.
* :class:`HttpResponse`: status, body, content type and extra headers; the
  listener adds ``Content-Length`` and ``Connection``.
* :class:`Refusal`: a gate's "no", as data: the :class:`~bastion.protocol.refusals.Reason`
  (whose rule gives the status and the JSON body), the headers its answer
  carries (``Allow``, ``WWW-Authenticate``, ``Vary``), or the wait that becomes
  ``Retry-After``. The front door records it once on the refusal path and
  writes :meth:`Refusal.response`.

Errors are JSON: ``{"error": message, "reason": slug}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

from bastion.protocol.codec import encode
from bastion.protocol.refusals import Reason
from bastion.security.limits import retry_after_seconds

__all__ = [
    "NO_STORE",
    "Answer",
    "Headers",
    "HttpRequest",
    "HttpResponse",
    "Refusal",
    "error_response",
    "json_response",
    "query_pairs",
    "rate_limited_response",
]

#: Extra response headers, in the order they are written.
Headers = tuple[tuple[str, str], ...]

#: Operator answers are never cached (admin API, probes, the exposition).
NO_STORE: Headers = (("Cache-Control", "no-store"),)

#: Status code -> reason phrase, looked up once per answer.
_PHRASES = {status.value: status.phrase for status in HTTPStatus}


class HttpRequest(NamedTuple):
    """One request, as the front door's routes, gates and handlers read it.

    Immutable; a named tuple rather than a frozen dataclass because one is made
    for every request and every upgrade, and a frozen dataclass's constructor
    sets each field through ``object.__setattr__`` (about 2.5 times the cost).

    Attributes:
        method: the method, upper case as sent (``GET``).
        path: the path as received, still URL-encoded (signatures cover it so).
        query: the query string without ``?`` (empty when there is none).
        headers: every header in order, names in lower case (as the listener
            collects them: HTTP header names are case-insensitive).
        body: the whole body.
        ip: the client's address (the TCP peer, or the client a trusted proxy
            named); every limit, refusal and audit row uses it.
        operator_ip: the address operator endpoints decide on; ``None``: none.
        now: Unix time, read once for the request.
    """

    method: str
    path: str
    query: str = ""
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    ip: str | None = None
    operator_ip: str | None = None
    now: float = 0.0

    def values(self, name: str) -> list[str]:
        """Every value of the header ``name`` (lower case), in order."""
        return [value for key, value in self.headers if key == name]

    def origin(self) -> str | None:
        """The ``Origin`` header; several of them count as one malformed value (``""``)."""
        values = self.values("origin")
        if not values:
            return None
        return values[0] if len(values) == 1 else ""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A response to write."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Headers = field(default=())

    @property
    def phrase(self) -> str:
        """The reason phrase for the status line."""
        return _PHRASES.get(self.status, "Unknown")

    def encode(self, *, keep_alive: bool, head: bool = False) -> bytes:
        """The bytes on the wire; for a ``HEAD`` (``head``) the headers only.

        RFC 9110 9.3.2: a HEAD answer carries the GET answer's headers, its
        ``Content-Length`` included, and never a body: body bytes would be read as
        the start of the next answer on a kept-alive connection.
        """
        connection = "keep-alive" if keep_alive else "close"
        extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        if self.status == 204:  # RFC 9110 8.6: no Content-Length on a 204
            text = f"HTTP/1.1 204 No Content\r\nConnection: {connection}\r\n{extra}\r\n"
        else:
            text = (
                f"HTTP/1.1 {self.status} {self.phrase}\r\nContent-Type: {self.content_type}\r\n"
                f"Content-Length: {len(self.body)}\r\nConnection: {connection}\r\n{extra}\r\n"
            )
        head_bytes = text.encode("latin-1")
        return head_bytes if head else head_bytes + self.body


def query_pairs(query: str) -> list[tuple[str, str]]:
    """The decoded ``name=value`` pairs of a query string, in order, blanks kept.

    What ``urllib.parse.parse_qsl(query, keep_blank_values=True)`` returns (``&``
    separates, ``+`` is a space, ``%XX`` is UTF-8 with invalid bytes replaced),
    without its generic machinery: a signed REST call reads one per request, and
    the pieces of most need no decoding at all.
    """
    pairs = []
    for piece in query.split("&"):
        if not piece:
            continue
        name, _, value = piece.partition("=")
        if "%" in piece or "+" in piece:
            name, value = unquote_plus(name), unquote_plus(value)
        pairs.append((name, value))
    return pairs


#: A request's answer: now, or later (a REST query waiting for the cluster state).
Answer = HttpResponse | Awaitable[HttpResponse]


def json_response(value: Any, status: int = 200) -> HttpResponse:
    """A JSON response."""
    return HttpResponse(status, encode(value))


def error_response(
    reason: Reason, detail: str | None = None, headers: Headers = ()
) -> HttpResponse:
    """The JSON error body for ``reason``, with any extra ``headers``."""
    rule = reason.value
    return HttpResponse(
        rule.http_status or 400,
        encode({"error": detail or rule.message, "reason": rule.slug}),
        headers=headers,
    )


def rate_limited_response(reason: Reason, wait: float, headers: Headers = ()) -> HttpResponse:
    """The error for a spent bucket, with ``Retry-After`` in whole seconds (at least 1)."""
    return error_response(
        reason, headers=(("Retry-After", str(retry_after_seconds(wait))), *headers)
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """A gate's refusal of a request: what to record and how to answer.

    Attributes:
        reason: the rule that refused it (slug, status, message).
        headers: headers the answer carries (``Allow``, ``WWW-Authenticate``).
        retry_after: seconds until trying again may work: the answer is the rule's
            status with ``Retry-After`` (and without ``headers``).
        app_id: the app the refusal is counted and audited against, if any.
    """

    reason: Reason
    headers: Headers = ()
    retry_after: float | None = None
    app_id: str | None = None

    def response(self, extra: Headers = ()) -> HttpResponse:
        """The answer, with ``extra`` headers after its own (a route's ``no-store``)."""
        if self.retry_after is not None:
            return rate_limited_response(self.reason, self.retry_after, extra)
        return error_response(self.reason, headers=self.headers + extra)
