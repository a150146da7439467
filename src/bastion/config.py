"""One typed, validated settings object for Bastion.

Settings come from a TOML file (``bastion serve --config bastion.toml``) with
``BASTION_*`` environment overrides. The models are strict (a string is not a
number) and closed (an unknown field is an error), so a typo fails at start-up,
naming the field, instead of silently falling back to a default.

Environment overrides use ``__`` to descend: ``BASTION_SERVER__PORT=7000``,
``BASTION_APPS__0__SECRET=...`` (list items by index). Each value is read as a
TOML value when it parses as one (``7000``, ``true``, ``["a", "b"]``) and as a
plain string otherwise.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bastion import limit_settings as limits
from bastion.config_alerts import AlertRuleSettings, AlertSettings
from bastion.config_env import apply_env
from bastion.config_history import HistorySettings
from bastion.config_stores import AuditSettings, WebhookDeliverySettings
from bastion.errors import ConfigError
from bastion.limit_settings import STRICT as _STRICT
from bastion.limit_settings import (
    AnonymousSettings,
    ConnectionLimits,
    EventLimit,
    PositiveFloat,
    PositiveInt,
    RateSettings,
    UserErrorBudget,
)
from bastion.security.origins import parse_patterns
from bastion.security.payload import ClientEventPolicy
from bastion.security.proxies import ForwardedHeader, parse_networks

__all__ = [
    "WEBHOOK_EVENT_TYPES",
    "AdapterSettings",
    "AdminSettings",
    "AlertRuleSettings",
    "AlertSettings",
    "AnonymousSettings",
    "AppSettings",
    "AuditSettings",
    "ConnectionLimits",
    "EventLimit",
    "HistorySettings",
    "JwtSettings",
    "MetricsSettings",
    "RateSettings",
    "ReputationSettings",
    "RetiringSecret",
    "SecuritySettings",
    "ServerSettings",
    "Settings",
    "TlsSettings",
    "UserErrorBudget",
    "WebhookDeliverySettings",
    "WebhookSettings",
    "load_settings",
    "settings_from_json",
    "settings_from_mapping",
]

WebhookEventType = Literal[
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
]

WEBHOOK_EVENT_TYPES: tuple[WebhookEventType, ...] = (
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
)


class _FieldError(ValueError):
    """A check across fields that names the one at fault (pydantic gives no location)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


_APP_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_APP_KEY = re.compile(r"^[A-Za-z0-9_\-.]{1,128}$")

#: Frames a reconnecting client sends besides one subscribe per channel (a sign-in,
#: a ping, an unsubscribe racing the reconnect): the bursts leave room for them.
RECONNECT_MARGIN = 5


def _networks(value: list[str]) -> list[str]:
    parse_networks(value)  # raises ValueError naming the bad entry
    return value


def _long_secret(value: SecretStr) -> SecretStr:
    if len(value.get_secret_value()) < 32:
        raise ValueError("must be at least 32 characters")
    return value


_HOST_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?\.?$")


def _host_names(value: list[str]) -> list[str]:
    for name in value:
        if not _HOST_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a host name (no scheme, port or path)")
    return value


#: A list of CIDRs (a bare address is a /32 or /128), checked at load.
Networks = Annotated[list[str], AfterValidator(_networks)]
#: A list of DNS host names, checked at load.
HostNames = Annotated[list[str], AfterValidator(_host_names)]


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


#: A header name, matched case-insensitively like HTTP does.
HeaderName = Annotated[ForwardedHeader, BeforeValidator(_lower)]
#: A key or token of 32 characters or more.
LongSecret = Annotated[SecretStr, AfterValidator(_long_secret)]


class WebhookSettings(BaseModel):
    """One webhook endpoint of an app."""

    model_config = _STRICT

    url: str
    event_types: list[WebhookEventType] = Field(default_factory=lambda: list(WEBHOOK_EVENT_TYPES))
    #: Only events on channels starting with one of these; unset: every channel.
    channel_prefixes: list[str] | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # Trusted as written (loopback included); only the scheme is checked here.
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value


