"""The security admin API under ``/api/security`` (``[admin]``).

Off until ``[admin] token`` is set: the route table (:mod:`bastion.api.routes`)
then has no admin route, and every ``/api/security/*`` path falls through to the
404 of an unknown path. Once on, every call must pass the admin route's gates
(:mod:`bastion.api.gates`), which this class configures: come from an address in
``allow_from`` (:attr:`AdminApi.peers`; the operator address: the TCP peer, or
the client a trusted proxy named, see
:attr:`~bastion.security.proxies.ClientAddress.operator_ip`), carry a ``Host``
header naming this server (:attr:`AdminApi.hosts`, the DNS-rebinding guard: 403
``host_not_allowed``), come from an address whose failed-authentication budget is
not spent, **and** carry ``Authorization: Bearer <token>`` (:attr:`AdminApi.token`:
exactly one such header, compared in constant time). A refused call is a 401
``admin_unauthorized`` recorded on the refusal path (counted, audited, scored by
IP reputation, a failed authentication that spends the address's
``auth_failures_per_ip``) and spends the address's REST token; an authorised call
does not. The token is never logged.

Routes (JSON in and out, ``Cache-Control: no-store`` on every answer)::

    GET  openapi.json  the OpenAPI 3.1 document (bastion.api.openapi)
    GET  health        the /readyz checks, always 200
    GET  metrics       the node's counters as JSON (never secrets)
    GET  audit-logs    filtered, paginated audit events
    GET  dashboard     per-app counters, top refusals, active blocks, last events,
                       open security alerts
    GET  report        top refused addresses and reasons, auth failures per minute
    POST block-ip      block an address (ip_blocked_manual)
    POST unblock-ip    lift a block (ip_unblocked)
    GET  config        the effective configuration, every secret redacted
    PUT  config        change it live: a partial document merged over the running
                       configuration (bastion.api.config_patch), validated,
                       applied without dropping connections (bastion.server.reload),
                       audited

Parameters and bodies are validated by :mod:`bastion.api.admin_params`. The audit
reads (:mod:`bastion.store.audit_reports`) are small indexed SQLite reads run
synchronously on the loop (the front door's handlers are synchronous): pages are
at most :data:`MAX_LIMIT` events and ``offset`` at most :data:`MAX_OFFSET`, and
the report's aggregates are ``GROUP BY`` queries over the time index.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal, Protocol

from bastion.api import admin_counters
from bastion.api.admin_params import (
    AUDIT_PARAMS,
    PRINTABLE,
    BadRequest,
    address,
    int_param,
    json_body,
    only,
    query_params,
    time_param,
    word_param,
)
from bastion.api.config_patch import REDACTED, patched_document, redacted_config
from bastion.api.gates import AllowedPeers, BearerToken
from bastion.api.http import NO_STORE, Headers, HttpResponse
from bastion.api.openapi import openapi_document
from bastion.api.ops import AUTH_FAILURE_SLUGS, NodeView, Ops
from bastion.config import Settings, settings_from_json
from bastion.errors import ConfigError
from bastion.protocol.refusals import Reason
from bastion.security.alerts import Alert
from bastion.security.audit import AuditEvent
from bastion.security.hosts import HostPolicy
from bastion.security.reputation import Block
from bastion.server.reload import ReloadResult, RestartRequired
from bastion.store.audit_reports import events, refusal_report

__all__ = [
    "ADMIN_PREFIX",
    "CHALLENGE",
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
#: RFC 6750: a 401 names the scheme it wants.
CHALLENGE: Headers = (("WWW-Authenticate", 'Bearer realm="bastion-admin"'),)
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
_DASHBOARD_EVENTS = 20
_TOP = 10
_REFUSAL_SLUGS = frozenset(reason.value.slug for reason in Reason)

#: A route's handler: the query's parameters and the body in, the answer out.
_Handler = Callable[[Mapping[str, str], bytes], HttpResponse]


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


def _json(value: Any, status: int = 200, headers: Headers = ()) -> HttpResponse:
    body = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return HttpResponse(status, body, headers=NO_STORE + headers)


def _error(status: int, slug: str, message: str, **extra: Any) -> HttpResponse:
    return _json({"error": message, "reason": slug, **extra}, status)


def _invalid_config(error: ConfigError) -> HttpResponse:
    # The message names fields and never echoes a value (bastion.config).
    fields = list(error.fields)
    return _error(400, "invalid_config", f"Invalid configuration: {error}", fields=fields)


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


def _alert_json(alert: Alert) -> dict[str, Any]:
    found = asdict(alert)
    found["alert"] = found.pop("rule")
    found["top_addresses"] = [{"ip": ip, "count": n} for ip, n in alert.top_addresses]
    found["top_reasons"] = [{"reason": why, "count": n} for why, n in alert.top_reasons]
    return found


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
        #: The addresses calls may come from (``allow_from``); the dashboard's too.
        self.peers = AllowedPeers(settings.allow_from, Reason.ADMIN_UNAUTHORIZED, CHALLENGE)
        #: The ``Host`` values an admin or dashboard request may carry.
        self.hosts = HostPolicy(node.settings.server.host, settings.allowed_hosts)
        #: The bearer token every call carries.
        self.token = BearerToken(settings.token, Reason.ADMIN_UNAUTHORIZED, CHALLENGE)
        self._document: bytes | None = None
        self._routes: dict[str, dict[str, _Handler]] = {
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
        return self.token.configured

    def peer_allowed(self, address: str | None) -> bool:
        """Whether the API is on and ``address`` is in ``allow_from``.

        The network half of :meth:`authorized`, and all the dashboard page needs
        besides the ``Host`` check: the page is a login form, its data calls carry
        the token.

        Args:
            address: the address the operator gate decides on (the TCP peer, or the
                client a trusted proxy named; ``None``: none).
        """
        return self.enabled and self.peers.allows(address)

    def authorized(self, address: str | None, authorization: Sequence[str]) -> bool:
        """Whether a request may use the admin API (the address and the token).

        Args:
            address: the address the operator gate decides on (see
                :meth:`peer_allowed`).
            authorization: every ``Authorization`` header value; more than one is
                refused, as an ambiguous request.
        """
        return self.peer_allowed(address) and self.token.valid(authorization)

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
            return handler(query_params(query), body)
        except BadRequest as bad:
            return _error(
                400, Reason.HTTP_INVALID_FIELD.value.slug, bad.message, parameter=bad.parameter
            )

    def summary(self) -> dict[str, Any]:
        """The node's counters as JSON (labels are app ids and slugs, never secrets)."""
        return admin_counters.summary(self.node)

    # --- GET routes -------------------------------------------------------------------

    def _openapi(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        if self._document is None:
            self._document = json.dumps(openapi_document(), sort_keys=True).encode()
        return HttpResponse(200, self._document, headers=NO_STORE)

    def _health(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        checks = self.ops.checks()
        return _json({"ready": all(v == "ok" for v in checks.values()), "checks": checks})

    def _metrics(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        only(params, ())
        return _json(self.summary())

    def _audit_path(self) -> str | None:
        settings = self.node.settings.audit
        return settings.path if settings.enabled else None

    def _audit_logs(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        only(params, AUDIT_PARAMS)
        now = self.wall_clock()
        since = time_param(params, "since", now)
        until = time_param(params, "until", now)
        limit = int_param(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = int_param(params, "offset", 0, 0, MAX_OFFSET)
        severity = word_param(params, "severity")
        if severity is not None and severity not in ("info", "warning"):
            raise BadRequest("severity", "severity must be info or warning")
        ip = params.get("ip")
        if ip is not None:
            ip = address(ip, "ip")
        type_, app_id = word_param(params, "type"), word_param(params, "app")
        path = self._audit_path()
        if path is None:
            return _error(503, "audit_disabled", "The audit log is off ([audit] enabled)")
        found = events(
            path,
            since=since,
            until=until,
            type=type_,
            severity=severity,
            ip=ip,
            app_id=app_id,
            limit=offset + limit + 1,
        )
        page = found[offset : offset + limit]
        more = len(found) > offset + limit
        return _json(
            {
                "events": [_event_json(event) for event in page],
                "limit": limit,
                "offset": offset,
                "next_offset": offset + limit if more else None,
            }
        )

    def _dashboard(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        only(params, ())
        summary = self.summary()
        reasons = Counter(summary["refusals"]["by_reason"])
        path = self._audit_path()
        recent = events(path, limit=_DASHBOARD_EVENTS) if path is not None else []
        checks = self.ops.checks()
        alerts = getattr(self.node, "alerts", None)
        open_alerts: list[Alert] = alerts.open_alerts() if alerts is not None else []
        counters = ("messages_in", "events_published", "deliveries", "auth_failures")
        return _json(
            {
                "ready": all(v == "ok" for v in checks.values()),
                "connections": summary["connections"],
                "apps": summary["apps"],
                "counters": {name: summary[name] for name in (*counters, "rate_limit_hits")}
                | {"refusals": sum(reasons.values())},
                "top_refusals": [
                    {"reason": reason, "count": count}
                    for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[
                        :_TOP
                    ]
                ],
                "blocks": [_block_json(block) for block in self._blocks()],
                "recent_events": [_event_json(event) for event in recent],
                "alerts": [_alert_json(alert) for alert in open_alerts],
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
        only(params, ("since", "until"))
        now = self.wall_clock()
        since = time_param(params, "since", now)
        if since is None:
            since = now - 3600.0
        until = time_param(params, "until", now)
        if until is None:
            until = now
        if until < since:
            raise BadRequest("until", "until must not be before since")
        path = self._audit_path()
        report = (
            refusal_report(
                path,
                since,
                until,
                refusal_types=_REFUSAL_SLUGS,
                auth_failure_types=AUTH_FAILURE_SLUGS,
                top=_TOP,
            )
            if path is not None
            else None
        )
        auth_failures = report.auth_failures if report is not None else 0
        minutes = max((until - since) / 60.0, 1.0 / 60.0)
        return _json(
            {
                "since": since,
                "until": until,
                "top_ips": report.top_ips if report is not None else [],
                "top_reasons": report.top_reasons if report is not None else [],
                "auth_failures": auth_failures,
                "auth_failures_per_minute": round(auth_failures / minutes, 4),
                "audit": path is not None,
            }
        )

    def _config(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        only(params, ())
        return _json(redacted_config(self.node.settings))

    # --- changes ------------------------------------------------------------------------

    def _put_config(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        """Merge a partial configuration over the running one and apply it live.

        See :mod:`bastion.api.config_patch` for the merge and the redacted secrets.
        Only this process changes: with several workers or nodes, edit the file and
        send SIGHUP instead.
        """
        node = self.node
        try:
            only(params, ())
            merged = patched_document(body, node.settings)
        except BadRequest as bad:
            node.reload_failed("api", [bad.parameter])
            raise
        try:
            settings = settings_from_json(json.dumps(merged))
        except ConfigError as exc:
            node.reload_failed("api", list(exc.fields))
            return _invalid_config(exc)
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
            return _invalid_config(exc)
        return _json({"changed": list(result.changed), "closed_connections": result.closed})

    def _block_ip(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        only(params, ())
        fields = json_body(body, required=("ip",), optional=("ttl_seconds", "reason"))
        ip = address(fields["ip"], "ip")
        ttl = fields.get("ttl_seconds", 3600)
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, (int, float))
            or not math.isfinite(ttl)
            or not 1 <= ttl <= MAX_TTL_SECONDS
        ):
            raise BadRequest(
                "ttl_seconds", f"ttl_seconds must be a number from 1 to {MAX_TTL_SECONDS}"
            )
        reason = fields.get("reason", _DEFAULT_REASON)
        if (
            not isinstance(reason, str)
            or not 1 <= len(reason) <= MAX_REASON_CHARS
            or not PRINTABLE.fullmatch(reason)
        ):
            raise BadRequest(
                "reason", f"reason must be 1 to {MAX_REASON_CHARS} printable characters"
            )
        blocklist = self.node.blocklist
        if blocklist is None:
            return _error(503, "blocklist_unavailable", "The blocklist is not running")
        try:
            block: Block = blocklist.block_manual(ip, float(ttl), reason)
        except ValueError:
            raise BadRequest("ip", "the address is in security.reputation.never_block") from None
        return _json({"blocked": True, "block": _block_json(block)})

    def _unblock_ip(self, params: Mapping[str, str], body: bytes) -> HttpResponse:
        only(params, ())
        fields = json_body(body, required=("ip",), optional=())
        ip = address(fields["ip"], "ip")
        blocklist = self.node.blocklist
        if blocklist is None:
            return _error(503, "blocklist_unavailable", "The blocklist is not running")
        previous = blocklist.unblock_manual(ip)
        return _json({"unblocked": previous is not None, "ip": ip})
