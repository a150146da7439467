"""Apply a new configuration to a running node without dropping connections.

Two doors lead here: ``SIGHUP`` (``bastion serve --config FILE`` reads the file
again, see :mod:`bastion.server.runtime`) and ``PUT /api/security/config``
(:mod:`bastion.api.admin`). Both hand a validated :class:`~bastion.config.Settings`
to :func:`reload_settings`, which

1. lists what changed, as field paths (``apps.12345.allowed_origins``,
   ``security.rest_requests_per_ip``, ``+apps.777`` for an added app,
   ``-apps.777`` for a removed one): :func:`changed_fields`;
2. refuses the whole change, naming the fields, when one of them needs a restart
   (:func:`restart_fields`): the listener's address and TLS, the adapter, the audit
   log, the webhook queue and delivery settings, IP reputation, the security
   alerts, and with the redis adapter the set of apps, their
   ``max_event_payload_kb`` and (without ``cluster_secret``) their secrets, which
   the bus was set up with;
3. builds everything that can fail first (JWT key files are read), then applies
   the rest in one step on the event loop, so a change is applied whole or not at
   all, and connections, subscriptions and presence members stay as they are.

What is applied live, and how:

* an app's settings: its runtime state (channels, members, users, counts) is kept
  and only what is derived from the settings is rebuilt (secrets and their
  rotation list, the JWT verifier, the client event policy, the app-wide client
  event bucket when its rate changed; the per-connection buckets of its open
  connections when their rates changed). Origins, limits, switches and webhook
  signing read the new settings from the next request on.
* an added app: connections and REST calls are accepted at once.
* a removed app: new connections are refused (4001 ``unknown_app``), and its open
  connections are closed with **4001** ``app_removed``; an app switched to
  ``enabled = false`` has its open connections closed with **4003**
  ``app_disabled``. Webhooks still queued for a removed app become dead letters.
* ``[server]`` bounds other than the address and TLS (timeouts, buffers,
  ``max_connections``, ``drain_seconds``): read from the next use on.
* ``[security]`` limits (trusted proxies, per-address caps and buckets): the
  limiters whose settings changed are rebuilt empty (their buckets start full);
  the per-address concurrent counts are kept.
* the apps' webhook endpoints: the webhook producer is replaced (what the old one
  held or batched is written to the queue); the queue is opened when the first
  endpoint appears.
* ``[metrics]`` and ``[admin]``: access lists and tokens apply from the next
  request on.

A reload changes this process only: with ``--workers N`` the supervisor hands the
file's new content to every worker, and a cluster of nodes needs each reloaded.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from bastion.config import AppSettings, Settings
from bastion.core.hub import AppState, Hub
from bastion.errors import ConfigError, Refused
from bastion.metrics import Metrics
from bastion.protocol.refusals import Reason
from bastion.security.audit import AuditEvent, MetadataValue, Severity
from bastion.server.apps import app_state
from bastion.server.context import ServerContext

__all__ = [
    "CONFIG_CHANGED",
    "CONFIG_CHANGE_REFUSED",
    "RESTART_ONLY",
    "ReloadResult",
    "ReloadSource",
    "ReloadableNode",
    "RestartRequired",
    "changed_fields",
    "record_refused",
    "reload_settings",
    "restart_fields",
]

log = logging.getLogger("bastion.reload")

#: Audit event types.
CONFIG_CHANGED = "config_changed"
CONFIG_CHANGE_REFUSED = "config_change_refused"

#: Field paths (and everything under them) that only a restart applies.
RESTART_ONLY: tuple[str, ...] = (
    "server.host",
    "server.port",
    "server.tls",
    "adapter",
    "audit",
    "webhooks",
    "security.reputation",
    "alerts",
)

#: Where a reload came from (audit metadata, log lines, the metric label).
ReloadSource = Literal["sighup", "api", "supervisor"]


class RestartRequired(ConfigError):
    """The new configuration changes fields that only a restart applies.

    Attributes:
        fields: the offending field paths (names only, never values).
    """

    def __init__(self, fields: Sequence[str]) -> None:
        super().__init__(f"needs a restart: {', '.join(fields)}", fields=fields)


class _SettingsOwner(Protocol):
    def apply_settings(self, settings: Settings) -> None: ...


class ReloadableNode(Protocol):
    """What a reload reads and asks of a running node (:class:`~bastion.server.runtime.Node`)."""

    settings: Settings

    @property
    def metrics(self) -> Metrics:
        """The node's counters (``config_reloads``)."""
        ...

    @property
    def hub(self) -> Hub:
        """The hub, which takes the new apps."""
        ...

    @property
    def ctx(self) -> ServerContext:
        """The listener's context, which takes the new limits."""
        ...

    @property
    def rest(self) -> _SettingsOwner:
        """The REST API, which forgets removed apps' buckets."""
        ...

    def audit_event(self, event: AuditEvent) -> None:
        """Record ``event`` in the audit log (nothing when it is off)."""
        ...

    def rebuild_ops(self) -> None:
        """``[metrics]`` or ``[admin]`` changed: rebuild the operator endpoints."""
        ...

    def replace_webhooks(self) -> None:
        """The apps' webhook endpoints changed."""
        ...


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did.

    Attributes:
        changed: the field paths applied (empty: the configuration was the same).
        closed: open connections closed because their app was removed or disabled.
    """

    changed: tuple[str, ...]
    closed: int = 0


# --- the difference ---------------------------------------------------------------------


def _diff(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, BaseModel) and isinstance(new, BaseModel) and type(old) is type(new):
        for name in type(old).model_fields:
            _diff(getattr(old, name), getattr(new, name), f"{path}.{name}", out)
        return
    # SecretStr compares its secret values: a rotation is a change, and only the
    # path is ever reported.
    if old != new:
        out.append(path)


def changed_fields(old: Settings, new: Settings) -> list[str]:
    """The field paths whose values differ between ``old`` and ``new``.

    Apps are matched by id: ``+apps.{id}`` is added, ``-apps.{id}`` removed, and
    ``apps.{id}.{field}`` changed (nested tables listed whole, for example
    ``apps.{id}.webhooks``). Secrets count as changed when their value changed,
    but only their path is returned.
    """
    out: list[str] = []
    for name in type(old).model_fields:
        if name != "apps":
            _diff(getattr(old, name), getattr(new, name), name, out)
    before = {app.id: app for app in old.apps}
    after = {app.id: app for app in new.apps}
    for app_id, app in after.items():
        previous = before.get(app_id)
        if previous is None:
            out.append(f"+apps.{app_id}")
            continue
        for field in AppSettings.model_fields:
            if getattr(previous, field) != getattr(app, field):
                out.append(f"apps.{app_id}.{field}")
    out.extend(f"-apps.{app_id}" for app_id in before if app_id not in after)
    return out


def restart_fields(old: Settings, changed: Iterable[str]) -> list[str]:
    """Those of ``changed`` that a running node cannot apply (see the module doc)."""
    redis = old.adapter.driver == "redis"
    derived_bus_key = redis and old.adapter.cluster_secret is None
    refused = []
    for path in changed:
        if any(path == root or path.startswith(root + ".") for root in RESTART_ONLY):
            refused.append(path)
        elif redis and path.startswith(("+apps.", "-apps.")):
            refused.append(path)  # the bus listens per app, set up at start
        elif redis and path.endswith(".max_event_payload_kb"):
            refused.append(path)  # sizes the bus frame limit
        elif derived_bus_key and path.startswith("apps.") and path.endswith(".secret"):
            refused.append(path)  # the bus key is derived from the secrets at start
    return refused


# --- applying ---------------------------------------------------------------------------


def _audit(
    node: ReloadableNode,
    type_: str,
    severity: Severity,
    message: str,
    metadata: dict[str, MetadataValue],
) -> None:
    node.audit_event(
        AuditEvent(
            id=uuid.uuid4().hex,
            time=time.time(),
            type=type_,
            severity=severity,
            ip=None,
            app_id=None,
            socket_id=None,
            user_id=None,
            message=message,
            metadata=metadata,
        )
    )


def record_refused(
    node: ReloadableNode, source: ReloadSource, why: str, fields: Sequence[str], detail: str = ""
) -> None:
    """Count, log and audit a reload that was not applied (field names only).

    ``detail`` is a :class:`~bastion.errors.ConfigError` message (names fields and
    what is wrong with them, never a value), logged instead of the bare names.
    """
    node.metrics.config_reloads[why] += 1
    names = ", ".join(fields) or "-"
    # A signal has no one to answer but the log; an API caller got the fields back.
    level = logging.WARNING if source == "api" else logging.ERROR
    log.log(level, "configuration not reloaded (%s, %s): %s", source, why, detail or names)
    _audit(
        node,
        CONFIG_CHANGE_REFUSED,
        "warning",
        f"Configuration change refused ({why}): {names}",
        {"source": source, "result": why, "fields": ",".join(fields)},
    )


def reload_settings(node: ReloadableNode, new: Settings, source: ReloadSource) -> ReloadResult:
    """Apply ``new`` to the running ``node``, whole or not at all.

    Runs on the node's event loop. Counts the attempt in
    ``node.metrics.config_reloads`` and audits it (``config_changed``, or
    ``config_change_refused`` naming the fields).

    Raises:
        RestartRequired: some changed field needs a restart; nothing was applied.
        ConfigError: a new app's JWT key file cannot be read; nothing was applied.
    """
    old = node.settings
    changed = changed_fields(old, new)
    if not changed:
        node.metrics.config_reloads["unchanged"] += 1
        log.info("configuration reloaded (%s): unchanged", source)
        return ReloadResult(())
    restart = restart_fields(old, changed)
    if restart:
        record_refused(node, source, "restart_required", restart)
        raise RestartRequired(restart)
    try:
        templates = _build_apps(old, new, node.ctx.wall_clock)
    except ConfigError as exc:
        record_refused(node, source, "invalid", exc.fields)
        raise
    closed = _apply(node, old, new, changed, templates)
    node.metrics.config_reloads["applied"] += 1
    names = ", ".join(changed)
    log.warning("configuration reloaded (%s): %s", source, names)
    _audit(
        node,
        CONFIG_CHANGED,
        "warning",
        f"Configuration changed live: {names}",
        {"source": source, "changed": ",".join(changed), "closed_connections": closed},
    )
    return ReloadResult(tuple(changed), closed)


def _build_apps(
    old: Settings, new: Settings, wall_clock: Callable[[], float]
) -> dict[str, AppState]:
    """A fresh state for every added or changed app (reads JWT key files; may fail)."""
    before = {app.id: app for app in old.apps}
    return {app.id: app_state(app, wall_clock) for app in new.apps if before.get(app.id) != app}


def _apply(
    node: ReloadableNode,
    old: Settings,
    new: Settings,
    changed: Sequence[str],
    templates: dict[str, AppState],
) -> int:
    """Ask each owner to take the new settings; close what they no longer serve."""
    hub, ctx = node.hub, node.ctx
    before = {app.id: app for app in old.apps}
    disabled = [
        hub.apps_by_id[app.id]
        for app in new.apps
        if app.id in before and before[app.id].enabled and not app.enabled
    ]
    removed = hub.apply_settings(new, templates)
    node.rest.apply_settings(new)
    ctx.apply_settings(new)
    node.settings = new
    if old.metrics != new.metrics or old.admin != new.admin:
        node.rebuild_ops()
    if any(_touches_webhooks(path) for path in changed):
        node.replace_webhooks()
    closing = [(state, Reason.APP_REMOVED) for state in removed]
    closing += [(state, Reason.APP_DISABLED) for state in disabled]
    closed = 0
    for state, reason in closing:
        for connection in [c for c in ctx.connections if c.app is state]:
            connection.refuse(Refused(reason))
            closed += 1
    return closed


def _touches_webhooks(path: str) -> bool:
    if path.startswith(("+apps.", "-apps.")):
        return True
    return path.startswith("apps.") and path.endswith((".webhooks", ".enable_subscription_count"))
