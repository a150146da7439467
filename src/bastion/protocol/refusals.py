"""Every reason Bastion refuses input, and the one table of what each becomes.

A refusal is answered in exactly one of these ways, picked here and nowhere else:

* ``close``: the WebSocket is closed with a Pusher close code (a ``pusher:error``
  frame with the same code goes first, which helps debugging and is harmless);
* ``error``: a ``pusher:error`` frame with a code; the connection stays open;
* ``subscription``: a ``pusher:subscription_error`` on the channel (soketi-style
  ``{type, error, status}``), which pusher-js re-emits to the app; the connection
  stays open;
* ``http``: an HTTP status with a JSON body ``{"error": message, "reason": slug}``;
* ``recovery``: a ``bastion:recovery`` on the channel answering ``recovered: false``
  with the rule's reason (a bad ``bastion_resume``: the subscribe itself stands,
  and pusher-js sees no error); the connection stays open.

The slug is the metric label and the audit event type; the message names the
rule, never the offending data (which could be a secret or a token).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

__all__ = ["Reason", "RefusalRecord", "Rule"]

Severity = Literal["info", "warning"]


@dataclass(frozen=True, slots=True)
class Rule:
    """What one refusal reason becomes on the wire.

    Attributes:
        slug: stable machine name (metric label, audit type, REST ``reason``).
        message: human-readable text naming the rule.
        close_code: WebSocket close code, when the connection is closed.
        error_code: ``pusher:error`` code, when the connection stays open.
        subscription_type: ``pusher:subscription_error`` type, for channel refusals.
        http_status: HTTP status, for REST and pre-upgrade refusals.
        recovery: the ``reason`` of a ``bastion:recovery`` answering ``false``, for a
            refused resume (the subscribe it came with stands).
        severity: ``warning`` for what looks hostile or broken, ``info`` otherwise.
    """

    slug: str
    message: str
    close_code: int | None = None
    error_code: int | None = None
    subscription_type: str | None = None
    http_status: int | None = None
    recovery: str | None = None
    severity: Severity = "warning"


class Reason(enum.Enum):
    """Why something was refused. ``Reason.X.value`` is its :class:`Rule`."""

    # --- connection (handshake and lifetime): closed -----------------------------
    UNKNOWN_APP = Rule("unknown_app", "Application does not exist", close_code=4001)
    APP_DISABLED = Rule("app_disabled", "Application disabled", close_code=4003)
    APP_REMOVED = Rule(
        "app_removed",
        "Application removed from the configuration",
        close_code=4001,
        severity="info",
    )
    APP_OVER_QUOTA = Rule(
        "app_over_quota", "Application is over its connection quota", close_code=4004
    )
    PATH_NOT_FOUND = Rule("path_not_found", "Path not found", close_code=4005, http_status=404)
    UNSUPPORTED_PROTOCOL = Rule(
        "unsupported_protocol", "Unsupported protocol version", close_code=4007
    )
    OVER_CAPACITY = Rule("over_capacity", "Over capacity", close_code=4100)
    SLOW_CONSUMER = Rule(
        "slow_consumer",
        "Write buffer limit exceeded; reconnect with back-off",
        close_code=4100,
    )
    PONG_TIMEOUT = Rule("pong_timeout", "Pong reply not received", close_code=4201, severity="info")
    SIGNIN_INVALID = Rule(
        "signin_invalid", "Invalid user authentication signature", close_code=4009
    )
    SIGNIN_DATA_INVALID = Rule(
        "signin_data_invalid",
        "user_data must be a JSON object with a non-empty string id",
        close_code=4009,
    )
    SIGNIN_CONFLICT = Rule(
        "signin_conflict", "Connection is already signed in as another user", close_code=4009
    )
    TERMINATED = Rule(
        "terminated", "Connection terminated by the application", close_code=4009, severity="info"
    )
    BINARY_FRAME = Rule(
        "binary_frame", "Binary frames are not part of the protocol", close_code=1003
    )
    FRAME_TOO_LARGE = Rule("frame_too_large", "Frame exceeds the size limit", close_code=1009)
    WEBSOCKET_PROTOCOL = Rule("websocket_protocol", "WebSocket protocol violation", close_code=1002)
    INVALID_UTF8 = Rule("invalid_utf8", "Text frame is not valid UTF-8", close_code=1007)
    UNSIGNED_OVER_QUOTA = Rule(
        "unsigned_over_quota",
        "Too many connections of this app have not signed in",
        close_code=4100,
    )
    SIGNIN_DEADLINE = Rule(
        "signin_deadline", "Connection did not sign in within the deadline", close_code=4009
    )
    SIGNIN_TOKEN_INVALID = Rule(
        "signin_token_invalid", "Invalid or expired sign-in token", close_code=4009
    )
    TOKEN_EXPIRED = Rule(
        "token_expired",
        "Sign-in token expired and was not renewed",
        close_code=4009,
        severity="info",
    )
    #: ``user_connection_policy = "close_oldest"``: a newer connection of the same user
    #: took this one's place (one session per user). 40xx: pusher-js does not reconnect.
    SESSION_REPLACED = Rule(
        "session_replaced",
        "Signed in on a newer connection; this one was closed",
        close_code=4009,
        severity="info",
    )
    #: ``user_error_budget``: the user's connections kept being refused; every one of
    #: them, on every node, is closed (4009: pusher-js does not reconnect).
    USER_SUSPENDED = Rule(
        "user_suspended",
        "Too many refused messages from this user; signed out for a while",
        close_code=4009,
    )
    #: A sign-in as a user still in the cool-down of a suspension.
    SIGNIN_SUSPENDED = Rule(
        "signin_suspended",
        "This user is suspended for a while after too many refused messages",
        close_code=4009,
    )
    #: Shared by both doors: close 4100 on a WebSocket, HTTP 429 before an upgrade or on REST.
    AUTH_FAILURE_LIMIT = Rule(
        "auth_failure_limit",
        "Too many failed authentications from this address; retry later",
        close_code=4100,
        http_status=429,
    )
    #: The connection's refusal budget is spent: its frames keep being refused.
    REFUSAL_LIMIT = Rule(
        "refusal_limit",
        "Too many refused messages on this connection; reconnect with back-off",
        close_code=4100,
    )
    #: Not the peer's fault: a defect in Bastion; the client sees only this message.
    INTERNAL_ERROR = Rule("internal_error", "Internal server error", close_code=1011)

    # --- messages: pusher:error, connection stays open ----------------------------
    #: Checked on every frame before it is decoded; the frame is dropped unread.
    MESSAGE_RATE = Rule(
        "message_rate",
        "Message rejected because of the connection's message rate limit",
        error_code=4301,
    )
    MALFORMED_JSON = Rule("malformed_json", "Message is not valid JSON", error_code=4300)
    NOT_AN_OBJECT = Rule("not_an_object", "Message must be a JSON object", error_code=4300)
    JSON_TOO_DEEP = Rule("json_too_deep", "Message nesting is too deep", error_code=4300)
    MISSING_EVENT = Rule(
        "missing_event", "Message must have a string 'event' field", error_code=4300
    )
    UNKNOWN_EVENT = Rule("unknown_event", "Unknown or reserved event name", error_code=4300)
    INVALID_DATA = Rule(
        "invalid_data", "Message 'data' is missing or has the wrong shape", error_code=4300
    )
    CLIENT_EVENTS_DISABLED = Rule(
        "client_events_disabled", "Client events are not enabled for this app", error_code=4300
    )
    CLIENT_EVENT_CHANNEL = Rule(
        "client_event_channel",
        "Client events are only allowed on private and presence channels",
        error_code=4300,
    )
    CLIENT_EVENT_ENCRYPTED = Rule(
        "client_event_encrypted",
        "Client events are not supported on encrypted channels",
        error_code=4300,
    )
    CLIENT_EVENT_NOT_SUBSCRIBED = Rule(
        "client_event_not_subscribed",
        "Client events need a subscription to the channel",
        error_code=4300,
    )
    CLIENT_EVENT_NAME = Rule(
        "client_event_name",
        "Client event names must start with 'client-' and follow the event name rules",
        error_code=4300,
    )
    CLIENT_EVENT_TOO_LARGE = Rule(
        "client_event_too_large", "Client event data exceeds the payload limit", error_code=4300
    )
    CLIENT_EVENT_RATE = Rule(
        "client_event_rate", "Client event rejected because of rate limit", error_code=4301
    )
    CLIENT_EVENT_APP_RATE = Rule(
        "client_event_app_rate",
        "Client event rejected because of the app's rate limit",
        error_code=4301,
    )
    #: ``client_event_limits``: the bucket of this event's name (per connection, or
    #: per user across the cluster) is empty; other names still pass.
    CLIENT_EVENT_TYPE_RATE = Rule(
        "client_event_type_rate",
        "Client event rejected because of the rate limit for its name",
        error_code=4301,
    )
    CLIENT_EVENT_NOT_ALLOWED = Rule(
        "client_event_not_allowed",
        "Client event name is not on the app's allow-list",
        error_code=4300,
    )
    CLIENT_EVENT_SCHEMA = Rule(
        "client_event_schema",
        "Client event data does not match the schema for its name",
        error_code=4300,
    )
    #: ``user_connection_policy = "refuse"``: the sign-in is refused, the connection
    #: stays open and anonymous.
    USER_CONNECTION_LIMIT = Rule(
        "user_connection_limit",
        "This user already holds the most connections allowed; sign-in refused",
        error_code=4303,
        severity="info",
    )
    WATCHLIST_TOO_LONG = Rule(
        "watchlist_too_long",
        "Watchlist limit exceeded; only the first ids were accepted",
        error_code=4302,
        severity="info",
    )

    # --- subscriptions: pusher:subscription_error on the channel -------------------
    SUBSCRIBE_INVALID_CHANNEL = Rule(
        "subscribe_invalid_channel",
        "Invalid channel name",
        subscription_type="InvalidChannel",
        http_status=400,
    )
    SUBSCRIBE_AUTH_MISSING = Rule(
        "subscribe_auth_missing",
        "Auth info required to subscribe to this channel",
        subscription_type="AuthError",
        http_status=401,
    )
    SUBSCRIBE_AUTH_INVALID = Rule(
        "subscribe_auth_invalid",
        "Invalid signature for this socket and channel",
        subscription_type="AuthError",
        http_status=401,
    )
    SUBSCRIBE_CHANNEL_DATA = Rule(
        "subscribe_channel_data",
        "channel_data must be a JSON object with a user_id",
        subscription_type="InvalidChannelData",
        http_status=400,
    )
    SUBSCRIBE_MEMBER_TOO_LARGE = Rule(
        "subscribe_member_too_large",
        "Presence user_info exceeds the member size limit",
        subscription_type="LimitReached",
        http_status=413,
    )
    SUBSCRIBE_PRESENCE_FULL = Rule(
        "subscribe_presence_full",
        "Presence channel is full",
        subscription_type="LimitReached",
        http_status=403,
        severity="info",
    )
    SUBSCRIBE_RATE = Rule(
        "subscribe_rate",
        "Too many subscribe attempts; slow down",
        subscription_type="LimitReached",
        http_status=429,
    )
    SUBSCRIBE_TOO_MANY_CHANNELS = Rule(
        "subscribe_too_many_channels",
        "Subscribed to too many channels on this connection",
        subscription_type="LimitReached",
        http_status=403,
    )
    SUBSCRIBE_APP_CHANNELS_FULL = Rule(
        "app_channels_full",
        "The application has too many channels; no new channel can open",
        subscription_type="LimitReached",
        http_status=403,
        severity="info",
    )
    SUBSCRIBE_NODE_CHANNELS_FULL = Rule(
        "node_channels_full",
        "This server has too many channels; no new channel can open here",
        subscription_type="LimitReached",
        http_status=403,
        severity="info",
    )
    SUBSCRIBE_NOT_SIGNED_IN = Rule(
        "subscribe_not_signed_in",
        "Server-to-user channels need a sign-in as that user",
        subscription_type="AuthError",
        http_status=401,
    )

    # --- resumes: bastion:recovery answering false, the subscribe stands -----------
    RESUME_INVALID = Rule(
        "resume_invalid",
        "bastion_resume must be an object with a valid position and socket id",
        recovery="invalid_position",
    )
    RESUME_FUTURE = Rule(
        "resume_future_position",
        "The resume position is past the channel's last recorded event",
        recovery="invalid_position",
    )

    # --- REST API: HTTP status + JSON body ----------------------------------------
    HTTP_UNKNOWN_APP = Rule("unknown_app", "Unknown app id", http_status=404)
    HTTP_APP_DISABLED = Rule("app_disabled", "Application disabled", http_status=403)
    HTTP_NOT_FOUND = Rule("not_found", "Not found", http_status=404, severity="info")
    HTTP_METHOD = Rule("method_not_allowed", "Method not allowed", http_status=405)
    HTTP_AUTH_MISSING = Rule(
        "auth_missing",
        "auth_key, auth_timestamp, auth_version and auth_signature are required",
        http_status=401,
    )
    HTTP_AUTH_VERSION = Rule("auth_version", "auth_version must be 1.0", http_status=401)
    HTTP_AUTH_KEY = Rule("auth_key", "auth_key does not belong to this app", http_status=401)
    HTTP_TIMESTAMP = Rule(
        "auth_timestamp",
        "auth_timestamp is outside the allowed window of 600 seconds",
        http_status=401,
    )
    HTTP_BODY_MD5 = Rule(
        "body_md5", "body_md5 is missing or does not match the body", http_status=401
    )
    HTTP_SIGNATURE = Rule("auth_signature", "Invalid signature", http_status=401)
    HTTP_BODY_TOO_LARGE = Rule(
        "body_too_large", "Request body exceeds the size limit", http_status=413
    )
    HTTP_HEADERS_TOO_LARGE = Rule(
        "headers_too_large", "Request header fields too large", http_status=431
    )
    HTTP_INTERNAL_ERROR = Rule("internal_error", "Internal server error", http_status=500)
    HTTP_WEBSOCKET_VERSION = Rule(
        "websocket_version", "Unsupported Sec-WebSocket-Version; use 13", http_status=426
    )
    HTTP_BAD_REQUEST = Rule("bad_request", "Malformed HTTP request", http_status=400)
    HTTP_INVALID_BODY = Rule("invalid_body", "Request body must be a JSON object", http_status=400)
    HTTP_INVALID_FIELD = Rule("invalid_field", "Invalid request field", http_status=400)
    HTTP_PAYLOAD_TOO_LARGE = Rule(
        "payload_too_large", "Event data exceeds the payload limit", http_status=413
    )
    HTTP_TOO_MANY_CHANNELS = Rule(
        "too_many_channels", "Too many channels in one event", http_status=400
    )
    HTTP_BATCH_TOO_LARGE = Rule("batch_too_large", "Too many events in one batch", http_status=400)
    HTTP_INVALID_CHANNEL = Rule("invalid_channel", "Invalid channel name", http_status=400)
    HTTP_INVALID_EVENT = Rule("invalid_event_name", "Invalid event name", http_status=400)
    HTTP_INVALID_SOCKET_ID = Rule("invalid_socket_id", "Invalid socket_id", http_status=400)
    HTTP_INVALID_INFO = Rule(
        "invalid_info", "Requested info attribute is not available here", http_status=400
    )
    HTTP_NOT_PRESENCE = Rule("not_presence", "Only presence channels have users", http_status=400)
    HTTP_ORIGIN_REFUSED = Rule(
        "origin_refused", "Origin is not allowed for this app", http_status=403
    )
    HTTP_REPLAYED = Rule(
        "replayed_request", "This signed request was already accepted", http_status=401
    )
    HTTP_CLUSTER_UNAVAILABLE = Rule(
        "cluster_unavailable",
        "The cluster state cannot be read right now (Redis unreachable); retry later",
        http_status=503,
    )
    #: Refused at accept (no HTTP answer), or 403 when a trusted proxy names the address.
    IP_BLOCKED = Rule("ip_blocked", "Address is blocked", http_status=403)
    HTTP_IP_CONNECTIONS = Rule(
        "ip_connection_limit",
        "Too many concurrent connections from this address",
        http_status=429,
    )
    HTTP_CONNECTION_RATE = Rule(
        "connection_rate", "Too many new connections from this address", http_status=429
    )
    HTTP_IP_RATE = Rule("ip_rate_limited", "Too many requests from this address", http_status=429)
    HTTP_APP_RATE = Rule("app_rate_limited", "Too many requests for this app", http_status=429)
    #: ``rest_event_limits``: the app published too many events of this name.
    HTTP_EVENT_RATE = Rule(
        "event_rate_limited", "Too many events of this name for this app", http_status=429
    )
    HTTP_QUERY_TOKEN = Rule(
        "query_token_refused",
        "This app does not accept tokens in the URL",
        http_status=400,
    )
    ADMIN_UNAUTHORIZED = Rule(
        "admin_unauthorized",
        "The admin API needs a valid bearer token from an allowed address",
        http_status=401,
    )
    METRICS_FORBIDDEN = Rule(
        "metrics_forbidden",
        "Metrics are available to allowed addresses or with the metrics token",
        http_status=403,
    )
    #: The DNS-rebinding guard of the operator endpoints (metrics, admin, dashboard).
    HOST_NOT_ALLOWED = Rule(
        "host_not_allowed",
        "The Host header does not name this server",
        http_status=403,
    )
    HTTP_INVALID_POSITION = Rule(
        "invalid_position",
        "since must be a position (epoch:offset) the channel has reached",
        http_status=400,
    )
    HTTP_ENCRYPTED_MULTI = Rule(
        "encrypted_multi_channel",
        "Encrypted channels cannot be triggered together with other channels",
        http_status=400,
    )


@dataclass(frozen=True, slots=True)
class RefusalRecord:
    """One refusal, as the refusal path's listeners (audit, reputation) receive it."""

    reason: Reason
    app_id: str | None
    ip: str | None
    socket_id: str | None
    user_id: str | None
    detail: str
