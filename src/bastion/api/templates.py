"""The route template of a request path: a bounded metric label, never the path itself.

``bastion_rest_request_duration_seconds`` is labelled by route, and a path carries
app ids, channel names and user ids that a client chose. :func:`request_route`
maps every path to one of a fixed set of templates (:data:`TEMPLATES`), whatever
it holds, so the label set stays bounded under any traffic. Pure: string work
only, memoised (a REST client sends the same few paths again and again).
"""

from __future__ import annotations

import functools

__all__ = ["PUBLISH_TEMPLATES", "TEMPLATES", "request_route"]

_EVENTS = "/apps/{app_id}/events"
_BATCH = "/apps/{app_id}/batch_events"
_CHANNELS = "/apps/{app_id}/channels"
_CHANNEL = "/apps/{app_id}/channels/{channel}"
_USERS = "/apps/{app_id}/channels/{channel}/users"
_TERMINATE = "/apps/{app_id}/users/{user_id}/terminate_connections"
_TERMINATE_BARE = "/users/{user_id}/terminate_connections"
_APPS_OTHER = "/apps/{app_id}/other"
_ADMIN = "/api/security/{route}"
_DASHBOARD = "/dashboard"
_OTHER = "other"

#: Paths that are their own template.
_FIXED = {
    "/": "/",
    "/up": "/up",
    "/healthz": "/healthz",
    "/readyz": "/readyz",
    "/metrics": "/metrics",
}

#: Every template :func:`request_route` can answer.
TEMPLATES = frozenset(
    {
        *_FIXED.values(),
        _EVENTS,
        _BATCH,
        _CHANNELS,
        _CHANNEL,
        _USERS,
        _TERMINATE,
        _TERMINATE_BARE,
        _APPS_OTHER,
        _ADMIN,
        _DASHBOARD,
        _OTHER,
    }
)
#: The templates that publish events (their answer follows the local fan-out).
PUBLISH_TEMPLATES = frozenset({_EVENTS, _BATCH})


def _app_route(tail: list[str]) -> str:
    """The template of ``/apps/{app_id}/`` followed by ``tail`` (split on ``/``)."""
    if len(tail) == 1:
        if tail[0] == "events":
            return _EVENTS
        if tail[0] == "batch_events":
            return _BATCH
        if tail[0] == "channels":
            return _CHANNELS
    elif tail[0] == "channels" and tail[1]:
        if len(tail) == 2:
            return _CHANNEL
        if len(tail) == 3 and tail[2] == "users":
            return _USERS
    elif len(tail) == 3 and tail[0] == "users" and tail[1] and tail[2] == "terminate_connections":
        return _TERMINATE
    return _APPS_OTHER


#: Paths remembered: a stream of fresh paths only evicts (least recently used).
_MEMO = 4096


@functools.lru_cache(maxsize=_MEMO)
def request_route(path: str) -> tuple[str, str | None]:
    """The template of ``path``, and the app id it names when it publishes events.

    Args:
        path: the request's path (still URL-encoded), without the query.

    Returns:
        A template from :data:`TEMPLATES`, and the ``{app_id}`` segment for the
        templates of :data:`PUBLISH_TEMPLATES` (else ``None``). That id is text
        from the request: use it only once the answer proved the app exists (2xx).
    """
    fixed = _FIXED.get(path)
    if fixed is not None:
        return fixed, None
    if path.startswith("/apps/"):
        parts = path[6:].split("/", 4)
        if len(parts) < 2 or not parts[0]:
            return _APPS_OTHER, None
        template = _app_route(parts[1:])
        return template, parts[0] if template in PUBLISH_TEMPLATES else None
    if path.startswith("/api/security"):
        return _ADMIN, None
    if path.startswith("/dashboard"):
        return _DASHBOARD, None
    if path.startswith("/users/") and path.endswith("/terminate_connections"):
        middle = path[len("/users/") : -len("/terminate_connections")]
        if middle and "/" not in middle:
            return _TERMINATE_BARE, None
    return _OTHER, None
