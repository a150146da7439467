"""The security admin API under ``/api/security`` (``[admin]``).

Off until ``[admin] token`` is set: the listener (:mod:`bastion.server.http`) then
lets every ``/api/security/*`` path fall through to the app routes, which answer
404 like any unknown path. Once on, every call must come from an address in
``allow_from`` (the listener's operator gate: the TCP peer, or the client a
trusted proxy named, see :attr:`~bastion.security.proxies.ClientAddress.operator_ip`),
carry a ``Host`` header naming this server (:attr:`AdminApi.hosts`, the
DNS-rebinding guard: 403 ``host_not_allowed``) **and** carry
``Authorization: Bearer <token>`` (exactly one such header, compared in constant
time). A refused call is a 401 ``admin_unauthorized`` recorded on the refusal
path (counted, audited, scored by IP reputation, a failed authentication that
spends the address's ``auth_failures_per_ip``) and spends the address's REST
token; an authorised call does not. The token is never logged.

Routes (JSON in and out, ``Cache-Control: no-store`` on every answer)::

    GET  openapi.json  the OpenAPI 3.1 document (bastion.api.openapi)
    GET  health        the /readyz checks, always 200
    GET  metrics       the node's counters as JSON (never secrets)
    GET  audit-logs    filtered, paginated audit events
    GET  dashboard     per-app counters, top refusals, active blocks, last events
    GET  report        top refused addresses and reasons, auth failures per minute
    POST block-ip      block an address (ip_blocked_manual)
    POST unblock-ip    lift a block (ip_unblocked)
    GET  config        the effective configuration, every secret redacted
    PUT  config        change it live: a partial document merged over the running
                       configuration, validated, applied without dropping
                       connections (bastion.server.reload), audited

The audit reads are small indexed SQLite reads run synchronously on the loop
(the listener's request handler is synchronous): pages are at most
:data:`MAX_LIMIT` events and ``offset`` at most :data:`MAX_OFFSET`, and the
report's aggregates are ``GROUP BY`` queries over the time index.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

from bastion.api.openapi import openapi_document
from bastion.api.ops import AUTH_FAILURE_SLUGS, NodeCollector, NodeView, Ops
from bastion.api.rest import HttpResponse
from bastion.config import AppSettings, Settings, settings_from_json
from bastion.errors import ConfigError
from bastion.protocol.refusals import Reason
from bastion.security.audit import AuditEvent, parse_time
from bastion.security.hosts import HostPolicy
from bastion.security.proxies import parse_ip, parse_networks
from bastion.security.reputation import Block
from bastion.server.reload import ReloadResult, RestartRequired
from bastion.store import sqlite
from bastion.store.audit import AuditLogError
from bastion.store.audit import query as query_audit

__all__ = [
    "ADMIN_PREFIX",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "MAX_TTL_SECONDS",
    "REDACTED",
    "AdminApi",
    "AdminNodeView",
    "redacted_config",
]

#: Every admin path starts with this.
ADMIN_PREFIX = "/api/security"
#: What replaces every secret in ``GET config``.
REDACTED = "[redacted]"
#: Audit events per page by default, and at most.
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
#: The deepest page: the read is synchronous, so it is bounded.
MAX_OFFSET = 10_000
#: The longest manual block through the API (a year).
MAX_TTL_SECONDS = 365 * 86_400
#: The longest ``reason`` of a manual block.
MAX_REASON_CHARS = 200
_DEFAULT_REASON = "blocked by an operator"
_NO_STORE = (("Cache-Control", "no-store"),)
_DASHBOARD_EVENTS = 20
_TOP = 10
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]*")
_REFUSAL_SLUGS = tuple(sorted({reason.value.slug for reason in Reason}))
_AUDIT_PARAMS = frozenset({"since", "until", "type", "severity", "ip", "app", "limit", "offset"})


class AdminNodeView(NodeView, Protocol):
    """What the admin API reads from a node, beyond :class:`~bastion.api.ops.NodeView`."""

    @property
    def blocklist(self) -> Any: ...  # NodeBlockList: active_blocks, block_manual, unblock_manual

    def apply_config(self, settings: Settings) -> ReloadResult:
        """Apply ``settings`` live (``PUT config``); raises RestartRequired or ConfigError."""
        ...

    def reload_failed(self, source: Literal["api"], fields: list[str]) -> None:
        """Count, log and audit a change that did not validate (field names only)."""
        ...


class _BadRequest(Exception):
    """A parameter or body field is invalid; the message never echoes its value."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


