"""Per-app rules for client events: a name allow-list and a JSON Schema per name.

Both are optional and come from the app's settings (``client_event_allowlist``,
``client_event_schemas``). Schemas are checked once, when the configuration is
loaded, so a broken schema fails start-up naming the event instead of failing
every message later. Validation uses the ``jsonschema`` library (draft 2020-12)
with remote references disabled: a schema can never make the server fetch a URL.

A refusal names the schema keyword and the location in ``data`` that failed,
never the value found there, which may be anything a client chose to send.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry

__all__ = ["ClientEventPolicy"]

#: Offline registry: ``$ref`` resolves only inside the schema itself.
_NO_REMOTE = Registry()
#: Location segments kept in a refusal detail; keys longer than this are cut.
_MAX_SEGMENT = 40


def _location(path: Sequence[str | int]) -> str:
    """A JSONPath-like pointer into ``data`` (``$.items[2].name``), bounded in length."""
    parts = ["$"]
    for segment in list(path)[:8]:
        if isinstance(segment, int):
            parts.append(f"[{segment}]")
        else:
            text = segment[:_MAX_SEGMENT]
            parts.append(f".{text}" if text.isidentifier() else "[…]")
    if len(path) > 8:
        parts.append("…")
    return "".join(parts)


class ClientEventPolicy:
    """What one app accepts as client events, beyond the protocol's own rules.

    Args:
        allowlist: exact names, or prefixes ending in ``*``; ``None`` accepts any name.
        schemas: event name → JSON Schema for its ``data``.

    Raises:
        ValueError: a schema is not a valid draft 2020-12 schema (names the event).
    """

    __slots__ = ("_exact", "_prefixes", "_validators")

    def __init__(
        self, allowlist: Sequence[str] | None, schemas: Mapping[str, Mapping[str, Any]]
    ) -> None:
        if allowlist is None:
            self._exact: frozenset[str] | None = None
            self._prefixes: tuple[str, ...] = ()
        else:
            self._exact = frozenset(name for name in allowlist if not name.endswith("*"))
            self._prefixes = tuple(name[:-1] for name in allowlist if name.endswith("*"))
        self._validators: dict[str, Draft202012Validator] = {}
        for name, schema in schemas.items():
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as exc:
                where = "/".join(str(part) for part in exc.path) or "(root)"
                raise ValueError(
                    f"schema for {name!r} is invalid at {where}: {exc.validator} rule"
                ) from None
            self._validators[name] = Draft202012Validator(schema, registry=_NO_REMOTE)

    @property
    def active(self) -> bool:
        """Whether any rule is configured (the fast path skips the policy otherwise)."""
        return self._exact is not None or bool(self._validators)

    def allows(self, name: str) -> bool:
        """Whether the allow-list admits the event ``name``."""
        if self._exact is None:
            return True
        return name in self._exact or name.startswith(self._prefixes)

    def check_data(self, name: str, data: Any) -> str | None:
        """``None`` when ``data`` fits the schema for ``name`` (or there is none).

        Returns:
            A refusal detail naming the failed keyword and where in ``data``.
        """
        validator = self._validators.get(name)
        if validator is None:
            return None
        error = next(iter(validator.iter_errors(data)), None)
        if error is None:
            return None
        return (
            f"Client event data does not match the schema for its name: "
            f"'{error.validator}' rule failed at {_location(list(error.absolute_path))}"
        )