JwtAlgorithm = Literal["HS256", "RS256", "ES256"]


class JwtSettings(BaseModel):
    """JSON Web Tokens accepted for sign-in and channel grants, besides HMAC."""

    model_config = _STRICT

    #: Algorithms accepted; a token signed with any other (``none`` included) is refused.
    algorithms: Annotated[list[JwtAlgorithm], Field(min_length=1)]
    #: The shared key for HS256.
    secret: SecretStr | None = None
    #: A PEM public key file for RS256 / ES256.
    public_key_file: str | None = None
    #: A JWKS file (``{"keys": [...]}``); the token's ``kid`` picks the key.
    jwks_file: str | None = None
    #: Required ``aud`` claim value, when set.
    audience: str | None = None
    #: Required ``iss`` claim value, when set.
    issuer: str | None = None
    #: Clock skew tolerated on ``exp``/``nbf``/``iat``, seconds.
    leeway_seconds: Annotated[float, Field(ge=0, le=300)] = 30
    #: Accept a token from the connection URL (``?token=``); off: the URL is never read.
    allow_query_token: bool = False
    #: Seconds before the sign-in token's ``exp`` the client is warned to renew.
    expiry_warning_seconds: PositiveFloat = 60
    #: Seconds after ``exp`` a connection may still renew before it is closed (4009).
    expiry_grace_seconds: PositiveFloat = 30
    #: The claim that names the sign-in's role (``[apps.roles.NAME]``).
    role_claim: limits.RoleClaim = "role"

    @field_validator("secret")
    @classmethod
    def _non_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters for HS256")
        return value

    @model_validator(mode="after")
    def _keys_for_algorithms(self) -> JwtSettings:
        if "HS256" in self.algorithms and self.secret is None:
            raise ValueError("HS256 needs secret")
        asymmetric = {"RS256", "ES256"} & set(self.algorithms)
        if asymmetric and self.public_key_file is None and self.jwks_file is None:
            raise ValueError(f"{sorted(asymmetric)} need public_key_file or jwks_file")
        return self


class RetiringSecret(BaseModel):
    """An older secret still accepted while clients and SDKs rotate to the new one."""

    model_config = _STRICT

    secret: SecretStr
    #: After this instant the secret is no longer accepted; ``None`` keeps it until removed.
    expires_at: datetime | None = None

    @field_validator("secret")
    @classmethod
    def _non_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value