def _json(value: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    body = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return HttpResponse(status, body, headers=_NO_STORE + headers)


def _error(status: int, slug: str, message: str, **extra: Any) -> HttpResponse:
    return _json({"error": message, "reason": slug, **extra}, status)


# --- redaction ----------------------------------------------------------------------


def _redact_url(value: str) -> str:
    """``value`` with the password of a ``scheme://user:password@host`` URL replaced
    (a user part without a password is replaced whole)."""
    if "://" not in value or "@" not in value:
        return value
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return REDACTED  # unparsable: it may hold anything
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return value
    if password is None:
        # ``redis://token@host``: a lone user part may well be the credential.
        return urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}"))
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{host}"))


def _redact(value: Any, dumped: Any) -> Any:
    """``dumped`` (``value``'s JSON dump) with every secret in ``value`` redacted."""
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, BaseModel):
        assert isinstance(dumped, dict)
        return {name: _redact(getattr(value, name, None), item) for name, item in dumped.items()}
    if isinstance(value, (list, tuple)) and isinstance(dumped, list):
        return [_redact(v, d) for v, d in zip(value, dumped, strict=True)]
    if isinstance(value, Mapping) and isinstance(dumped, dict):
        return {key: _redact(value.get(key), item) for key, item in dumped.items()}
    if isinstance(dumped, str):
        return _redact_url(dumped)
    return dumped


def redacted_config(settings: Settings) -> dict[str, Any]:
    """The effective configuration as JSON values with every secret replaced.

    ``SecretStr`` fields (app secrets, retiring secrets, JWT keys, the cluster
    secret, the metrics and admin tokens) become :data:`REDACTED`, and so does the
    password of any URL (the Redis URL, a webhook URL with credentials).
    """
    result = _redact(settings, settings.model_dump(mode="json"))
    assert isinstance(result, dict)
    return result


# --- views ----------------------------------------------------------------------------


def _block_json(block: Block) -> dict[str, Any]:
    return {
        "ip": block.ip,
        "until": block.until,
        "reason": block.reason,
        "source": block.source,
        "created": block.created,
    }


def _event_json(event: AuditEvent) -> dict[str, Any]:
    return asdict(event)


def _counters(node: NodeView) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every ``bastion_*`` family's samples, read through the Prometheus collector."""
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in NodeCollector(node).collect():
        name = family.name.removeprefix("bastion_")
        families[name] = [
            (dict(sample.labels), sample.value)
            for sample in family.samples
            if not sample.name.endswith("_created")
        ]
    return families


def _by(samples: Iterable[tuple[dict[str, str], float]], label: str) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for labels, value in samples:
        totals[labels.get(label, "")] += int(value)
    return dict(sorted(totals.items()))


def _total(samples: Iterable[tuple[dict[str, str], float]]) -> int:
    return sum(int(value) for _, value in samples)


#: The per-app figures of ``apps`` in ``metrics`` and ``dashboard``, by counter family.
_PER_APP = (
    ("connections", "connections_current"),
    ("connections_opened", "connections_opened"),
    ("messages_in", "messages_in"),
    ("events_published", "events_published"),
    ("refusals", "refusals"),
)


