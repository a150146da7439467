"""The audit event for a configuration a node starts with, and what changed since.

Each part of the configuration (``server``, ``adapter``, ``audit``, ``security``
and every app by id) is reduced to a short fingerprint: a SHA-256 of its
canonical JSON with every secret replaced by a marker. Secrets never enter the
hash, so the fingerprints say nothing about them; a rotation still shows, as a
change in the app's ``previous_secrets`` count or in its ``jwt`` table.

A node compares its fingerprints with those of the last ``config_loaded`` event
in the audit log and records a new one naming the parts that were added,
removed or changed, so "who loosened that limit, and when" has an answer.

Pure: settings and the previous event in, an event out; the id and time are
arguments.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from bastion.security.audit import AuditEvent, MetadataValue, Severity

if TYPE_CHECKING:
    from bastion.config import Settings

__all__ = ["CONFIG_LOADED", "config_event", "fingerprints"]

#: The audit event type.
CONFIG_LOADED = "config_loaded"
#: Metadata keys holding a part's fingerprint start with this.
_PART = "part:"
_HIDDEN = "<hidden>"


def _scrub(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return _HIDDEN
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 30 and 30.0 are the same setting (a default vs the file's value)
    if isinstance(value, dict):
        return {str(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _digest(value: Any) -> str:
    text = json.dumps(_scrub(value), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fingerprints(settings: Settings) -> dict[str, str]:
    """A fingerprint per configuration part (``server``, ``apps.{id}``, ...)."""
    parts: dict[str, Any] = {
        "server": settings.server.model_dump(),
        "adapter": settings.adapter.model_dump(),
        "audit": settings.audit.model_dump(),
        "security": settings.security.model_dump(),
    }
    for app in settings.apps:
        parts[f"apps.{app.id}"] = app.model_dump()
    return {name: _digest(value) for name, value in parts.items()}


def _previous_parts(previous: Mapping[str, MetadataValue] | None) -> dict[str, str] | None:
    if previous is None:
        return None
    return {
        key[len(_PART) :]: str(value)
        for key, value in previous.items()
        if key.startswith(_PART) and value is not None
    }


def config_event(
    current: Mapping[str, str],
    previous_metadata: Mapping[str, MetadataValue] | None,
    *,
    id: str,
    time: float,
) -> AuditEvent:
    """The ``config_loaded`` event for ``current`` fingerprints.

    Args:
        current: :func:`fingerprints` of the configuration now in force.
        previous_metadata: metadata of the last ``config_loaded`` event, if any.
        id: the event id.
        time: Unix seconds.
    """
    before = _previous_parts(previous_metadata)
    severity: Severity
    if before is None:
        changed: list[str] = []
        message = "Configuration loaded (no earlier configuration on record)"
        severity = "info"
    else:
        added = sorted(set(current) - set(before))
        removed = sorted(set(before) - set(current))
        modified = sorted(k for k in set(current) & set(before) if current[k] != before[k])
        changed = [*(f"+{k}" for k in added), *(f"-{k}" for k in removed), *modified]
        message = (
            f"Configuration changed: {', '.join(changed)}"
            if changed
            else "Configuration loaded, unchanged since the last start"
        )
        # A change to what guards the node deserves a look; a restart with the same file not.
        severity = "warning" if changed else "info"
    metadata: dict[str, MetadataValue] = {
        "changed": ",".join(changed),
        **{f"{_PART}{name}": value for name, value in sorted(current.items())},
    }
    return AuditEvent(
        id=id,
        time=time,
        type=CONFIG_LOADED,
        severity=severity,
        ip=None,
        app_id=None,
        socket_id=None,
        user_id=None,
        message=message,
        metadata=metadata,
    )
