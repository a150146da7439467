"""The pusher-js recovery add-on, served at ``/bastion/recovery.js``.

The same file as the npm package ``clients/js/bastion-recovery.js`` (a test holds
the two byte for byte), so a page can load it from the Bastion it talks to::

    <script src="https://ws.example.com/bastion/recovery.js"></script>
    <script>BastionRecovery.withRecovery(new Pusher("app-key", {...}))</script>

Public and static: anyone may fetch it (it holds nothing of the server's), each
request spends the address's REST token like any unauthenticated path, and the
answer may be cached by browsers and shared caches for an hour and loaded from
any origin (a ``<script type="module">`` or ``crossorigin`` load needs CORS).
"""

from __future__ import annotations

import functools
from importlib import resources

from bastion.api.http import HttpResponse

__all__ = ["ADDON_PATH", "HEADERS", "METHODS", "addon_response"]

#: Where the add-on is served.
ADDON_PATH = "/bastion/recovery.js"
#: The methods answered; anything else is 405.
METHODS = frozenset({"GET", "HEAD"})
#: Cached for an hour by anyone, loadable from any origin, never sniffed as anything else.
HEADERS: tuple[tuple[str, str], ...] = (
    ("Cache-Control", "public, max-age=3600"),
    ("X-Content-Type-Options", "nosniff"),
    ("Access-Control-Allow-Origin", "*"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
)
_FILE = "bastion-recovery.js"


@functools.cache
def _read() -> bytes:
    """The shipped file's bytes, read once."""
    return resources.files(__name__).joinpath(_FILE).read_bytes()


def addon_response() -> HttpResponse:
    """The add-on (a HEAD gets the same headers, no body: the listener drops it)."""
    return HttpResponse(
        200, _read(), content_type="text/javascript; charset=utf-8", headers=HEADERS
    )