def _per_app(families: Mapping[str, list[tuple[dict[str, str], float]]]) -> dict[str, Any]:
    """Each configured app's counters (``{app_id: {figure: count}}``), zeros included.

    The app ids are the collector's labels: configured ids only (``""`` gathers what
    belongs to no app, and is left out).
    """
    columns = {name: _by(families.get(family, []), "app") for name, family in _PER_APP}
    ids = sorted({app for column in columns.values() for app in column} - {""})
    return {app: {name: column.get(app, 0) for name, column in columns.items()} for app in ids}


# --- the API --------------------------------------------------------------------------


class AdminApi:
    """Answers ``/api/security/*`` for one node.

    Args:
        node: the running node.
        ops: the node's operations endpoints (readiness checks).
        wall_clock: Unix seconds (audit ranges, block expiry).
    """

    def __init__(
        self, node: AdminNodeView, ops: Ops, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.node = node
        self.ops = ops
        self.wall_clock = wall_clock
        settings = node.settings.admin
        self._allow_from = parse_networks(settings.allow_from)
        #: The ``Host`` values an admin or dashboard request may carry.
        self.hosts = HostPolicy(node.settings.server.host, settings.allowed_hosts)
        # Bytes once: compare_digest refuses non-ASCII str, and a header may carry any.
        self._token = (
            settings.token.get_secret_value().encode("utf-8")
            if settings.token is not None
            else None
        )
        self._document: bytes | None = None
        self._routes: dict[str, dict[str, Callable[[Mapping[str, str], bytes], HttpResponse]]] = {
            "openapi.json": {"GET": self._openapi},
            "health": {"GET": self._health},
            "metrics": {"GET": self._metrics},
            "audit-logs": {"GET": self._audit_logs},
            "dashboard": {"GET": self._dashboard},
            "report": {"GET": self._report},
            "block-ip": {"POST": self._block_ip},
            "unblock-ip": {"POST": self._unblock_ip},
            "config": {"GET": self._config, "PUT": self._put_config},
        }

    @property
    def enabled(self) -> bool:
        """Whether the admin API answers at all (a token is configured)."""
        return self._token is not None

    def peer_allowed(self, address: str | None) -> bool:
        """Whether the API is on and ``address`` is in ``allow_from``.

        The network half of :meth:`authorized`, and all the dashboard page needs
        besides the ``Host`` check: the page is a login form, its data calls carry
        the token.

        Args:
            address: the address the operator gate decides on (the TCP peer, or the
                client a trusted proxy named; ``None``: none).
        """
        if self._token is None:
            return False
        parsed = parse_ip(address) if address else None
        return parsed is not None and any(parsed in net for net in self._allow_from)

    def authorized(self, address: str | None, authorization: Sequence[str]) -> bool:
        """Whether a request may use the admin API.

        Args:
            address: the address the operator gate decides on (see
                :meth:`peer_allowed`).
            authorization: every ``Authorization`` header value; more than one is
                refused, as an ambiguous request.
        """
        token = self._token
        if token is None or not self.peer_allowed(address):
            return False
        if len(authorization) != 1:
            return False
        scheme, _, credentials = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode("utf-8"), token)

    def handle(self, method: str, path: str, query: str, body: bytes) -> HttpResponse:
        """Answer an authorised request for ``path`` (which starts with the prefix)."""
        name = path[len(ADMIN_PREFIX) :].removeprefix("/")
        methods = self._routes.get(name)
        if methods is None:
            return _error(404, Reason.PATH_NOT_FOUND.value.slug, "No such admin route")
        handler = methods.get(method)
        if handler is None:
            return _json(
                {"error": "Method not allowed", "reason": Reason.HTTP_METHOD.value.slug},
                405,
                headers=(("Allow", ", ".join(sorted(methods))),),
            )
        try:
            params = _params(query)
            return handler(params, body)
        except _BadRequest as bad:
            return _error(
                400, Reason.HTTP_INVALID_FIELD.value.slug, bad.message, parameter=bad.parameter
            )

    # --- GET routes -------------------------------------------------------------------

    def _openapi(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        if self._document is None:
            self._document = json.dumps(openapi_document(), sort_keys=True).encode()
        return HttpResponse(200, self._document, headers=_NO_STORE)

    def _health(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        checks = self.ops.checks()
        return _json({"ready": all(v == "ok" for v in checks.values()), "checks": checks})

    def summary(self) -> dict[str, Any]:
        """The node's counters as JSON (labels are app ids and slugs, never secrets)."""
        node = self.node
        c = _counters(node)
        bus_connected: bool | None = None
        if node.settings.adapter.driver == "redis":
            bus_connected = _total(c.get("bus_connected", [])) > 0
        audit = node.audit
        return {
            "connections": _by(c["connections_current"], "app"),
            "connections_opened": _by(c["connections_opened"], "app"),
            "apps": _per_app(c),
            "messages_in": _total(c["messages_in"]),
            "events_published": _total(c["events_published"]),
            "deliveries": _total(c["deliveries"]),
            "refusals": {
                "by_reason": _by(c["refusals"], "reason"),
                "by_app": _by(c["refusals"], "app"),
            },
            "auth_failures": _total(c["auth_failures"]),
            "rate_limit_hits": _total(c["rate_limit_hits"]),
            "blocked_ips": _total(c.get("blocked_ips", [])),
            "webhooks": {
                "delivered": _total(c["webhooks_delivered"]),
                "attempts_failed": _total(c["webhook_attempts_failed"]),
                "dead": _total(c["webhooks_dead"]),
                "dropped": _total(c["webhooks_dropped"]),
                "queue_pending": _total(c["webhook_queue_pending"]),
                "in_flight": _total(c["webhooks_in_flight"]),
            },
            "bus": {
                "driver": node.settings.adapter.driver,
                "connected": bus_connected,
                "connects": _total(c["bus_connects"]),
                "published": _total(c["bus_published"]),
                "received": _total(c["bus_received"]),
                "dropped": _by(c["bus_dropped"], "reason"),
                "forged": _by(c["bus_forged"], "reason"),
            },
            "audit": {
                "enabled": audit is not None,
                "dropped": audit.dropped if audit is not None else 0,
                "failed": audit.failed if audit is not None else 0,
            },
        }

    def _metrics(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        _only(params, ())
        return _json(self.summary())

    def _audit_path(self) -> str | None:
        settings = self.node.settings.audit
        return settings.path if settings.enabled else None

    def _audit_logs(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        _only(params, _AUDIT_PARAMS)
        now = self.wall_clock()
        since = _time(params, "since", now)
        until = _time(params, "until", now)
        limit = _int(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = _int(params, "offset", 0, 0, MAX_OFFSET)
        severity = _word(params, "severity")
        if severity is not None and severity not in ("info", "warning"):
            raise _BadRequest("severity", "severity must be info or warning")
        ip = params.get("ip")
        if ip is not None:
            ip = _address(ip, "ip")
        type_, app_id = _word(params, "type"), _word(params, "app")
        path = self._audit_path()
        if path is None:
            return _error(503, "audit_disabled", "The audit log is off ([audit] enabled)")
        events = self._query(
            path,
            since=since,
            until=until,
            type=type_,
            severity=severity,
            ip=ip,
            app_id=app_id,
            limit=offset + limit + 1,
        )
        page = events[offset : offset + limit]
        more = len(events) > offset + limit
        return _json(
            {
                "events": [_event_json(event) for event in page],
                "limit": limit,
                "offset": offset,
                "next_offset": offset + limit if more else None,
            }
        )

    def _query(self, path: str, **filters: Any) -> list[AuditEvent]:
        try:
            return query_audit(path, **filters)
        except AuditLogError:
            # Not written yet (no event since start) or unreadable: nothing to show.
            return []

    def _dashboard(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        _only(params, ())
        summary = self.summary()
        reasons = Counter(summary["refusals"]["by_reason"])
        path = self._audit_path()
        recent = self._query(path, limit=_DASHBOARD_EVENTS) if path is not None else []
        checks = self.ops.checks()
        return _json(
            {
                "ready": all(v == "ok" for v in checks.values()),
                "connections": summary["connections"],
                "apps": summary["apps"],
                "counters": {
                    name: summary[name]
                    for name in (
                        "messages_in",
                        "events_published",
                        "deliveries",
                        "auth_failures",
                        "rate_limit_hits",
                    )
                }
                | {"refusals": sum(reasons.values())},
                "top_refusals": [
                    {"reason": reason, "count": count}
                    for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[
                        :_TOP
                    ]
                ],
                "blocks": [_block_json(block) for block in self._blocks()],
                "recent_events": [_event_json(event) for event in recent],
                "audit": path is not None,
            }
        )

    def _blocks(self) -> list[Block]:
        blocklist = self.node.blocklist
        if blocklist is None:
            return []
        blocks: list[Block] = blocklist.active_blocks()
        return blocks

    def _report(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        _only(params, ("since", "until"))
        now = self.wall_clock()
        since = _time(params, "since", now)
        if since is None:
            since = now - 3600.0
        until = _time(params, "until", now)
        if until is None:
            until = now
        if until < since:
            raise _BadRequest("until", "until must not be before since")
        path = self._audit_path()
        top_ips: list[dict[str, Any]] = []
        top_reasons: list[dict[str, Any]] = []
        auth_failures = 0
        if path is not None:
            top_ips, top_reasons, auth_failures = _aggregate(path, since, until)
        minutes = max((until - since) / 60.0, 1.0 / 60.0)
        return _json(
            {
                "since": since,
                "until": until,
                "top_ips": top_ips,
                "top_reasons": top_reasons,
                "auth_failures": auth_failures,
                "auth_failures_per_minute": round(auth_failures / minutes, 4),
                "audit": path is not None,
            }
        )

    def _config(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        _only(params, ())
        return _json(redacted_config(self.node.settings))

    # --- changes ------------------------------------------------------------------------

    def _put_config(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        """Merge a partial configuration over the running one and apply it live.

        A secret given as :data:`REDACTED` (or a URL whose password is redacted, as
        ``GET config`` shows them) keeps the running value, so GET, edit, PUT works.
        Only this process changes: with several workers or nodes, edit the file and
        send SIGHUP instead.
        """
        node = self.node
        try:
            _only(params, ())
            document = _config_document(body)
            merged = _merge_config(document, _plain(node.settings.model_dump()), Settings, "")
        except _BadRequest as bad:
            node.reload_failed("api", [bad.parameter])
            raise
        try:
            settings = settings_from_json(json.dumps(merged))
        except ConfigError as exc:
            fields = list(exc.fields)
            node.reload_failed("api", fields)
            return _invalid_config(exc, fields)
        try:
            result = node.apply_config(settings)
        except RestartRequired as exc:  # counted and audited by the reload engine
            return _error(
                409,
                "restart_required",
                "These fields change only with a restart: edit the file and restart",
                fields=list(exc.fields),
            )
        except ConfigError as exc:  # a key file that cannot be read; audited likewise
            return _invalid_config(exc, list(exc.fields))
        return _json({"changed": list(result.changed), "closed_connections": result.closed})

    def _block_ip(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        _only(params, ())
        fields = _body(body, required=("ip",), optional=("ttl_seconds", "reason"))
        ip = _address(fields["ip"], "ip")
        ttl = fields.get("ttl_seconds", 3600)
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, (int, float))
            or not math.isfinite(ttl)
            or not 1 <= ttl <= MAX_TTL_SECONDS
        ):
            raise _BadRequest(
                "ttl_seconds", f"ttl_seconds must be a number from 1 to {MAX_TTL_SECONDS}"
            )
        reason = fields.get("reason", _DEFAULT_REASON)
        if (
            not isinstance(reason, str)
            or not 1 <= len(reason) <= MAX_REASON_CHARS
            or not _PRINTABLE.fullmatch(reason)
        ):
            raise _BadRequest(
                "reason", f"reason must be 1 to {MAX_REASON_CHARS} printable characters"
            )
        blocklist = self.node.blocklist
        if blocklist is None:
            return _error(503, "blocklist_unavailable", "The blocklist is not running")
        try:
            block: Block = blocklist.block_manual(ip, float(ttl), reason)
        except ValueError:
            raise _BadRequest("ip", "the address is in security.reputation.never_block") from None
        return _json({"blocked": True, "block": _block_json(block)})

    def _unblock_ip(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        _only(params, ())
        fields = _body(body, required=("ip",), optional=())
        ip = _address(fields["ip"], "ip")
        blocklist = self.node.blocklist
        if blocklist is None:
            return _error(503, "blocklist_unavailable", "The blocklist is not running")
        previous = blocklist.unblock_manual(ip)
        return _json({"unblocked": previous is not None, "ip": ip})


# --- parameters -------------------------------------------------------------------------


def _params(query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, max_num_fields=32)
    except ValueError:
        raise _BadRequest("query", "too many query parameters") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise _BadRequest(name if name in _AUDIT_PARAMS else "query", "repeated parameter")
        params[name] = value
    return params


def _only(params: Mapping[str, str], allowed: Iterable[str]) -> None:
    allowed = frozenset(allowed)
    for name in params:
        if name not in allowed:
            # Never echo an unknown name: it is the client's text.
            raise _BadRequest("query", "unknown query parameter")


def _time(params: Mapping[str, str], name: str, now: float) -> float | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        return parse_time(text, now=now)
    except (ValueError, OverflowError):
        raise _BadRequest(
            name, f"{name} must be a duration (30m, 1h), an ISO 8601 time or Unix seconds"
        ) from None


def _int(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text) or not low <= int(text) <= high:
        raise _BadRequest(name, f"{name} must be an integer from {low} to {high}")
    return int(text)


def _word(params: Mapping[str, str], name: str) -> str | None:
    text = params.get(name)
    if text is None:
        return None
    if not 1 <= len(text) <= 200 or not _PRINTABLE.fullmatch(text):
        raise _BadRequest(name, f"{name} must be 1 to 200 printable characters")
    return text


def _address(value: object, name: str) -> str:
    """A strictly valid IP address (no CIDR, zone, spaces or leading zeros), canonical."""
    if not isinstance(value, str) or not 2 <= len(value) <= 45:
        raise _BadRequest(name, f"{name} must be an IPv4 or IPv6 address")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise _BadRequest(name, f"{name} must be an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise _BadRequest(name, f"{name} must be an IPv4 or IPv6 address")
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
    return str(address)


def _body(body: bytes, *, required: Sequence[str], optional: Sequence[str]) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest("body", "the body must be a JSON object") from None
    if not isinstance(value, dict):
        raise _BadRequest("body", "the body must be a JSON object")
    for name in value:
        if name not in required and name not in optional:
            raise _BadRequest("body", "unknown field in the body")
    for name in required:
        if name not in value:
            raise _BadRequest(name, f"{name} is required")
    return value


def _aggregate(
    path: str, since: float, until: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Top refused addresses and reasons, and the auth failure count, over a range."""
    marks = ", ".join("?" * len(_REFUSAL_SLUGS))
    auth = tuple(sorted(AUTH_FAILURE_SLUGS))
    auth_marks = ", ".join("?" * len(auth))
    where = f"time >= ? AND time < ? AND type IN ({marks})"
    params: list[object] = [since, until, *_REFUSAL_SLUGS]
    try:
        ips = sqlite.read_rows(
            path,
            f"SELECT ip, COUNT(*) AS n FROM audit_events WHERE {where} AND ip IS NOT NULL"  # noqa: S608 - placeholders only
            " GROUP BY ip ORDER BY n DESC, ip LIMIT ?",
            [*params, _TOP],
        )
        reasons = sqlite.read_rows(
            path,
            f"SELECT type, COUNT(*) AS n FROM audit_events WHERE {where}"  # noqa: S608
            " GROUP BY type ORDER BY n DESC, type LIMIT ?",
            [*params, _TOP],
        )
        failures = sqlite.read_rows(
            path,
            "SELECT COUNT(*) FROM audit_events"  # noqa: S608
            f" WHERE time >= ? AND time < ? AND type IN ({auth_marks})",
            [since, until, *auth],
        )
    except sqlite3.Error:
        return [], [], 0
    return (
        [{"ip": ip, "count": int(n)} for ip, n in ips or []],
        [{"reason": reason, "count": int(n)} for reason, n in reasons or []],
        int(failures[0][0]) if failures else 0,
    )


# --- PUT config -------------------------------------------------------------------------


def _config_document(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest("body", "the body must be a JSON object") from None
    if not isinstance(value, dict):
        raise _BadRequest("body", "the body must be a JSON object")
    return value


def _invalid_config(error: ConfigError, fields: list[str]) -> HttpResponse:
    return _error(400, "invalid_config", f"Invalid configuration: {error}", fields=fields)


def _plain(value: Any) -> Any:
    """A settings dump as JSON values, secrets in clear (never leaves the process)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _table(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (``X``, ``X | None``), if it is one."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _merge_config(
    patch: dict[str, Any], current: dict[str, Any], model: type[BaseModel], path: str
) -> dict[str, Any]:
    """``patch`` over ``current``: tables merge key by key, apps by id, the rest replace."""
    merged = dict(current)
    for key, value in patch.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            # Never echo the client's key: name the table it was found in.
            raise _BadRequest(path or "body", f"unknown field in {path or 'the body'}")
        where = f"{path}.{key}" if path else key
        old = current.get(key)
        table = _table(field.annotation)
        if where == "apps" and isinstance(value, list) and isinstance(old, list):
            merged[key] = _merge_apps(value, old)
        elif table is not None and isinstance(value, dict) and isinstance(old, dict):
            merged[key] = _merge_config(value, old, table, where)
        else:
            merged[key] = _keep_secrets(value, old, where)
    return merged


def _merge_apps(items: list[Any], current: list[Any]) -> list[Any]:
    """Apps match by ``id``: a known one merges over the running app, a new one is whole."""
    by_id = {app["id"]: app for app in current if isinstance(app, dict)}
    merged = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise _BadRequest(f"apps.{index}", f"apps.{index} must be a JSON object")
        app_id = item.get("id")
        old = by_id.get(app_id) if isinstance(app_id, str) else None
        merged.append(_merge_config(item, old or {}, AppSettings, f"apps.{index}"))
    return merged


def _keep_secrets(value: Any, current: Any, path: str) -> Any:
    """``value`` with each redacted placeholder replaced by the running value it hides."""
    if value == REDACTED:
        if isinstance(current, str) and current:
            return current
        raise _BadRequest(path, f"{path}: a redacted placeholder with no current value to keep")
    if isinstance(value, str) and isinstance(current, str):
        return current if value != current and value == _redact_url(current) else value
    if isinstance(value, dict):
        old = current if isinstance(current, dict) else {}
        return {
            key: _keep_secrets(item, old.get(key), f"{path}.{key}") for key, item in value.items()
        }
    if isinstance(value, list):
        # By position, and only when the list kept its length: after a removal a
        # placeholder could otherwise keep another entry's secret.
        same = isinstance(current, list) and len(current) == len(value)
        return [
            _keep_secrets(item, current[index] if same else None, f"{path}.{index}")
            for index, item in enumerate(value)
        ]
    return value