class AppSettings(BaseModel):
    """One tenant application: credentials, switches and limits.

    Each limit's default follows Pusher's documented limit where one exists.
    """

    model_config = _STRICT

    id: str
    key: str
    secret: SecretStr
    enabled: bool = True
    enable_client_messages: bool = False
    #: Concurrent connections for this app; ``None`` means no app-level cap.
    max_connections: PositiveInt | None = None
    #: Channels one connection may be subscribed to (over it: subscription_error 403).
    #: The subscribe and message bursts are raised to fit a reconnect that
    #: resubscribes to all of them (see :attr:`subscribe_burst`).
    max_channels_per_connection: PositiveInt = 100
    #: Channels of this app with a subscriber on a node (a new one over it: 403).
    max_channels: PositiveInt | None = 100_000
    #: Channels a ``GET /channels`` answer lists at most (more: ``"truncated": true``).
    max_channels_in_query: PositiveInt = 10_000
    max_client_events_per_second: PositiveInt = 10
    max_presence_members: PositiveInt = 100
    max_presence_member_size_kb: PositiveFloat = 2
    max_event_payload_kb: PositiveFloat = 10
    max_channels_per_event: PositiveInt = 100
    max_event_batch_size: PositiveInt = 10
    max_channel_name_length: Annotated[int, Field(gt=0, le=1024)] = 164
    max_event_name_length: Annotated[int, Field(gt=0, le=1024)] = 200
    #: Watched user ids accepted per sign-in (Pusher: 100; excess → 4302).
    max_watchlist_size: PositiveInt = 100
    #: Seconds a cache channel keeps its last event (Pusher: up to 30 minutes).
    cache_ttl: PositiveInt = 1800
    #: Broadcast ``pusher_internal:subscription_count`` on non-presence channels.
    enable_subscription_count: bool = False
    #: Older secrets still accepted during rotation; ``secret`` is the newest and signs.
    previous_secrets: list[RetiringSecret] = Field(default_factory=list)
    #: Browser origins allowed to connect; ``None`` accepts every origin.
    allowed_origins: list[str] | None = None
    #: With ``allowed_origins`` set, also refuse handshakes that carry no Origin header.
    reject_missing_origin: bool = False
    #: Signatures the REST replay guard remembers inside the ±600 s window (beyond it the
    #: oldest timestamps are forgotten behind a horizon, see security/replay.py).
    replay_guard_max_entries: PositiveInt = 100_000
    #: Signed REST calls for this app, all callers together (over it: 429).
    rest_requests: RateSettings | None = None
    #: Client events for this app, all connections together (over it: 4301).
    client_events_per_app: RateSettings | None = None
    #: Subscribe attempts per connection (over it: subscription_error 429).
    subscribe_attempts: RateSettings = RateSettings(rate=10, burst=100)
    #: Frames of any kind per connection, checked before decoding (over it: 4301).
    max_messages_per_second: RateSettings = RateSettings(rate=50, burst=100)
    #: Refusals a connection may earn, as a decaying budget (spent: close 4100).
    refusals_per_connection: RateSettings = RateSettings(rate=0.2, burst=20)
    #: Concurrent connections of this app that have not signed in (over it: 4100).
    max_unsigned_connections: PositiveInt | None = None
    #: Seconds a new connection has to sign in before it is closed (4009); unset: never.
    signin_deadline_seconds: PositiveFloat | None = None
    #: Signed-in connections one user may hold in this app, cluster-wide; unset: no cap.
    max_connections_per_user: PositiveInt | None = None
    #: Past it: ``refuse`` the sign-in (4303, the connection stays anonymous) or
    #: ``close_oldest`` (the oldest closed with 4009: one session per user with a cap of 1).
    user_connection_policy: Literal["refuse", "close_oldest"] = "refuse"
    #: Refusals a signed-in user may earn before being signed out everywhere; unset: off.
    user_error_budget: UserErrorBudget | None = None
    #: Per-connection limits by role (``[apps.roles.NAME]``), for sign-ins naming one.
    roles: limits.RoleTables = Field(default_factory=dict)
    #: The role of a sign-in that names none (a role of ``roles``); unset: the app's limits.
    default_role: str | None = None
    #: Per-connection limits of connections that have not signed in.
    anonymous: AnonymousSettings | None = None
    #: The key of an HMAC sign-in's ``user_data`` that names its role.
    role_key: limits.RoleKey = "role"
    #: Client event names accepted (exact, or a prefix ending in ``*``); unset: any.
    client_event_allowlist: list[str] | None = None
    #: A JSON Schema (draft 2020-12) per client event name, checked against ``data``.
    client_event_schemas: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: A bucket per client event name or prefix (``client-cursor-*``) (over it: 4301).
    client_event_limits: limits.ClientEventLimits = Field(default_factory=dict)
    #: A bucket per REST event name or prefix for the whole app (over it: 429).
    rest_event_limits: limits.RestEventLimits = Field(default_factory=dict)
    #: JSON Web Tokens for sign-in and channel grants (``[apps.jwt]``).
    jwt: JwtSettings | None = None
    #: Channel history and recovery after a reconnect (``[apps.history]``); unset: off.
    history: HistorySettings | None = None
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    #: Refuse to deliver this app's webhooks to loopback, private or link-local addresses.
    webhooks_refuse_private: bool = False

    @property
    def subscribe_burst(self) -> float:
        """The subscribe-attempt burst in force: at least a full reconnect's subscribes.

        pusher-js resubscribes to every channel at once when it reconnects, so the
        burst is never below ``max_channels_per_connection`` plus a margin
        (:data:`RECONNECT_MARGIN`) for the frames a reconnect sends besides.
        """
        return max(
            float(self.subscribe_attempts.burst),
            self.max_channels_per_connection + RECONNECT_MARGIN,
        )

    @property
    def message_burst(self) -> float:
        """The message-budget burst in force: at least a full reconnect's frames."""
        return max(
            float(self.max_messages_per_second.burst),
            self.max_channels_per_connection + RECONNECT_MARGIN,
        )

    @property
    def unsigned_cap(self) -> int | None:
        """The anonymous cap in force (``anonymous.max_connections`` or the older key)."""
        anonymous = self.anonymous
        if anonymous is not None and anonymous.max_connections is not None:
            return anonymous.max_connections
        return self.max_unsigned_connections

    @model_validator(mode="after")
    def _roles_and_anonymous(self) -> AppSettings:
        limits.check_roles_and_anonymous(
            self.default_role, self.roles, self.anonymous, self.max_unsigned_connections
        )
        return self

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not _APP_ID.match(value):
            raise ValueError("must be 1-64 characters of A-Z a-z 0-9 _ -")
        return value

    @field_validator("key")
    @classmethod
    def _valid_key(cls, value: str) -> str:
        if not _APP_KEY.match(value):
            raise ValueError("must be 1-128 characters of A-Z a-z 0-9 _ - .")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _valid_origins(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            parse_patterns(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("client_event_allowlist")
    @classmethod
    def _client_event_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            if not name.startswith("client-"):
                raise ValueError(f"{name!r} is not a client event name (they start with client-)")
        return value

    @field_validator("client_event_schemas")
    @classmethod
    def _valid_schemas(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        ClientEventPolicy(None, value)  # raises ValueError naming the event
        return value

    @field_validator("secret")
    @classmethod
    def _non_empty_secret(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    @property
    def max_event_payload_bytes(self) -> int:
        """The event ``data`` limit in bytes."""
        return int(self.max_event_payload_kb * 1024)

    @property
    def max_presence_member_bytes(self) -> int:
        """The presence ``user_info`` limit in bytes."""
        return int(self.max_presence_member_size_kb * 1024)


class TlsSettings(BaseModel):
    """TLS served by the node itself (``[server.tls]``): ``wss://`` and ``https://``.

    The files are read when the node starts (a missing, unreadable or mismatched
    file fails start-up there), not when the settings are loaded.
    """

    model_config = _STRICT

    #: PEM certificate chain: the server certificate first, then intermediates.
    cert: str
    #: PEM private key of the certificate (unencrypted; keep the file ``0600``).
    key: str
    #: Oldest TLS version accepted.
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @field_validator("cert", "key")
    @classmethod
    def _non_empty_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a file path, not empty")
        return value


class ServerSettings(BaseModel):
    """The listener: address, heartbeats and per-connection bounds."""

    model_config = _STRICT

    host: str = "127.0.0.1"
    #: 0 asks the OS for a free port (tests); the bound port is printed at start.
    port: Annotated[int, Field(ge=0, le=65535)] = 6001
    #: Seconds of client silence before the server pings (sent in the handshake).
    activity_timeout: PositiveInt = 120
    #: Seconds to wait for any frame after a server ping before closing with 4201.
    pong_timeout: PositiveFloat = 30
    #: Outbound KiB queued per connection (the transport's buffer, at most 64 KiB of
    #: it, and the frames held behind it) before it is cut as a slow consumer.
    max_write_buffer_kb: PositiveInt = 1024
    #: Seconds a client may take to send a complete HTTP request head.
    handshake_timeout: PositiveFloat = 10
    #: Largest HTTP request body accepted by the REST API, in KiB.
    max_request_body_kb: PositiveInt = 1024
    #: Concurrent WebSocket connections on this node (over it: close 4100).
    max_connections: PositiveInt | None = None
    #: Channels with a subscriber on this node, all apps together (a new one over it:
    #: subscription_error LimitReached 403). About 5 KB of memory each.
    max_channels: PositiveInt | None = 250_000
    #: Serve TLS on the port (``wss://``, ``https://``); unset: plain TCP.
    tls: TlsSettings | None = None
    #: Seconds a SIGTERM drain may take (close with 4200, flush webhooks and audit).
    drain_seconds: Annotated[float, Field(gt=0, le=600)] = 5.0


class AdminSettings(BaseModel):
    """The security admin API under ``/api/security`` (off until a token is set)."""

    model_config = _STRICT

    #: Bearer token for every admin call; unset: the admin API answers 404.
    token: LongSecret | None = None
    #: Client addresses (CIDRs) allowed to call it at all; the token is required as well.
    allow_from: Networks = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    #: Host names besides IP literals, ``localhost`` and ``server.host`` that the
    #: ``Host`` header of an admin or dashboard request may name (DNS rebinding guard).
    allowed_hosts: HostNames = Field(default_factory=list)


class MetricsSettings(BaseModel):
    """The Prometheus endpoint ``/metrics`` on the main port."""

    model_config = _STRICT

    enabled: bool = True
    #: Client addresses (CIDRs) that may scrape without a token.
    allow_from: Networks = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    #: Bearer token that lets any other peer scrape (``Authorization: Bearer ...``).
    token: LongSecret | None = None
    #: Host names besides IP literals, ``localhost`` and ``server.host`` that the
    #: ``Host`` header of a token-less scrape may name (DNS rebinding guard).
    allowed_hosts: HostNames = Field(default_factory=list)


class ReputationSettings(BaseModel):
    """IP reputation: refusals add decaying points; past the threshold the IP is blocked."""

    model_config = _STRICT

    enabled: bool = True
    #: Points at which an address is blocked.
    threshold: PositiveFloat = 100
    #: Seconds for a score to halve.
    half_life_seconds: PositiveFloat = 300
    #: How long an automatic block lasts, seconds.
    block_seconds: PositiveInt = 900
    #: Addresses never blocked, automatically or by hand (CIDRs).
    never_block: Networks = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    #: Points per refusal slug, overriding the built-in weights (0 ignores a slug).
    points: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    #: SQLite file holding blocks, shared with ``bastion block`` / ``unblock`` / ``blocks``.
    store_path: str = "bastion-blocks.sqlite3"
    #: Seconds between reads of blocks written by the CLI (or other nodes).
    sync_seconds: PositiveFloat = 2


class SecuritySettings(BaseModel):
    """Node-wide admission control and per-address limits."""

    model_config = _STRICT

    #: Peers (CIDRs) whose forwarding header (``forwarded_header``) is believed.
    trusted_proxies: Networks = Field(default_factory=list)
    #: The one header the trusted proxies name the client in; no other is ever read.
    forwarded_header: HeaderName = "x-forwarded-for"
    #: Concurrent WebSocket connections from one address (over it: 429 before upgrade).
    max_connections_per_ip: PositiveInt = 200
    #: New WebSocket connections from one address (over it: 429 + Retry-After).
    new_connections_per_ip: RateSettings = RateSettings(rate=10, burst=50)
    #: HTTP requests (REST) from one address (over it: 429 + Retry-After).
    rest_requests_per_ip: RateSettings = RateSettings(rate=200, burst=400)
    #: Failed authentications from one address; when spent, 429 until it refills.
    auth_failures_per_ip: RateSettings = RateSettings(rate=0.2, burst=20)
    reputation: ReputationSettings = ReputationSettings()


class AdapterSettings(BaseModel):
    """How nodes share state: ``local`` (one node) or ``redis`` (a cluster over Redis)."""

    model_config = _STRICT

    driver: Literal["local", "redis"] = "local"
    #: ``redis://[:password@]host:port/db`` or ``rediss://`` for TLS; a secret if it has a password.
    url: str | None = None
    #: Prefix of every Redis key and pub/sub channel, so clusters can share one Redis.
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] = "bastion"
    #: Key authenticating bus messages between nodes (HMAC-SHA256). Unset: derived from
    #: the apps' secrets, which every node of a cluster shares.
    cluster_secret: LongSecret | None = None
    #: Seconds between a node's liveness heartbeats.
    heartbeat_seconds: PositiveFloat = 2
    #: Longest back-off between reconnection attempts after Redis is lost, seconds.
    reconnect_max_seconds: PositiveFloat = 5
    #: Milliseconds between two syncs of the cluster-wide rate limits with Redis.
    limits_sync_ms: Annotated[int, Field(ge=5, le=10_000)] = 50
    #: Claim every signed REST request in Redis before acting on it, so a request
    #: replayed to another node is refused (one Redis round trip per request).
    shared_replay_guard: bool = True

    @model_validator(mode="after")
    def _redis_needs_url(self) -> AdapterSettings:
        if self.driver == "redis" and self.url is None:
            raise ValueError("url is required when driver is redis")
        if self.url is not None and not re.match(r"^(redis|rediss|unix)://", self.url):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        return self


class Settings(BaseModel):
    """The whole configuration, frozen once loaded."""

    model_config = _STRICT

    server: ServerSettings = ServerSettings()
    adapter: AdapterSettings = AdapterSettings()
    audit: AuditSettings = AuditSettings()
    security: SecuritySettings = SecuritySettings()
    webhooks: WebhookDeliverySettings = WebhookDeliverySettings()
    metrics: MetricsSettings = MetricsSettings()
    admin: AdminSettings = AdminSettings()
    alerts: AlertSettings = AlertSettings()
    apps: list[AppSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_apps(self) -> Settings:
        for field in ("id", "key"):
            seen: dict[str, int] = {}
            for index, app in enumerate(self.apps):
                value = getattr(app, field)
                if value in seen:
                    raise _FieldError(
                        f"apps.{index}.{field}",
                        f"apps.{index}.{field}: duplicate of apps.{seen[value]}.{field}",
                    )
                seen[value] = index
        return self

    def app_by_key(self, key: str) -> AppSettings | None:
        """The app whose key is ``key``, if any."""
        return next((app for app in self.apps if app.key == key), None)

    def app_by_id(self, app_id: str) -> AppSettings | None:
        """The app whose id is ``app_id``, if any."""
        return next((app for app in self.apps if app.id == app_id), None)


def _config_error(error: ValidationError) -> ConfigError:
    """A :class:`ConfigError` naming each field at fault: in its message and its ``fields``."""
    lines = []
    fields = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        cause = item.get("ctx", {}).get("error")
        if not location and isinstance(cause, _FieldError):
            location = cause.field  # a check across fields names the one at fault
        else:
            cause = None
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if location:
            fields.append(location)
        # Never echo the offending input: it may be a secret.
        lines.append(f"{location}: {message}" if location and cause is None else message)
    return ConfigError("; ".join(lines), fields=fields)


def settings_from_mapping(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate a parsed TOML mapping (plus env overrides) into :class:`Settings`.

    Raises:
        ConfigError: naming each offending field; the value itself is not echoed.
    """
    import copy

    merged: dict[str, Any] = copy.deepcopy(dict(data))
    apply_env(merged, os.environ if environ is None else environ, Settings)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise _config_error(exc) from None


def settings_from_json(text: str | bytes) -> Settings:
    """Validate a JSON document of the whole configuration (no env overrides).

    JSON has no date type: ``expires_at`` is read from an ISO 8601 string here,
    which the TOML path (a native date) does not need.

    Raises:
        ConfigError: naming each offending field; the value itself is not echoed.
    """
    try:
        return Settings.model_validate_json(text)
    except ValidationError as exc:
        raise _config_error(exc) from None


def load_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (TOML) or start from defaults, then apply ``BASTION_*`` overrides.

    Raises:
        ConfigError: the file is unreadable, is not TOML, or fails validation.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{path}: cannot read ({exc.strerror})", fields=(str(path),)
            ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})", fields=(str(path),)) from None
    return settings_from_mapping(data, environ)
