"""The OpenAPI 3.1 document of the security admin API (``GET /api/security/openapi.json``).

Built once as a plain dict (:func:`openapi_document`); the admin API serves it as
JSON, behind the same bearer token as every other admin route. The schemas
describe exactly what :mod:`bastion.api.admin` answers: the integration tests run
schemathesis against the served document.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

__all__ = ["OPENAPI_VERSION", "openapi_document"]

OPENAPI_VERSION = "3.1.0"

_JSON = "application/json"

_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error", "reason"],
    "properties": {
        "error": {"type": "string", "description": "What went wrong, for a person."},
        "reason": {"type": "string", "description": "A stable slug (docs/errors.md)."},
        "parameter": {
            "type": "string",
            "description": "The query parameter or body field at fault (400 only).",
        },
        "fields": {
            "type": "array",
            "items": {"type": "string"},
            "description": "`PUT config`: the field paths at fault (400), or those that"
            " need a restart (409). Never their values.",
        },
    },
}

_COUNTS: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "integer"}}
_NULLABLE_STRING: dict[str, Any] = {"type": ["string", "null"]}

_APPS: dict[str, Any] = {
    "type": "object",
    "description": "Per configured app id: connections open now and counters since start.",
    "additionalProperties": {
        "type": "object",
        "required": [
            "connections",
            "connections_opened",
            "messages_in",
            "events_published",
            "refusals",
        ],
        "properties": {
            "connections": {"type": "integer"},
            "connections_opened": {"type": "integer"},
            "messages_in": {"type": "integer", "description": "Client frames received."},
            "events_published": {"type": "integer", "description": "REST publishes."},
            "refusals": {"type": "integer"},
        },
    },
}

_BLOCK: dict[str, Any] = {
    "type": "object",
    "required": ["ip", "until", "reason", "source", "created"],
    "properties": {
        "ip": {"type": "string"},
        "until": {"type": "number", "description": "Unix seconds at which the block ends."},
        "reason": {"type": "string"},
        "source": {"type": "string", "enum": ["auto", "manual"]},
        "created": {"type": "number"},
    },
}

_ALERT: dict[str, Any] = {
    "type": "object",
    "required": [
        "alert",
        "severity",
        "count",
        "threshold",
        "window_seconds",
        "raised_at",
        "until",
        "top_addresses",
        "top_reasons",
    ],
    "properties": {
        "alert": {"type": "string", "description": "The rule ([alerts.<rule>])."},
        "severity": {"type": "string", "enum": ["info", "warning", "critical"]},
        "count": {"type": "integer", "description": "Events in the window when raised."},
        "threshold": {"type": "integer"},
        "window_seconds": {"type": "number"},
        "raised_at": {"type": "number", "description": "Unix seconds."},
        "until": {"type": "number", "description": "Unix seconds at which it re-arms."},
        "top_addresses": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["ip", "count"],
                "properties": {"ip": {"type": "string"}, "count": {"type": "integer"}},
            },
        },
        "top_reasons": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["reason", "count"],
                "properties": {"reason": {"type": "string"}, "count": {"type": "integer"}},
            },
        },
    },
}

_EVENT: dict[str, Any] = {
    "type": "object",
    "required": [
        "id",
        "time",
        "type",
        "severity",
        "ip",
        "app_id",
        "socket_id",
        "user_id",
        "message",
        "metadata",
    ],
    "properties": {
        "id": {"type": "string"},
        "time": {"type": "number"},
        "type": {"type": "string"},
        "severity": {"type": "string", "enum": ["info", "warning"]},
        "ip": _NULLABLE_STRING,
        "app_id": _NULLABLE_STRING,
        "socket_id": _NULLABLE_STRING,
        "user_id": _NULLABLE_STRING,
        "message": {"type": "string"},
        "metadata": {"type": "object"},
    },
}

_READINESS: dict[str, Any] = {
    "type": "object",
    "required": ["ready", "checks"],
    "properties": {
        "ready": {"type": "boolean"},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

_METRICS: dict[str, Any] = {
    "type": "object",
    "required": [
        "connections",
        "connections_opened",
        "apps",
        "messages_in",
        "events_published",
        "deliveries",
        "refusals",
        "auth_failures",
        "rate_limit_hits",
        "blocked_ips",
        "webhooks",
        "bus",
        "audit",
    ],
    "properties": {
        "connections": {**_COUNTS, "description": "Open WebSocket connections per app id."},
        "connections_opened": _COUNTS,
        "apps": _APPS,
        "messages_in": {"type": "integer"},
        "events_published": {"type": "integer"},
        "deliveries": {"type": "integer"},
        "refusals": {
            "type": "object",
            "required": ["by_reason", "by_app"],
            "properties": {"by_reason": _COUNTS, "by_app": _COUNTS},
        },
        "auth_failures": {"type": "integer"},
        "rate_limit_hits": {"type": "integer"},
        "blocked_ips": {"type": "integer"},
        "webhooks": {
            "type": "object",
            "required": [
                "delivered",
                "attempts_failed",
                "dead",
                "dropped",
                "queue_pending",
                "in_flight",
            ],
            "additionalProperties": {"type": "integer"},
        },
        "bus": {
            "type": "object",
            "required": [
                "driver",
                "connected",
                "connects",
                "published",
                "received",
                "dropped",
                "forged",
            ],
            "properties": {
                "driver": {"type": "string", "enum": ["local", "redis"]},
                "connected": {"type": ["boolean", "null"]},
                "connects": {"type": "integer"},
                "published": {"type": "integer"},
                "received": {"type": "integer"},
                "dropped": _COUNTS,
                "forged": _COUNTS,
            },
        },
        "audit": {
            "type": "object",
            "required": ["enabled", "dropped", "failed"],
            "properties": {
                "enabled": {"type": "boolean"},
                "dropped": {"type": "integer"},
                "failed": {"type": "integer"},
            },
        },
    },
}

_COUNTED: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["count"],
        "properties": {
            "ip": {"type": "string"},
            "reason": {"type": "string"},
            "count": {"type": "integer"},
        },
    },
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


def _responses(ok: dict[str, Any], *extra: str) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok}
    texts = {
        "400": "A query parameter or body field is invalid (named in `parameter`).",
        "501": "Not implemented yet.",
        "503": "The audit log or blocklist is off on this node.",
    }
    for status in extra:
        responses[status] = _error(texts[status])
    responses["401"] = _error(
        "No valid bearer token, or the TCP peer is not in `[admin] allow_from`"
        " (`admin_unauthorized`)."
    )
    responses["429"] = _error("Too many refused requests from this address (`ip_rate_limited`).")
    return responses


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_TIME = "A duration back from now (`30m`, `1h`, `2d`, `1w`), an ISO 8601 time, or Unix seconds."


def _build() -> dict[str, Any]:
    ip_body = {"type": "string", "description": "An IPv4 or IPv6 address (no CIDR, no zone)."}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Bastion security admin API",
            "version": "1",
            "description": (
                "Operator API of one Bastion node. Off until `[admin] token` is set (every"
                " path answers 404 then). Every call must come from a TCP peer in"
                " `[admin] allow_from` and carry `Authorization: Bearer <token>`;"
                " anything else is 401 `admin_unauthorized`, counted, audited and scored"
                " by IP reputation. Every answer is JSON with `Cache-Control: no-store`."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": {
            "/api/security/openapi.json": {
                "get": {
                    "operationId": "getOpenApi",
                    "summary": "This document (the bearer token is required here too).",
                    "responses": _responses(_json("The OpenAPI document.", {"type": "object"})),
                }
            },
            "/api/security/health": {
                "get": {
                    "operationId": "getHealth",
                    "summary": "The readiness checks of /readyz; 200 whether ready or not.",
                    "responses": _responses(_json("The checks.", _ref("Readiness"))),
                }
            },
            "/api/security/metrics": {
                "get": {
                    "operationId": "getMetrics",
                    "summary": "The node's counters as JSON (never a secret or address).",
                    "responses": _responses(_json("The counters.", _ref("Metrics")), "400"),
                }
            },
            "/api/security/audit-logs": {
                "get": {
                    "operationId": "getAuditLogs",
                    "summary": "Audit events, newest first, filtered and paginated.",
                    "parameters": [
                        _query("since", "Events at or after. " + _TIME, {"type": "string"}),
                        _query("until", "Events before. " + _TIME, {"type": "string"}),
                        _query(
                            "type",
                            "Event type (a refusal slug, ip_blocked_manual…).",
                            {"type": "string"},
                        ),
                        _query(
                            "severity",
                            "Event severity.",
                            {"type": "string", "enum": ["info", "warning"]},
                        ),
                        _query("ip", "Client address.", {"type": "string"}),
                        _query("app", "App id.", {"type": "string"}),
                        _query(
                            "limit",
                            "Events per page.",
                            {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
                        ),
                        _query(
                            "offset",
                            "Events to skip.",
                            {"type": "integer", "minimum": 0, "maximum": 10000, "default": 0},
                        ),
                    ],
                    "responses": _responses(
                        _json("One page of events.", _ref("AuditPage")), "400", "503"
                    ),
                }
            },
            "/api/security/dashboard": {
                "get": {
                    "operationId": "getDashboard",
                    "summary": "What the /dashboard page shows: connections and counters"
                    " per app, totals, top refusals, active blocks, the last 20 audit events.",
                    "responses": _responses(_json("The dashboard.", _ref("Dashboard")), "400"),
                }
            },
            "/api/security/report": {
                "get": {
                    "operationId": "getReport",
                    "summary": "Top refused addresses and reasons, and auth failures, over a"
                    " range of the audit log.",
                    "parameters": [
                        _query("since", "Range start (default 1h). " + _TIME, {"type": "string"}),
                        _query("until", "Range end (default now). " + _TIME, {"type": "string"}),
                    ],
                    "responses": _responses(_json("The report.", _ref("Report")), "400"),
                }
            },
            "/api/security/block-ip": {
                "post": {
                    "operationId": "blockIp",
                    "summary": "Block an address now on this node and, through the"
                    " blocks file, on every node sharing it (audited ip_blocked_manual).",
                    "requestBody": {
                        "required": True,
                        "content": {
                            _JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["ip"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "ip": ip_body,
                                        "ttl_seconds": {
                                            "type": "number",
                                            "minimum": 1,
                                            "maximum": 31536000,
                                            "default": 3600,
                                        },
                                        "reason": {
                                            "type": "string",
                                            "minLength": 1,
                                            "maxLength": 200,
                                            "default": "blocked by an operator",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": _responses(
                        _json(
                            "The block in force.",
                            {
                                "type": "object",
                                "required": ["blocked", "block"],
                                "properties": {
                                    "blocked": {"type": "boolean"},
                                    "block": _ref("Block"),
                                },
                            },
                        ),
                        "400",
                        "503",
                    ),
                }
            },
            "/api/security/unblock-ip": {
                "post": {
                    "operationId": "unblockIp",
                    "summary": "Lift the block of an address (audited ip_unblocked).",
                    "requestBody": {
                        "required": True,
                        "content": {
                            _JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["ip"],
                                    "additionalProperties": False,
                                    "properties": {"ip": ip_body},
                                }
                            }
                        },
                    },
                    "responses": _responses(
                        _json(
                            "Whether a block was lifted on this node.",
                            {
                                "type": "object",
                                "required": ["unblocked", "ip"],
                                "properties": {
                                    "unblocked": {"type": "boolean"},
                                    "ip": {"type": "string"},
                                },
                            },
                        ),
                        "400",
                        "503",
                    ),
                }
            },
            "/api/security/config": {
                "get": {
                    "operationId": "getConfig",
                    "summary": "The effective configuration; every secret, token and URL"
                    " password is `[redacted]`.",
                    "responses": _responses(_json("The configuration.", {"type": "object"}), "400"),
                },
                "put": {
                    "operationId": "putConfig",
                    "summary": "Change the configuration live, without dropping connections.",
                    "description": "The body is a partial configuration document (the shape"
                    " `GET config` returns) merged over the running one: tables merge key by"
                    " key, apps match by `id` (an app left out of `apps` is removed), other"
                    " values replace. A `[redacted]` secret, or a URL whose password is"
                    " `[redacted]`, keeps the running value. Validated like the file; every"
                    " attempt is audited (`config_changed`, `config_change_refused`). Only the"
                    " answering process changes: with several workers or nodes, edit the file"
                    " and send SIGHUP instead.",
                    "requestBody": {
                        "required": True,
                        "content": {_JSON: {"schema": {"type": "object"}}},
                    },
                    "responses": {
                        "200": _json(
                            "Applied (an empty `changed`: nothing differed).",
                            {
                                "type": "object",
                                "required": ["changed", "closed_connections"],
                                "properties": {
                                    "changed": {
                                        "type": "array",
                                        "items": {"type": "string"},
                                        "description": "Field paths applied (`+apps.ID` added,"
                                        " `-apps.ID` removed).",
                                    },
                                    "closed_connections": {
                                        "type": "integer",
                                        "description": "Connections closed because their app"
                                        " was removed (4001) or disabled (4003).",
                                    },
                                },
                            },
                        ),
                        "400": _error(
                            "Not a JSON object, an unknown field (`parameter` names its table),"
                            " or an invalid value (`invalid_config`; `fields` names them)."
                        ),
                        "409": _error(
                            "`restart_required`: some changed fields apply only at a restart"
                            " (named in `fields`); nothing was applied."
                        ),
                        "401": _error("No valid bearer token, or a peer not allowed."),
                        "429": _error("Too many refused requests from this address."),
                    },
                },
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`[admin] token` (32+ characters), on every route"
                    " including this document.",
                }
            },
            "schemas": {
                "Error": _ERROR,
                "Block": _BLOCK,
                "AuditEvent": _EVENT,
                "Alert": _ALERT,
                "Readiness": _READINESS,
                "Metrics": _METRICS,
                "AuditPage": {
                    "type": "object",
                    "required": ["events", "limit", "offset", "next_offset"],
                    "properties": {
                        "events": {"type": "array", "items": _ref("AuditEvent")},
                        "limit": {"type": "integer"},
                        "offset": {"type": "integer"},
                        "next_offset": {"type": ["integer", "null"]},
                    },
                },
                "Dashboard": {
                    "type": "object",
                    "required": [
                        "ready",
                        "connections",
                        "apps",
                        "counters",
                        "top_refusals",
                        "blocks",
                        "recent_events",
                        "alerts",
                        "audit",
                    ],
                    "properties": {
                        "ready": {"type": "boolean"},
                        "connections": _COUNTS,
                        "apps": _APPS,
                        "counters": _COUNTS,
                        "top_refusals": _COUNTED,
                        "blocks": {"type": "array", "items": _ref("Block")},
                        "recent_events": {"type": "array", "items": _ref("AuditEvent")},
                        "alerts": {
                            "type": "array",
                            "items": _ref("Alert"),
                            "description": "Security alerts open now ([alerts]).",
                        },
                        "audit": {"type": "boolean"},
                    },
                },
                "Report": {
                    "type": "object",
                    "required": [
                        "since",
                        "until",
                        "top_ips",
                        "top_reasons",
                        "auth_failures",
                        "auth_failures_per_minute",
                        "audit",
                    ],
                    "properties": {
                        "since": {"type": "number"},
                        "until": {"type": "number"},
                        "top_ips": _COUNTED,
                        "top_reasons": _COUNTED,
                        "auth_failures": {"type": "integer"},
                        "auth_failures_per_minute": {"type": "number"},
                        "audit": {"type": "boolean"},
                    },
                },
            },
        },
    }


@functools.cache
def _document() -> dict[str, Any]:
    return _build()


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the admin API (a fresh copy of the one built once)."""
    return copy.deepcopy(_document())
