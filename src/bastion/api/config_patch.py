"""The configuration as the admin API shows it and takes it back: redacted, patched.

``GET /api/security/config`` shows :func:`redacted_config`: the effective
settings as JSON with every secret replaced by :data:`REDACTED` (``SecretStr``
fields: app secrets, retiring secrets, JWT keys, the cluster secret, the metrics
and admin tokens) and the password of any URL (the Redis URL, a webhook URL with
credentials) likewise.

``PUT /api/security/config`` takes a partial document of the same shape, and
:func:`patched_document` merges it over the running settings: tables merge key
by key, apps match by ``id`` (a known one merges over the running app, a new one
is taken whole), anything else replaces. A secret given as :data:`REDACTED` (or
a URL whose password is redacted, as ``GET`` shows them) keeps the running value,
so GET, edit, PUT works. The result is plain JSON for
:func:`~bastion.config.settings_from_json` to validate.

A key the settings do not have is refused naming the table it was found in,
never the key (:class:`~bastion.api.admin_params.BadRequest`).
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

from bastion.api.admin_params import BadRequest
from bastion.config import AppSettings, Settings

__all__ = ["REDACTED", "patched_document", "redact_url", "redacted_config"]

#: What replaces every secret in ``GET config``.
REDACTED = "[redacted]"


# --- redaction ----------------------------------------------------------------------


def redact_url(value: str) -> str:
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
        return redact_url(dumped)
    return dumped


def redacted_config(settings: Settings) -> dict[str, Any]:
    """The effective configuration as JSON values with every secret replaced.

    ``SecretStr`` fields become :data:`REDACTED`, and so does the password of any
    URL.
    """
    result = _redact(settings, settings.model_dump(mode="json"))
    assert isinstance(result, dict)
    return result


# --- the patch ----------------------------------------------------------------------------


def patched_document(body: bytes, settings: Settings) -> dict[str, Any]:
    """The running ``settings`` with the JSON object ``body`` merged over them.

    Raises:
        BadRequest: the body is not a JSON object, names a key the settings do not
            have, or keeps a redacted secret that has no running value.
    """
    try:
        patch = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body", "the body must be a JSON object") from None
    if not isinstance(patch, dict):
        raise BadRequest("body", "the body must be a JSON object")
    return _merge(patch, _plain(settings.model_dump()), Settings, "")


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
    """The settings model a field holds (``X``, ``X | None``), if it is one.

    Not a container of models (``dict[str, X]``, such as ``[apps.roles]``): those
    are replaced whole, like any other value.
    """
    union = get_origin(annotation) in (Union, types.UnionType)
    for candidate in (annotation, *(get_args(annotation) if union else ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _merge(
    patch: dict[str, Any], current: dict[str, Any], model: type[BaseModel], path: str
) -> dict[str, Any]:
    """``patch`` over ``current``: tables merge key by key, apps by id, the rest replace."""
    merged = dict(current)
    for key, value in patch.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            # Never echo the client's key: name the table it was found in.
            raise BadRequest(path or "body", f"unknown field in {path or 'the body'}")
        where = f"{path}.{key}" if path else key
        old = current.get(key)
        table = _table(field.annotation)
        if where == "apps" and isinstance(value, list) and isinstance(old, list):
            merged[key] = _merge_apps(value, old)
        elif table is not None and isinstance(value, dict) and isinstance(old, dict):
            merged[key] = _merge(value, old, table, where)
        else:
            merged[key] = _keep_secrets(value, old, where)
    return merged


def _merge_apps(items: list[Any], current: list[Any]) -> list[Any]:
    """Apps match by ``id``: a known one merges over the running app, a new one is whole."""
    by_id = {app["id"]: app for app in current if isinstance(app, dict)}
    merged = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"apps.{index}", f"apps.{index} must be a JSON object")
        app_id = item.get("id")
        old = by_id.get(app_id) if isinstance(app_id, str) else None
        merged.append(_merge(item, old or {}, AppSettings, f"apps.{index}"))
    return merged


def _keep_secrets(value: Any, current: Any, path: str) -> Any:
    """``value`` with each redacted placeholder replaced by the running value it hides."""
    if value == REDACTED:
        if isinstance(current, str) and current:
            return current
        raise BadRequest(path, f"{path}: a redacted placeholder with no current value to keep")
    if isinstance(value, str) and isinstance(current, str):
        return current if value != current and value == redact_url(current) else value
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
