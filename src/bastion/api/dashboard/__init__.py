"""The operator dashboard: a static page at ``/dashboard`` over the admin API.

Three files ship inside this package (``index.html``, ``app.js``, ``app.css``);
there is no build step and nothing is fetched from anywhere else. The page is a
login form for the ``[admin] token``: the script keeps the token in
``sessionStorage`` and calls ``/api/security/*`` with it, so the page itself holds
no secret and needs no token to load.

The route table (:mod:`bastion.api.routes`) routes here only when the admin API
is on (``[admin] token`` set) and the request's operator address (the TCP peer,
or the client a trusted proxy named) is in ``[admin] allow_from``; anyone else
gets the 404 of an unknown path. An allowed caller whose ``Host`` header does not
name this server (DNS rebinding) gets 403 ``host_not_allowed``. Only ``GET`` and
``HEAD`` are answered.

Every answer carries :data:`SECURITY_HEADERS` (a refusal too: the dashboard
route adds them to every refusal of its gates): a Content-Security-Policy that
allows only this origin's script, style and ``fetch`` (no inline code at all, no
frames, no form posts), ``nosniff``, no referrer, and ``no-store``.
"""

from __future__ import annotations

import functools
from importlib import resources

from bastion.api.http import HttpResponse

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "DASHBOARD_PATH",
    "METHODS",
    "SECURITY_HEADERS",
    "dashboard_response",
    "is_dashboard_path",
]

#: Where the page lives; its assets are beside it.
DASHBOARD_PATH = "/dashboard"
#: The methods the page answers; anything else is 405.
METHODS = frozenset({"GET", "HEAD"})

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'none'",
    )
)

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
)

#: Request path -> (file in this package, content type).
_FILES: dict[str, tuple[str, str]] = {
    DASHBOARD_PATH: ("index.html", "text/html; charset=utf-8"),
    DASHBOARD_PATH + "/": ("index.html", "text/html; charset=utf-8"),
    DASHBOARD_PATH + "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    DASHBOARD_PATH + "/app.css": ("app.css", "text/css; charset=utf-8"),
}


def is_dashboard_path(path: str) -> bool:
    """Whether ``path`` is the page or one of its assets (nothing else under it)."""
    return path in _FILES


@functools.cache
def _read(name: str) -> bytes:
    """A shipped file's bytes, read once."""
    return resources.files(__name__).joinpath(name).read_bytes()


def dashboard_response(method: str, path: str) -> HttpResponse:
    """The page or asset at ``path`` for a ``GET`` or ``HEAD``.

    Args:
        method: ``GET`` or ``HEAD`` (the caller answers other methods 405).
        path: a path for which :func:`is_dashboard_path` is true.
    """
    name, content_type = _FILES[path]
    # The same answer for both: the listener writes a HEAD's headers only, with the
    # Content-Length a GET gets (RFC 9110 9.3.2).
    return HttpResponse(200, _read(name), content_type=content_type, headers=SECURITY_HEADERS)
