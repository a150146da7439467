"""``BASTION_*`` environment overrides, applied to a parsed TOML mapping before validation.

``__`` descends: ``BASTION_SERVER__PORT=7000``, ``BASTION_APPS__0__SECRET=...``
(list items by index). A value is read as a TOML value when it parses as one
(``7000``, ``true``, ``["a", "b"]``) and as a plain string otherwise, except that
a setting declared as a string (a secret, an app id) always takes the text as it
is. The declared types are read from the settings model (:mod:`bastion.config`
passes its ``Settings``), so this module needs none of them.
"""

from __future__ import annotations

import tomllib
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr

from bastion.errors import ConfigError

__all__ = ["apply_env"]


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` down to the type that matters."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            options = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


def _annotation_at(model: type[BaseModel], path: list[str]) -> Any:
    """The declared type of the setting at ``path`` of ``model`` (``None``: there is none)."""
    node: Any = model
    for part in path:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(part)
            if field is None:
                return None
            node = field.annotation
        elif get_origin(node) is list:
            node = get_args(node)[0]
        else:
            return None
    return _unwrap(node)


def _wants_string(annotation: Any) -> bool:
    if annotation in (str, SecretStr):
        return True
    if get_origin(annotation) is Literal:
        return all(isinstance(arg, str) for arg in get_args(annotation))
    return False


def _env_value(model: type[BaseModel], raw: str, path: list[str]) -> Any:
    # A string setting takes the text as it is: a secret "12345678" or an app id
    # "67890" must not turn into numbers. Other settings read it as a TOML value.
    if _wants_string(_annotation_at(model, path)):
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(data: dict[str, Any], environ: Mapping[str, str], model: type[BaseModel]) -> None:
    """Apply every ``BASTION_*`` variable of ``environ`` to ``data`` (parsed TOML), in place.

    Raises:
        ConfigError: a variable names a list item that does not exist, or descends
            into a scalar (naming the variable, never its value).
    """
    prefix = "BASTION_"
    for name in sorted(environ):
        if not name.startswith(prefix) or "__" not in name:
            continue
        path = [part.lower() for part in name[len(prefix) :].split("__")]
        node: Any = data
        for index, part in enumerate(path):
            last = index == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{name}: no list item {part!r} to override", fields=(name,))
                if last:
                    node[int(part)] = _env_value(model, environ[name], path)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = _env_value(model, environ[name], path)
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"{name}: cannot descend into a scalar", fields=(name,))
